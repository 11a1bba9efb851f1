"""Rebalances under load: a second worker joins and leaves mid-batch; nothing is lost or corrupted."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from worker.model.forecaster import ForecastRequest
from worker.service.engine import EngineResult, TrivialEngine

from .conftest import (
    HORIZONS_MS,
    TF_MS,
    Collector,
    RunningWorker,
    WorkerEnv,
    eventually,
    forecastable,
    interleave,
    publish_events,
    synthetic_events,
    trivial_engine,
    wait_all_committed,
)

pytestmark = pytest.mark.integration


class SlowEngine(TrivialEngine):
    """Sampling takes a while, so revokes land while batches are taken, queued and sampling."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.delay_s = delay_s

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        time.sleep(self.delay_s)
        return super().process(requests)


async def test_a_worker_joining_and_leaving_mid_batch_loses_and_corrupts_nothing(wenv: WorkerEnv) -> None:
    symbols = [f"RB{c}" for c in "ABCDEFGH"]
    per_symbol = [synthetic_events(s, 60) for s in symbols]
    events = interleave(per_symbol)
    engine = SlowEngine(delay_s=0.05)
    expected = forecastable(events, engine.window_bars)
    settings = wenv.settings(batch={"max_size": 4, "max_wait_ms": 0, "max_in_flight": 2},
                             kafka={"max_poll_records": 40})
    third = len(events) // 3
    async with Collector(wenv.bootstrap, wenv.output) as out:
        a = await RunningWorker(settings, engine).start()
        await publish_events(wenv.bootstrap, wenv.input, events[:third])
        await out.wait_count(10)
        # A second worker joins while the first is mid-backlog: partitions move away from it.
        b = RunningWorker(wenv.settings(batch={"max_size": 4, "max_wait_ms": 0, "max_in_flight": 2},
                                        kafka={"max_poll_records": 40}), SlowEngine(delay_s=0.05))
        await b.start()
        await eventually(lambda: len(a.worker.consumer.assignment()) < wenv.partitions, "the partitions split")
        await publish_events(wenv.bootstrap, wenv.input, events[third : 2 * third])
        await asyncio.sleep(1.0)
        # ... and leaves again mid-batch: its partitions come back.
        assert await b.stop() == 0
        metas = await publish_events(wenv.bootstrap, wenv.input, events[2 * third :])
        await out.wait_for(lambda: set(out.bars()) >= expected, "every bar forecast", timeout=180)
        await eventually(lambda: len(a.worker.consumer.assignment()) == wenv.partitions, "all partitions back")
        await eventually(lambda: a.worker.tracker.pending_count() == 0, "every record done")
        await wait_all_committed(wenv, metas, "every offset committed", timeout=60)

        # No window corrupted: each holds exactly the symbol's bars, in order, with their values,
        # and the watermark is the newest bar.
        for s, evs in zip(symbols, per_symbol, strict=True):
            snap = await a.worker.store.read(s)
            assert snap.open_times().tolist() == [e.open_time for e in evs], s
            assert snap.ohlcv()[:, 3].tolist() == [e.close for e in evs], s
            assert snap.watermark == evs[-1].open_time, s
        # Every forecast decodes strictly (out.bars() does) and duplicates are bounded by replays.
        assert len(out.records) >= len(expected)
        assert await a.stop() == 0


class BlockingEngine(TrivialEngine):
    """Blocks the batch holding bar ``hold_at`` until ``release`` is set."""

    def __init__(self, hold_at: int) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.release = threading.Event()

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        if any(int(r.candles.open_time[-1]) == self.hold_at for r in requests):
            self.holding.set()
            self.release.wait(60)
        return super().process(requests)


async def test_a_batch_still_sampling_after_its_partition_moved_is_not_published(wenv: WorkerEnv) -> None:
    """The revoke waits for running batches only up to the grace; a batch that outlives it must not
    publish for partitions the other worker now owns (that worker forecasts those bars itself)."""
    symbols = [f"FN{c}" for c in "ABCDEFGH"]
    per_symbol = [synthetic_events(s, 12) for s in symbols]
    events = interleave(per_symbol)
    hold = per_symbol[0][9].open_time  # bar 9 of every symbol (they share open times)
    engine = BlockingEngine(hold_at=hold)
    settings = wenv.settings(batch={"max_size": 64, "max_wait_ms": 50, "max_in_flight": 1},
                             service={"shutdown_grace_s": 2.0})
    async with Collector(wenv.bootstrap, wenv.output) as out:
        a = await RunningWorker(settings, engine).start()
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        partition_of = {ev.symbol: m.partition for ev, m in zip(events, metas, strict=True)}
        await eventually(lambda: engine.holding.is_set(), "a batch with bar 9 sampling")
        # A second worker joins: partitions move while that batch samples (a's revoke gives up
        # waiting after its 2 s grace).
        b = await RunningWorker(wenv.settings(), trivial_engine()).start(wait_assigned=False)
        await eventually(lambda: bool(b.worker.consumer.assignment()), "partitions moved to b", timeout=120)
        moved = {tp.partition for tp in b.worker.consumer.assignment()}
        theirs = {s for s in symbols if partition_of[s] in moved}
        assert theirs
        await out.wait_for(lambda: {(s, hold) for s in theirs} <= set(out.bars()), "b forecasting bar 9")
        engine.release.set()  # ... and only now does a's batch finish sampling.
        await asyncio.sleep(2.0)
        await out.settle(quiet_s=1.0)
        stale = [(m.symbol, m.open_time) for m in out.forecasts()
                 if m.worker_id == a.worker.worker_id and m.symbol in theirs and m.open_time >= hold]
        assert stale == [], stale
        # Nothing lost either: every bar from 7 on of every symbol was forecast by someone.
        assert {(ev.symbol, ev.open_time) for ev in events if ev.open_time >= per_symbol[0][7].open_time} \
            <= set(out.bars())
        assert await b.stop() == 0
        await a.stop()


async def test_a_revoke_does_not_wait_past_its_grace_for_a_long_state_rebuild(wenv: WorkerEnv) -> None:
    """A state rebuild holds the window-write lock for as long as it reads (minutes on a long topic);
    held here until the handover is seen. A second worker joins: the first one's revoke waits for
    the lock only within its grace (2 s), then hands the partitions over — it used to wait for the
    lock first, past the group's rebalance timeout, which dropped the member while it still thought
    it owned them (here: never let go, so the handover never came)."""
    settings = wenv.settings(service={"shutdown_grace_s": 2.0})
    a = await RunningWorker(settings, trivial_engine()).start()
    owned = set(a.worker.ledger.owned())
    assert len(owned) == wenv.partitions
    await a.worker._write_lock.acquire()  # what a running rebuild holds
    try:
        held = time.monotonic()
        b = await RunningWorker(wenv.settings(), trivial_engine()).start(wait_assigned=False)
        await eventually(lambda: bool(b.worker.consumer.assignment()), "partitions moved to b", timeout=60)
        await eventually(lambda: set(a.worker.ledger.owned()) < owned, "a gave partitions up", timeout=30)
        assert time.monotonic() - held < 40
        assert a.worker.ledger.owned().isdisjoint(b.worker.consumer.assignment())
    finally:
        a.worker._write_lock.release()
    assert await b.stop() == 0
    await a.stop()

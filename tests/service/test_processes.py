"""``signal-worker run`` as a real process (real model): SIGKILL and restart, two workers with one
killed, SIGTERM drain. The broker and Redis stay up; the worker is what dies."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from schemas import CandleEvent, encode_candle
from schemas.headers import IDEMPOTENCY_KEY, candle_headers, header_value
from worker.settings import RedisSettings
from worker.state.connection import make_redis
from worker.state.windows import WindowStore

from .conftest import (
    CHECKPOINT,
    HAVE_CHECKPOINT,
    Collector,
    WorkerEnv,
    WorkerProcess,
    committed_offsets,
    dup_keys,
    eventually,
    forecastable,
    interleave,
    model_events,
    needs_model,
    publish_events,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_model]

TICK_S = 0.08  # one bar of every symbol per tick while "live"


def window_bars() -> int:
    if not HAVE_CHECKPOINT:
        return 129
    from worker.model.checkpoint import load_checkpoint

    return load_checkpoint(CHECKPOINT).spec.window_bars


class Feed:
    """Publishes bars tick by tick in the background (a live feed), remembering each record's offset."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.sent: list[tuple[CandleEvent, RecordMetadata]] = []
        self.pause = asyncio.Event()
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all",
                                          linger_ms=2)

    async def __aenter__(self) -> Feed:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(self, events: Sequence[CandleEvent]) -> None:
        futures = [await self._producer.send(self.topic, encode_candle(ev), key=ev.symbol.encode(),
                                             headers=candle_headers()) for ev in events]
        for ev, meta in zip(events, await asyncio.gather(*futures), strict=True):
            self.sent.append((ev, meta))

    async def stream(self, ticks: Sequence[Sequence[CandleEvent]], interval: float = TICK_S) -> None:
        for tick in ticks:
            while self.pause.is_set():
                await asyncio.sleep(0.02)
            await self.publish(tick)
            await asyncio.sleep(interval)

    def offset_of(self) -> dict[tuple[str, int], tuple[int, int]]:
        return {(ev.symbol, ev.open_time): (m.partition, m.offset) for ev, m in self.sent}

    def ends(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, m in self.sent:
            out[m.partition] = max(out.get(m.partition, 0), m.offset + 1)
        return out


async def scrape(proc: WorkerProcess, name: str) -> float:
    """A sample value from the process's own /metrics (its port is in the worker_started log line)."""
    port = int(proc.events("worker_started")[-1]["metrics_port"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    body = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def check_duplicates(out: Collector, offsets: dict[tuple[str, int], tuple[int, int]],
                     committed_at_kill: dict[int, int | None]) -> None:
    """Duplicates only for work that was not committed when the worker died, with one idempotency key."""
    keys: dict[tuple[str, int], set[bytes]] = defaultdict(set)
    for rec, msg in zip(out.records, out.forecasts(), strict=True):
        keys[(msg.symbol, msg.open_time)].add(header_value(list(rec.headers), IDEMPOTENCY_KEY) or b"")
    assert all(len(k) == 1 for k in keys.values()), "copies of a forecast must share the idempotency key"
    for bar in dup_keys(out.bars()):
        partition, offset = offsets[bar]
        committed = committed_at_kill.get(partition) or 0
        assert offset >= committed, f"{bar} was committed (offset {offset} < {committed}) yet forecast twice"


async def start_and_join(spawn: Callable[..., WorkerProcess], env: dict[str, str], name: str) -> WorkerProcess:
    proc = spawn(env, name)
    await proc.wait_event("partitions_assigned", timeout=120)
    return proc


async def test_sigkill_mid_stream_then_restart_no_forecast_missing(wenv: WorkerEnv, spawn) -> None:  # type: ignore[no-untyped-def]
    wb = window_bars()
    symbols = ["EURUSD", "SIM1", "SIM2"]
    per_symbol = [model_events(s, wb + 40, i) for i, s in enumerate(symbols)]
    expected = forecastable(interleave(per_symbol), wb)
    env = wenv.subprocess_env()
    async with Collector(wenv.bootstrap, wenv.output) as out, Feed(wenv.bootstrap, wenv.input) as feed:
        await feed.publish(interleave([evs[: wb - 1] for evs in per_symbol]))  # history, nothing to forecast yet
        first = await start_and_join(spawn, env, "first")
        ticks = [[evs[i] for evs in per_symbol] for i in range(wb - 1, wb + 40)]
        streaming = asyncio.create_task(feed.stream(ticks))
        await out.wait_count(12, timeout=120)
        first.signal(9)  # SIGKILL: no drain, no commit, no goodbye to the group
        assert await first.wait(10) == -9
        committed_at_kill = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)

        second = await start_and_join(spawn, env, "second")
        await streaming
        await out.wait_for(lambda: set(out.bars()) >= expected, "a forecast for every final candle", timeout=180)
        await out.settle()
        second.signal(15)
        assert await second.wait(60) == 0

    got = out.bars()
    assert set(got) == expected, sorted(set(got) ^ expected)[:10]
    check_duplicates(out, feed.offset_of(), committed_at_kill)


async def test_sigkill_with_conflation_newest_bar_forecast_and_skips_counted(wenv: WorkerEnv, spawn) -> None:  # type: ignore[no-untyped-def]
    wb = window_bars()
    symbols = ["EURUSD", "SIM1", "SIM2"]
    n = wb + 40
    per_symbol = [model_events(s, n, i) for i, s in enumerate(symbols)]
    everything = forecastable(interleave(per_symbol), wb)
    env = wenv.subprocess_env(SIGNAL_WORKER_WINDOW__CONFLATE="true")
    async with Collector(wenv.bootstrap, wenv.output) as out, Feed(wenv.bootstrap, wenv.input) as feed:
        await feed.publish(interleave([evs[: wb - 1] for evs in per_symbol]))
        first = await start_and_join(spawn, env, "first")
        await feed.stream([[evs[i] for evs in per_symbol] for i in range(wb - 1, wb + 10)])
        await out.wait_count(6, timeout=120)
        first.signal(9)
        assert await first.wait(10) == -9
        committed_at_kill = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)
        await out.settle(quiet_s=1.0)  # everything the dead worker got acknowledged
        n_first = len(out.records)

        # While no worker runs, the feed goes on: the restarted worker finds a backlog.
        await feed.publish(interleave([evs[wb + 10 :] for evs in per_symbol]))
        second = await start_and_join(spawn, env, "second")
        newest = {(s, evs[-1].open_time) for s, evs in zip(symbols, per_symbol, strict=True)}
        await out.wait_for(lambda: set(out.bars()) >= newest, "every symbol's newest bar forecast", timeout=180)
        await eventually(lambda: _all_committed(wenv, feed.ends()), "everything committed", timeout=60)
        await out.settle()
        conflated = await scrape(second, "signal_worker_conflated_total")
        consumed = await scrape(second, 'signal_worker_candles_total{kind="final"}')
        late = await scrape(second, "signal_worker_late_candles_total")
        skipped = await scrape(second, "signal_worker_skipped_total")
        published = await scrape(second, "signal_worker_forecasts_total")
        second.signal(15)
        assert await second.wait(60) == 0

    assert set(out.bars()) <= everything
    assert conflated > 0, "a backlog with conflation on must conflate"
    assert published == len(out.records) - n_first
    # Every bar the restarted worker consumed is accounted for.
    assert consumed == published + conflated + late + skipped, (consumed, published, conflated, late, skipped)
    check_duplicates(out, feed.offset_of(), committed_at_kill)


async def _all_committed(wenv: WorkerEnv, ends: dict[int, int]) -> bool:
    got = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)
    return all(got[p] == end for p, end in ends.items())


async def test_two_workers_one_killed_every_symbol_forecast_no_window_corrupted(wenv: WorkerEnv, spawn) -> None:  # type: ignore[no-untyped-def]
    wb = window_bars()
    symbols = [f"SYM{i}" for i in range(6)]
    per_symbol = [model_events(s, wb + 30, i) for i, s in enumerate(symbols)]
    expected = forecastable(interleave(per_symbol), wb)
    async with Collector(wenv.bootstrap, wenv.output) as out, Feed(wenv.bootstrap, wenv.input) as feed:
        await feed.publish(interleave([evs[: wb - 1] for evs in per_symbol]))
        a = spawn(wenv.subprocess_env(SIGNAL_WORKER_SERVICE__WORKER_ID="worker-a"), "a")
        b = spawn(wenv.subprocess_env(SIGNAL_WORKER_SERVICE__WORKER_ID="worker-b"), "b")

        def split() -> bool:
            for p in (a, b):
                assert p.proc.poll() is None, f"worker exited with {p.proc.returncode}:\n{p.log()[-3000:]}"
            # The latest assignment of each worker is non-empty: the group has both members.
            la, lb = a.events("partitions_assigned"), b.events("partitions_assigned")
            return bool(la and lb and la[-1]["partitions"] and lb[-1]["partitions"])

        await eventually(split, "both workers assigned partitions", timeout=120,
                         detail=lambda: a.log()[-1500:] + b.log()[-1500:])
        ticks = [[evs[i] for evs in per_symbol] for i in range(wb - 1, wb + 30)]
        streaming = asyncio.create_task(feed.stream(ticks))
        await out.wait_for(lambda: {m.worker_id for m in out.forecasts()} == {"worker-a", "worker-b"},
                           "forecasts from both workers", timeout=120)
        b.signal(9)
        assert await b.wait(10) == -9
        await streaming
        await out.wait_for(lambda: set(out.bars()) >= expected, "every symbol forecast after the kill", timeout=180)
        await out.settle()
        a.signal(15)
        assert await a.wait(60) == 0

    assert set(out.bars()) == expected
    # No window corrupted: each symbol's window is exactly its input candles.
    client = make_redis(RedisSettings(url=wenv.redis_url))
    try:
        # The deployment namespace the workers derived: <consumer group>@<timeframe> (docs/state.md).
        store = WindowStore(client, prefix=wenv.prefix, length=256, ttl_s=3600, namespace=f"{wenv.group}@1h")
        for s, evs in zip(symbols, per_symbol, strict=True):
            snap = await store.read(s)
            want = evs[-256:]
            assert snap.open_times().tolist() == [e.open_time for e in want], s
            assert snap.ohlcv().tolist() == [[e.open, e.high, e.low, e.close, e.volume] for e in want], s
            assert snap.watermark == evs[-1].open_time
    finally:
        await client.aclose()


async def test_sigterm_drains_and_commits_exactly_what_was_forecast(wenv: WorkerEnv, spawn) -> None:  # type: ignore[no-untyped-def]
    wb = window_bars()
    symbols = ["EURUSD", "SIM1", "SIM2", "SIM3"]
    per_symbol = [model_events(s, wb + 60, i) for i, s in enumerate(symbols)]
    events = interleave(per_symbol)
    # Small polls and batches, so SIGTERM lands while most of the backlog is still unfetched.
    env = wenv.subprocess_env(SIGNAL_WORKER_KAFKA__MAX_POLL_RECORDS="20", SIGNAL_WORKER_BATCH__MAX_SIZE="2",
                              SIGNAL_WORKER_BATCH__MAX_IN_FLIGHT="1", SIGNAL_WORKER_SERVICE__SHUTDOWN_GRACE_S="30")
    async with Collector(wenv.bootstrap, wenv.output) as out:
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        offsets = {(ev.symbol, ev.open_time): (m.partition, m.offset) for ev, m in zip(events, metas, strict=True)}
        proc = await start_and_join(spawn, env, "draining")
        await out.wait_count(4, timeout=120)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        proc.signal(15)
        code = await proc.wait(60)
        took = loop.time() - t0
        assert code == 0, proc.log()[-3000:]
        assert took < 30, f"drain took {took:.1f}s, longer than the grace period"
        stopped = proc.events("worker_stopped")
        assert stopped and stopped[-1]["exit_code"] == 0
        await out.settle()

    committed = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)
    forecastable_bars = forecastable(events, wb)
    done = {bar for bar, (p, off) in offsets.items() if committed.get(p) is not None and off < committed[p]}
    got = out.bars()
    assert len(got) == len(set(got)), "a clean drain must not duplicate"
    # Committed == forecast: every committed forecastable candle has its forecast, and nothing past
    # the committed offsets was forecast (the drain finished everything it had fetched).
    assert set(got) == done & forecastable_bars, (sorted(set(got) - done)[:5], sorted((done & forecastable_bars)
                                                                                       - set(got))[:5])
    ends = {p: max(off for (pp, off) in offsets.values() if pp == p) + 1 for p, _ in offsets.values()}
    assert any(committed[p] != end for p, end in ends.items()), "SIGTERM came after the backlog was done"
    # What a new member of the group would read first is exactly the record after the last one
    # processed: per partition, the committed offset is one past the newest forecast candle's offset
    # (or that of the candles after it that trigger nothing).
    for p in range(wenv.partitions):
        forecast_offsets = [offsets[bar][1] for bar in got if offsets[bar][0] == p]
        if forecast_offsets:
            assert committed[p] is not None and committed[p] > max(forecast_offsets)


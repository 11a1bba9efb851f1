"""Failures of the worker's dependencies and of its engine, in process: Redis outage, sampling failure."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from worker.dev.embedded import EmbeddedRedis
from worker.errors import SamplingStalled
from worker.model.forecaster import ForecastRequest
from worker.service.engine import EngineResult, TrivialEngine

from .conftest import (
    HORIZONS_MS,
    TF_MS,
    Collector,
    RunningWorker,
    WorkerEnv,
    committed_offsets,
    eventually,
    forecastable,
    interleave,
    make_env,
    metric,
    publish_events,
    synthetic_events,
    trivial_engine,
    wait_all_committed,
)

pytestmark = pytest.mark.integration


async def test_redis_restarted_empty_mid_stream_rebuilds_windows_and_forecasts_every_bar(  # type: ignore[no-untyped-def]
        broker, own_redis: EmbeddedRedis) -> None:
    env = await make_env(broker, own_redis.url)
    symbols = ["RDA", "RDB", "RDC", "RDD"]
    per_symbol = [synthetic_events(s, 24) for s in symbols]
    before = interleave([evs[:12] for evs in per_symbol])
    during = interleave([evs[12:] for evs in per_symbol])
    engine = trivial_engine()
    settings = env.settings(redis={"retry_max_backoff_s": 0.5, "socket_timeout_s": 1.0})
    async with Collector(env.bootstrap, env.output) as out, RunningWorker(settings, engine) as w:
        await publish_events(env.bootstrap, env.input, before)
        first = forecastable(before, engine.window_bars)
        await out.wait_for(lambda: set(out.bars()) >= first, "forecasts before the outage")

        own_redis.stop()
        metas = await publish_events(env.bootstrap, env.input, during)
        await eventually(lambda: metric(w, "signal_worker_redis_errors_total") >= 3, "retries against a dead Redis")
        await eventually(lambda: metric(w, "signal_worker_paused_partitions") > 0, "partitions paused for Redis")
        assert w.consumer.paused() == w.consumer.assignment()
        n_out = len(out.records)
        await asyncio.sleep(1.0)  # nothing can be forecast while Redis is down
        assert len(out.records) == n_out
        committed_during = await committed_offsets(env.bootstrap, env.group, env.input, env.partitions)

        own_redis.start()  # same port, empty keyspace (persistence off)
        # The restarted Redis has lost the windows; the worker notices (the epoch marker is gone)
        # before its next write and rebuilds them from the input topic, so every bar of the outage
        # is forecast, none twice.
        after = {(ev.symbol, ev.open_time) for ev in during}
        await out.wait_for(lambda: set(out.bars()) >= first | after, "every forecast after the recovery")
        await eventually(lambda: metric(w, "signal_worker_paused_partitions") == 0 and not w.consumer.paused(),
                         "partitions resumed")
        await eventually(lambda: w.tracker.pending_count() == 0, "all work done")
        await out.settle(quiet_s=0.5)
        assert sorted(out.bars()) == sorted(first | after)
        assert w.restores and w.restores[0]["bars"] >= 4 * 12, w.restores

        # Every window holds all 24 bars again: the 12 rebuilt from the topic and the 12 of the outage.
        for s, evs in zip(symbols, per_symbol, strict=True):
            snap = await w.store.read(s)
            assert snap.open_times().tolist() == [e.open_time for e in evs], s
            assert snap.ohlcv()[:, 3].tolist() == [e.close for e in evs]
        assert metric(w, "signal_worker_skipped_total", {"reason": "insufficient_history"}) == 4 * 7

        # Nothing past the unwritten records was committed during the outage; all of it is now.
        ends: dict[int, int] = {}
        for m in metas:
            ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
        firsts: dict[int, int] = {}
        for m in metas:
            firsts[m.partition] = min(firsts.get(m.partition, 1 << 62), m.offset)
        for p, off in committed_during.items():
            if p in firsts:
                assert off is None or off <= firsts[p], (p, off, firsts[p])

        async def all_committed() -> bool:
            got = await committed_offsets(env.bootstrap, env.group, env.input, env.partitions)
            return all(got[p] == end for p, end in ends.items())

        await eventually(all_committed, "every offset committed after the recovery", timeout=30)


class FailingOnce(TrivialEngine):
    """Our own engine: the batch holding bar ``fail_at`` blocks until ``release`` is set, then fails
    (as a CUDA OOM that survives the half-batch retry would)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.fail_at = fail_at
        self.release = threading.Event()

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        if any(int(r.candles.open_time[-1]) == self.fail_at for r in requests):
            self.release.wait(60)
            raise RuntimeError("simulated sampling failure")
        return super().process(requests)


async def test_sampling_failure_exits_nonzero_and_the_batch_is_forecast_after_restart(wenv1: WorkerEnv) -> None:
    """The failed batch's records are redelivered after the restart, so they must be forecast then,
    even though a later batch of the same symbol finished meanwhile."""
    env = wenv1
    bars = synthetic_events("FAIL", 16)
    expected = forecastable(bars, 8)  # bars 7..15
    engine = FailingOnce(fail_at=bars[8].open_time)
    settings = env.settings(batch={"max_size": 4, "max_wait_ms": 0, "max_in_flight": 2})
    async with Collector(env.bootstrap, env.output) as out:
        await publish_events(env.bootstrap, env.input, bars)  # one backlog: batches [..7] [8..11] [12..15]
        first = RunningWorker(settings, engine)
        await first.start()
        w = first.worker
        # The batch after the blocked one finishes and publishes while bar 8's batch still samples.
        await out.wait_for(lambda: ("FAIL", bars[15].open_time) in set(out.bars()), "the forecast of bar 15")
        await eventually(lambda: w.tracker.pending_count() == 4, "only bars 8..11 still pending")
        watermark = (await w.store.read("FAIL")).watermark
        engine.release.set()
        assert first.task is not None
        code = await asyncio.wait_for(first.task, 60)
        assert code != 0, "a sampling failure must exit non-zero"
        # Shutdown after a fatal error: in-flight work cancelled or finished, no sampler thread left.
        assert not w._inflight and not w._background
        assert not [t for t in threading.enumerate() if t.name.startswith("sampler") and t.is_alive()]
        committed = await committed_offsets(env.bootstrap, env.group, env.input, 1)
        assert committed[0] is not None and committed[0] <= 8, f"the failed batch was committed: {committed}"

        async with RunningWorker(env.settings(), trivial_engine()) as w2:
            await eventually(lambda: metric(w2, "signal_worker_candles_total", {"kind": "final"})
                             >= len(bars) - committed[0] and w2.tracker.pending_count() == 0,
                             "the redelivered records processed")
            await out.settle(quiet_s=1.0)
            missing = sorted(expected - set(out.bars()))
            index = {b.open_time: i for i, b in enumerate(bars)}
            assert not missing, (
                f"bars {[index[t] for _, t in missing]} were never forecast: after the restart they were "
                f"taken for late candles (late={metric(w2, 'signal_worker_late_candles_total'):g}) because "
                f"the watermark had moved past them while they were still sampling (watermark then: "
                f"{watermark}, bar 8: {bars[8].open_time})")


class HangsAt(TrivialEngine):
    """Our own engine: the batch holding bar ``hang_at`` never returns until ``release`` is set (a
    hung CUDA kernel, a deadlock in a native library: a thread nothing can interrupt)."""

    def __init__(self, hang_at: int) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.hang_at = hang_at
        self.release = threading.Event()

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        if any(int(r.candles.open_time[-1]) == self.hang_at for r in requests):
            self.release.wait(120)
        return super().process(requests)


async def test_a_wedged_sampler_makes_the_worker_not_ready_then_exit_nonzero_without_committing_it(
        wenv1: WorkerEnv) -> None:
    """A sampling call past SIGNAL_WORKER_SAMPLING__STALL_AFTER_S: /readyz says so, and the worker
    exits 1 at once (not after the shutdown grace) with the stuck batch uncommitted, so another
    replica forecasts it. It used to hold its batch slot for ever, with /readyz at 200. Run under
    ``asyncio.run`` on a thread of its own, as ``signal-worker run`` runs it: the run must return
    although the hung thread is still there (asyncio.run joins its default executor on the way out,
    so a join of the sampler threads placed there would hang it)."""
    from worker.service.app import SignalWorker

    env = wenv1
    bars = synthetic_events("HANG", 12)
    engine = HangsAt(hang_at=bars[9].open_time)
    settings = env.settings(batch={"max_size": 1, "max_wait_ms": 0, "max_in_flight": 2},
                            sampling={"stall_after_s": 1.5})
    metas = await publish_events(env.bootstrap, env.input, bars)
    workers: list[SignalWorker] = []

    def serve() -> int:
        async def main() -> int:
            workers.append(SignalWorker(settings, engine))
            return await workers[0].run(install_signals=False)

        return asyncio.run(main())

    run = asyncio.get_running_loop().run_in_executor(None, serve)
    try:
        await eventually(lambda: bool(workers) and workers[0].sampling_for_s() > 0.5, "the hung batch sampling",
                         timeout=60)
        w = workers[0]
        detail = w.readiness_detail()[1]
        assert detail["sampling"] and detail["sampling_for_s"] > 0  # not yet past the limit
        await eventually(lambda: w.sampling_for_s() > 1.6 or w._fatal is not None, "past the limit")
        assert not w.readiness_detail()[0]
        started = time.monotonic()
        code = await asyncio.wait_for(asyncio.shield(run), 30)
        assert code != 0 and isinstance(w._fatal, SamplingStalled), (code, w._fatal)
        assert "SIGNAL_WORKER_SAMPLING__STALL_AFTER_S" in str(w._fatal)
        assert time.monotonic() - started < 15  # the 60 s shutdown grace was not waited out
        assert w.sampler_threads_left  # the CLI exits hard rather than join the hung thread
        assert any(t.name.startswith("sampler") and t.is_alive() for t in threading.enumerate())  # really hung
        committed = await committed_offsets(env.bootstrap, env.group, env.input, 1)
        assert committed[0] is None or committed[0] <= metas[9].offset, committed
    finally:
        engine.release.set()
        await asyncio.wait_for(run, 60)


class NaNFor(TrivialEngine):
    """Our own engine: breaks one symbol's forecasts — a NaN mean (as a diverged model would), or one
    quantile too few (an engine out of step with the contract)."""

    def __init__(self, symbol: str, how: str = "nan") -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.symbol = symbol
        self.how = how

    def _break(self, h: Any) -> Any:
        if self.how == "nan":
            return dataclasses.replace(h, mean=math.nan)
        return dataclasses.replace(h, quantiles=h.quantiles[:-1])

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        result = super().process(requests)
        result.forecasts = [
            dataclasses.replace(f, horizons=tuple(self._break(h) for h in f.horizons))
            if f.symbol == self.symbol else f
            for f in result.forecasts
        ]
        return result


@pytest.mark.parametrize("how", ["nan", "quantile_count"])
async def test_an_invalid_forecast_is_skipped_and_counted_while_the_rest_is_published(wenv: WorkerEnv,
                                                                                     how: str) -> None:
    symbols = ["GOOD1", "NANSYM", "GOOD2"]
    per_symbol = [synthetic_events(s, 14) for s in symbols]
    events = interleave(per_symbol)
    engine = NaNFor("NANSYM", how)
    expected = forecastable(events, engine.window_bars)
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(wenv.settings(), engine) as w:
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        good = {b for b in expected if b[0] != "NANSYM"}
        await out.wait_for(lambda: set(out.bars()) >= good, "the good symbols' forecasts")
        await eventually(lambda: w.tracker.pending_count() == 0, "every record done")
        await out.settle(quiet_s=0.5)
        assert sorted(out.bars()) == sorted(good)  # strict decode of each; nothing of NANSYM
        bad = len(expected) - len(good)
        assert bad == 14 - 7
        assert metric(w, "signal_worker_skipped_total", {"reason": "invalid_forecast"}) == bad
        assert metric(w, "signal_worker_forecasts_total") == len(good)
        # A skipped bar is finished work: its offset is committed like the others.
        await wait_all_committed(wenv, metas, "every offset committed")


@pytest.mark.parametrize("which, value", [
    ("window", b"not a sorted set"),
    ("watermark", b"1" * 5000),  # more digits than Python parses: the worker crashed, and again at restart
    ("watermark", b"99999999999999"),  # year 5138: every bar late, the symbol never forecast again
], ids=["window-wrong-type", "watermark-5000-digits", "watermark-after-the-clock"])
async def test_a_symbol_with_unusable_keys_is_quarantined_and_the_others_served(  # type: ignore[no-untyped-def]
        wenv: WorkerEnv, redis_client, which: str, value: bytes) -> None:
    """One symbol's keys unusable (an operator's stray SET, another program's key): that symbol is
    skipped with its offsets committed; every other symbol is forecast; the worker stays up and ready."""
    symbols = ["QOK1", "QBAD", "QOK2"]
    per_symbol = [synthetic_events(s, 14) for s in symbols]
    events = interleave(per_symbol)
    engine = trivial_engine()
    expected = {b for b in forecastable(events, engine.window_bars) if b[0] != "QBAD"}
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(wenv.settings(), engine) as w:
        key = w.store.window_key("QBAD") if which == "window" else w.store.watermark_key("QBAD")
        await redis_client.set(key, value)
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_for(lambda: set(out.bars()) >= expected, "the healthy symbols' forecasts")
        await wait_all_committed(wenv, metas, "every offset committed, QBAD's included")
        await out.settle(quiet_s=0.5)
        assert sorted(out.bars()) == sorted(expected)
        assert "QBAD" in w.ledger.quarantined
        assert metric(w, "signal_worker_quarantined_symbols") == 1
        assert metric(w, "signal_worker_skipped_total", {"reason": "quarantined"}) == 14
        assert await redis_client.get(key) == value  # left for inspection
        assert w.readiness_detail()[0], w.readiness_detail()


async def test_redis_refusing_the_worker_exits_with_the_reason(broker, own_redis: EmbeddedRedis) -> None:  # type: ignore[no-untyped-def]
    """NOPERM (an ACL without the scripting commands) is no outage: retrying cannot help, so the
    worker stops at start-up with the message instead of waiting forever as not ready."""
    import redis

    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "+@all", "-@scripting")
    finally:
        admin.close()
    env = await make_env(broker, own_redis.url)
    settings = env.settings(redis={"username": "noscripts", "password": "pw"})
    w = RunningWorker(settings, trivial_engine())
    await w.start(wait_assigned=False)
    assert w.task is not None
    code = await asyncio.wait_for(w.task, 60)
    assert code == 2


async def test_redis_refusing_writes_makes_the_worker_not_ready_until_it_takes_them(  # type: ignore[no-untyped-def]
        broker, own_redis: EmbeddedRedis) -> None:
    """Redis answers PING but refuses writes (OOM under maxmemory/noeviction; READONLY after a
    failover looks the same): not ready, partitions paused, nothing lost once it takes writes."""
    import redis

    env = await make_env(broker, own_redis.url)
    events = interleave([synthetic_events(s, 12) for s in ("OOA", "OOB")])
    engine = trivial_engine()
    expected = forecastable(events, engine.window_bars)
    admin = redis.Redis.from_url(own_redis.url)
    try:
        async with Collector(env.bootstrap, env.output) as out, RunningWorker(env.settings(), engine) as w:
            await eventually(lambda: w.readiness_detail()[0], "ready")
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            await publish_events(env.bootstrap, env.input, events)
            await eventually(lambda: not w.readiness_detail()[0], "not ready while writes fail", timeout=30)
            await eventually(lambda: metric(w, "signal_worker_paused_partitions") > 0, "partitions paused")
            assert not out.records
            admin.config_set("maxmemory", "0")
            await out.wait_for(lambda: set(out.bars()) >= expected, "every bar forecast once writes work")
            await eventually(lambda: w.readiness_detail()[0], "ready again")
    finally:
        admin.close()


async def test_redis_lost_while_no_worker_ran_is_rebuilt_at_start_up(broker, own_redis: EmbeddedRedis) -> None:  # type: ignore[no-untyped-def]
    """The windows vanished while the deployment was down (Redis restarted empty in between): the
    next worker finds no epoch marker, rebuilds each partition's windows from the records before its
    committed offset, and the very next bar of every symbol is forecast from a full window."""
    env = await make_env(broker, own_redis.url, partitions=2)
    symbols = ["SUA", "SUB", "SUC"]
    per_symbol = [synthetic_events(s, 20) for s in symbols]
    first = interleave([e[:19] for e in per_symbol])
    last = interleave([e[19:] for e in per_symbol])
    engine = trivial_engine()
    async with Collector(env.bootstrap, env.output) as out:
        async with RunningWorker(env.settings(), engine) as w1:
            metas = await publish_events(env.bootstrap, env.input, first)
            await wait_all_committed(env, metas, "the first worker's offsets committed")
            await eventually(lambda: w1.tracker.pending_count() == 0, "done")
        own_redis.stop()
        own_redis.start()  # empty
        async with RunningWorker(env.settings(), engine) as w2:
            await eventually(lambda: bool(w2.restores), "the rebuild at start-up")
            assert w2.restores[0]["bars"] == len(first), w2.restores
            await publish_events(env.bootstrap, env.input, last)
            want = {(ev.symbol, ev.open_time) for ev in last}
            await out.wait_for(lambda: set(out.bars()) >= want, "the next bar of every symbol forecast")
            for s, evs in zip(symbols, per_symbol, strict=True):
                snap = await w2.store.read(s)
                assert snap.open_times().tolist() == [e.open_time for e in evs], s

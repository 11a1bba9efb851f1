"""Back-pressure (pause/resume with a slow engine) and the health/metrics endpoints of a live worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest

from worker.dev.embedded import EmbeddedRedis
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
)

pytestmark = pytest.mark.integration


class SlowEngine(TrivialEngine):
    """Our own engine, made slow: every batch takes ``delay_s`` (a stand-in for a busy GPU)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.delay_s = delay_s
        self.batches: list[int] = []

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        time.sleep(self.delay_s)
        self.batches.append(len(requests))
        return super().process(requests)


async def test_backpressure_pauses_and_resumes_without_dropping(wenv: WorkerEnv) -> None:
    symbols = [f"BP{i}" for i in range(4)]
    per_symbol = [synthetic_events(s, 16) for s in symbols]
    events = interleave(per_symbol)
    expected = forecastable(events, 8)
    engine = SlowEngine(delay_s=0.08)
    settings = wenv.settings(batch={"max_in_flight": 1, "max_size": 2, "max_wait_ms": 0},
                             kafka={"max_poll_records": 6})
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(settings, engine) as w:
        paused_seen: list[float] = []
        partitions_paused: set[str] = set()
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                value = metric(w, "signal_worker_paused_partitions")
                paused_seen.append(value)
                partitions_paused.update(f"{tp.topic}/{tp.partition}" for tp in w.consumer.paused())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_for(lambda: set(out.bars()) >= expected, "every forecast", timeout=120)
        await eventually(lambda: metric(w, "signal_worker_paused_partitions") == 0 and not w.consumer.paused(),
                         "partitions resumed once the backlog is gone")
        done.set()
        await watcher
        await out.settle(quiet_s=0.5)

        assert max(paused_seen) > 0, "partitions were never paused although the engine could not keep up"
        assert partitions_paused
        assert paused_seen[-1] == 0
        assert sorted(out.bars()) == sorted(expected)  # nothing dropped, nothing doubled
        assert max(engine.batches) <= 2
        assert metric(w, "signal_worker_batches_in_flight") == 0


async def _http(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_health_ready_and_metrics(wenv: WorkerEnv) -> None:
    events = synthetic_events("HLT", 10)
    running = RunningWorker(wenv.settings(), trivial_engine())
    await running.start(wait_assigned=False)
    w = running.worker
    async with Collector(wenv.bootstrap, wenv.output) as out, running:
        await eventually(lambda: w.health.port != 0, "the health server to listen")
        port = w.health.port
        assert (await _http(port, "/healthz"))[0] == 200
        # Ready exactly when the worker can make progress: group joined, broker answering and
        # acknowledging, Redis answering, no rebuild of lost windows under way; poll through the join.
        answers = []
        while True:
            status, body = await _http(port, "/readyz")
            detail = json.loads(body)
            able = (detail["group_joined"] and detail["broker"] and detail["publishing"] and detail["redis"]
                    and not detail["restoring"] and not detail["stopping"])
            answers.append((status, able, detail))
            if status == 200:
                break
            assert len(answers) < 2000, answers[-5:]
            await asyncio.sleep(0.05)
        assert all(s == (200 if able else 503) for s, able, _ in answers), answers
        status, body = await _http(port, "/readyz")
        detail = json.loads(body)
        assert status == 200 and detail["ready"] is True
        assert detail["group_joined"] is True and detail["redis"] is True and detail["partitions"] == 4

        await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_count(3)
        status, text = await _http(port, "/metrics")
        assert status == 200
        assert "signal_worker_forecasts_total 3.0" in text
        assert 'signal_worker_candles_total{kind="final"} 10.0' in text
        assert "signal_worker_model_info{" in text and 'model_version="trivial-normal"' in text
        assert "signal_worker_ready 1.0" in text


async def _ready(port: int) -> bool:
    return (await _http(port, "/readyz"))[0] == 200


async def test_readyz_reports_redis_down(broker, own_redis: EmbeddedRedis) -> None:  # type: ignore[no-untyped-def]
    env = await make_env(broker, own_redis.url)
    async with RunningWorker(env.settings(), trivial_engine()) as w:
        port = w.health.port
        await eventually(lambda: _ready(port), "ready")
        own_redis.stop()
        status, body = await _http(port, "/readyz")
        assert status == 503
        assert json.loads(body)["redis"] is False
        assert (await _http(port, "/healthz"))[0] == 200  # alive, just not ready
        own_redis.start()
        await eventually(lambda: _ready(port), "ready again once Redis is back")


async def test_stop_drains_fetched_work_and_commits_it(wenv: WorkerEnv) -> None:
    """What SIGTERM does (``request_stop``): stop fetching, finish every queued and in-flight batch,
    commit, exit 0. Whatever was consumed is forecast and committed; nothing else is."""
    symbols = ["DRA", "DRB", "DRC"]
    per_symbol = [synthetic_events(s, 16) for s in symbols]
    events = interleave(per_symbol)
    metas = await publish_events(wenv.bootstrap, wenv.input, events)
    engine = SlowEngine(delay_s=0.1)
    settings = wenv.settings(batch={"max_in_flight": 1, "max_size": 2, "max_wait_ms": 0},
                             kafka={"max_poll_records": 30})
    async with Collector(wenv.bootstrap, wenv.output) as out:
        running = await RunningWorker(settings, engine).start()
        w = running.worker
        await out.wait_count(2)
        queued_at_stop = len(w.batcher)
        code = await running.stop()
        assert code == 0
        consumed = metric(w, "signal_worker_candles_total", {"kind": "final"})
        forecasts = metric(w, "signal_worker_forecasts_total")
        skipped = metric(w, "signal_worker_skipped_total", {"reason": "insufficient_history"})
        assert queued_at_stop > 0, "the stop came after the backlog was done"
        assert forecasts + skipped == consumed, "every consumed candle must be finished before the exit"
        await out.settle(quiet_s=0.5)
        assert len(out.records) == forecasts

    committed = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)
    assert sum(c or 0 for c in committed.values()) == consumed  # committed == consumed, per partition prefix
    done = {(ev.symbol, ev.open_time) for ev, m in zip(events, metas, strict=True)
            if committed[m.partition] is not None and m.offset < committed[m.partition]}
    assert set(out.bars()) == done & forecastable(events, 8)

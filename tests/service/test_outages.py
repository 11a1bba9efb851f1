"""Broker outages with real faults: a black-holed broker (FaultProxy), an unreachable bootstrap, a
produce error no retry can fix."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from schemas import decode_dead_letter, encode_candle
from worker.dev.embedded import create_topics, free_port
from worker.dev.proxy import FaultProxy, ProxiedBroker
from worker.dev.raw_records import send_with_binary_header_key
from worker.errors import PublishFailed
from worker.model.forecaster import ForecastRequest
from worker.observability.metrics import Metrics
from worker.service.engine import EngineResult, TrivialEngine
from worker.service.publisher import Publisher
from worker.settings import KafkaSettings
from worker.transport.producer import OutRecord, RecordProducer

from .conftest import (
    HORIZONS_MS,
    TF_MS,
    Collector,
    RunningWorker,
    eventually,
    forecastable,
    interleave,
    make_env,
    metric,
    needs_model,
    publish_events,
    synthetic_events,
    trivial_engine,
    wait_all_committed,
)

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_MS = 6000


@pytest.fixture
def proxied() -> Iterator[ProxiedBroker]:
    """An own broker whose every connection goes through a FaultProxy (its topics survive faults)."""
    with ProxiedBroker(startup_timeout_s=60.0) as broker:
        yield broker


class SlowEngine(TrivialEngine):
    def __init__(self, delay_s: float) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS)
        self.delay_s = delay_s

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        time.sleep(self.delay_s)
        return super().process(requests)


async def test_broker_black_holed_for_twice_the_request_timeout(proxied: ProxiedBroker, redis_url: str) -> None:
    """The worker stays up, reports not ready while it cannot publish, and afterwards every bar is
    forecast (publishes that expired after request_timeout_ms are retried, not fatal)."""
    env = await make_env(proxied, redis_url, partitions=2)
    assert proxied.proxy is not None
    symbols = ["BHA", "BHB", "BHC"]
    events = interleave([synthetic_events(s, 30) for s in symbols])
    engine = SlowEngine(delay_s=0.3)
    expected = forecastable(events, engine.window_bars)
    settings = env.settings(kafka={"request_timeout_ms": REQUEST_TIMEOUT_MS, "retry_max_backoff_s": 1.0},
                            batch={"max_size": 4, "max_wait_ms": 0, "max_in_flight": 1})
    async with Collector(env.bootstrap, env.output) as out:
        running = await RunningWorker(settings, engine).start()
        w = running.worker
        await eventually(lambda: w.readiness_detail()[0], "ready")
        await publish_events(env.bootstrap, env.input, events)
        await out.wait_count(3)
        proxied.proxy.blackhole()
        outage_started = time.monotonic()
        await eventually(lambda: not w.readiness_detail()[0], "not ready during the outage", timeout=15)
        await asyncio.sleep(2 * REQUEST_TIMEOUT_MS / 1000 - (time.monotonic() - outage_started) + 0.5)
        assert running.task is not None and not running.task.done(), "the worker exited during the outage"
        assert not w.readiness_detail()[0], w.readiness_detail()
        assert w.publisher.retries >= 1, "a publish must have expired and been retried"
        proxied.proxy.heal()
        await out.wait_for(lambda: set(out.bars()) >= expected, "every bar forecast after the outage", timeout=120)
        await eventually(lambda: w.readiness_detail()[0], "ready again", timeout=60)
        await eventually(lambda: w.tracker.pending_count() == 0, "every record done")
        assert metric(w, "signal_worker_broker_errors_total") >= 1
        code = await running.stop()
        assert code == 0


async def test_non_retriable_publish_error_names_topic_and_setting(broker) -> None:  # type: ignore[no-untyped-def]
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, max_request_bytes=98_304)
    outages: list[bool] = []
    async with RecordProducer(settings) as producer:
        publisher = Publisher(producer, Metrics(), max_backoff_s=0.5, stall_after_s=5, on_outage=outages.append)
        with pytest.raises(PublishFailed, match="SIGNAL_WORKER_KAFKA__MAX_REQUEST_BYTES") as err:
            await publisher.publish("too-big", [OutRecord(b"K", b"x" * 200_000, [])],
                                    setting="SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC", wanted=lambda: True)
    assert "'too-big'" in str(err.value) and "SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC" in str(err.value)
    assert outages == [] and publisher.retries == 0  # never retried


async def test_a_publish_retry_drops_the_records_no_longer_kept(proxied: ProxiedBroker) -> None:
    """The broker black-holed mid-publish; while the publisher retries, one record's partition is
    revoked (``keep`` says no). The retry after the heal sends only the other: resending the revoked
    one would race its new owner with a duplicate. (The connections are reset before the heal, as a
    broken link's are, so the first attempt's bytes held in the proxy never reach the broker.)"""
    assert proxied.proxy is not None
    await create_topics(proxied.direct_bootstrap, {"kept": 2})
    settings = KafkaSettings(bootstrap_servers=proxied.bootstrap, request_timeout_ms=1500)
    moved, stays = OutRecord(b"MOVED", b"moved", []), OutRecord(b"STAYS", b"stays", [])
    revoked = False
    async with RecordProducer(settings) as producer:
        publisher = Publisher(producer, Metrics(), max_backoff_s=0.5, stall_after_s=30, on_outage=lambda _: None)
        await publisher.publish("kept", [OutRecord(b"WARM", b"warm", [])], setting="S", wanted=lambda: True)
        proxied.proxy.blackhole()

        async def revoke_then_heal() -> None:
            nonlocal revoked
            await eventually(lambda: publisher.retries >= 1, "the first attempt failed", timeout=30)
            revoked = True
            proxied.proxy.reset()
            proxied.proxy.heal()

        healer = asyncio.create_task(revoke_then_heal())
        ok = await asyncio.wait_for(publisher.publish(
            "kept", [moved, stays], setting="S", wanted=lambda: True,
            keep=lambda r: not (revoked and r is moved)), 60)
        await healer
    assert ok
    async with Collector(proxied.direct_bootstrap, "kept") as topic:
        await topic.settle(quiet_s=1.0)
        values = sorted(r.value for r in topic.records)
    assert values == [b"stays", b"warm"], values


@needs_model
async def test_start_up_with_the_broker_unreachable_exits_with_one_clear_line(  # type: ignore[no-untyped-def]
        broker, redis_url, spawn) -> None:
    env = await make_env(broker, redis_url, partitions=1)
    dead = f"127.0.0.1:{free_port()}"
    proc = spawn(env.subprocess_env(SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS=dead,
                                    SIGNAL_WORKER_KAFKA__BOOTSTRAP_TIMEOUT_S="4",
                                    SIGNAL_WORKER_KAFKA__RETRY_MAX_BACKOFF_S="1"), name="unreachable")
    code = await proc.wait(timeout=120)
    log = proc.log()
    assert code == 2, log[-3000:]
    retries = proc.events("kafka_connect_retry")
    final = proc.events("kafka_unreachable")
    assert len(retries) >= 2 and all(dead in r["bootstrap_servers"] for r in retries), log[-3000:]
    assert len(final) == 1 and final[0]["setting"] == "SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS"
    assert "SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS" in final[0]["message"]
    assert "Traceback" not in log and "Unclosed" not in log, log[-3000:]
    assert proc.events("worker_stopped")[0]["exit_code"] == 2


async def test_connections_reset_mid_stream_lose_nothing(proxied: ProxiedBroker, redis_url: str) -> None:
    """Every broker connection reset (RST) three times while forecasting: aiokafka reconnects,
    failed sends are retried, every bar is forecast, the worker never exits."""
    env = await make_env(proxied, redis_url, partitions=2)
    assert proxied.proxy is not None
    events = interleave([synthetic_events(s, 30) for s in ("RSA", "RSB")])
    engine = SlowEngine(delay_s=0.1)
    expected = forecastable(events, engine.window_bars)
    settings = env.settings(kafka={"request_timeout_ms": REQUEST_TIMEOUT_MS, "retry_max_backoff_s": 0.5},
                            batch={"max_size": 2, "max_wait_ms": 0, "max_in_flight": 1})
    async with Collector(env.bootstrap, env.output) as out:
        running = await RunningWorker(settings, engine).start()
        await publish_events(env.bootstrap, env.input, events)
        for _ in range(3):
            await out.wait_count(len(out.records) + 2, timeout=60)
            proxied.proxy.reset()
        await out.wait_for(lambda: set(out.bars()) >= expected, "every bar forecast", timeout=120)
        assert running.task is not None and not running.task.done()
        assert await running.stop() == 0


@contextlib.asynccontextmanager
async def served_past_one_unreadable_record(env: Any, engine: Any, expected: set[tuple[str, int]],
                                            metas: Sequence[Any], what: str) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A worker run until every good bar is forecast, one dead letter is out and the commits reach
    the end of ``metas``; each good bar forecast once (nothing lost, nothing replayed twice). Yields
    the running worker and the dead letters."""
    async with (
        Collector(env.bootstrap, env.output) as out,
        Collector(env.bootstrap, env.dlq) as dlq,
        RunningWorker(env.settings(), engine) as w,
    ):
        await out.wait_for(lambda: set(out.bars()) >= expected, "every good bar forecast")
        await dlq.wait_count(1)
        await wait_all_committed(env, metas, what)
        await out.settle(quiet_s=0.5)
        assert sorted(out.bars()) == sorted(expected)
        yield w, [decode_dead_letter(r.value) for r in dlq.records]


async def test_a_batch_failing_its_crc_check_is_dead_lettered_and_everything_else_served(
        proxied: ProxiedBroker, redis_url: str) -> None:
    """The proxy damages one record batch in every fetch response (a bad log segment, as the client
    sees it). aiokafka raises on it for ever, and drops the records it had drained with it. The
    worker steps past it: its offset goes to the dead-letter topic as ``corrupt_record``, every
    other bar (before and after it on its partition, and the other partition's) is forecast once,
    the commits reach the end, and the worker is ready and running."""
    env = await make_env(proxied, redis_url, partitions=2)
    assert proxied.proxy is not None
    events = interleave([synthetic_events(s, 12) for s in ("GOODA", "GOODB", "GOODC")])
    engine = trivial_engine()
    expected = forecastable(events, engine.window_bars)
    bad_bar = synthetic_events("CRCBAD", 1)[0]
    half = len(events) // 2
    metas = await publish_events(env.bootstrap, env.input, events[:half])
    bad_meta = (await publish_events(env.bootstrap, env.input, [bad_bar]))[0]  # a batch of its own
    metas += await publish_events(env.bootstrap, env.input, events[half:])
    proxied.proxy.corrupt(b"CRCBAD", b"CRCBAE")
    async with served_past_one_unreadable_record(env, engine, expected, [*metas, bad_meta],
                                                 "commits past the corrupt batch") as (w, letters):
        assert [(d.reason, d.partition, d.offset) for d in letters] == [
            ("corrupt_record", bad_meta.partition, bad_meta.offset)]
        assert "CRC" in letters[0].detail and letters[0].original == b""
        assert metric(w, "signal_worker_dead_letters_total", {"reason": "corrupt_record"}) == 1
        assert w.readiness_detail()[0]
    assert proxied.proxy.corrupted > 3  # the fault was injected on every refetch


async def test_a_record_whose_header_key_is_not_utf8_is_dead_lettered_and_everything_else_served(
        broker: Any, redis_url: str) -> None:
    """Another client's record with a binary header name (valid batch and CRC, on the real broker):
    aiokafka raises UnicodeDecodeError for it on every fetch, which used to end the worker at that
    offset on every restart. Its offset goes to the dead-letter topic as ``corrupt_record``; every
    other bar, before and after it on its partition, is forecast once; commits reach the end."""
    env = await make_env(broker, redis_url, partitions=2)
    events = interleave([synthetic_events(s, 12) for s in ("GOODA", "GOODB")])
    engine = trivial_engine()
    expected = forecastable(events, engine.window_bars)
    half = len(events) // 2
    metas = await publish_events(env.bootstrap, env.input, events[:half])
    bad_partition, bad_offset = await send_with_binary_header_key(
        env.bootstrap, env.input, encode_candle(synthetic_events("GOODA", 13)[-1]), key=b"GOODA")
    metas += await publish_events(env.bootstrap, env.input, events[half:])
    assert bad_partition in {m.partition for m in metas[half:]}  # good records follow it on its partition
    async with served_past_one_unreadable_record(env, engine, expected, metas,
                                                 "commits past the unreadable record") as (w, letters):
        assert [(d.reason, d.partition, d.offset) for d in letters] == [("corrupt_record", bad_partition, bad_offset)]
        assert "header key is not UTF-8" in letters[0].detail
        assert w.readiness_detail()[0]


@dataclass
class RedisOutage:
    """A running worker whose Redis (behind ``proxy``) stopped answering after its first bars were
    forecast, with the rest of the bars published into the outage."""

    proxy: FaultProxy
    env: Any
    worker: Any
    out: Collector
    expected: set[tuple[str, int]]  # every bar, before and during the outage


@contextlib.asynccontextmanager
async def redis_outage(broker: Any, own_redis: Any, symbols: tuple[str, str]) -> AsyncIterator[RedisOutage]:
    with FaultProxy(own_redis.host, own_redis.port) as proxy:
        env = await make_env(broker, f"redis://127.0.0.1:{proxy.port}/0", partitions=2)
        per_symbol = [synthetic_events(s, 24) for s in symbols]
        before = interleave([e[:12] for e in per_symbol])
        during = interleave([e[12:] for e in per_symbol])
        engine = SlowEngine(delay_s=0.0)
        expected = forecastable(before + during, engine.window_bars)
        settings = env.settings(redis={"socket_timeout_s": 1.0, "retry_max_backoff_s": 0.5})
        async with Collector(env.bootstrap, env.output) as out, RunningWorker(settings, engine) as w:
            await eventually(lambda: w.readiness_detail()[0], "ready")
            await publish_events(env.bootstrap, env.input, before)
            await out.wait_for(lambda: set(out.bars()) >= forecastable(before, 8), "forecasts before")
            proxy.blackhole()
            await publish_events(env.bootstrap, env.input, during)
            yield RedisOutage(proxy, env, w, out, expected)


async def test_redis_black_holed_pauses_and_resumes_without_a_rebuild(broker, own_redis) -> None:  # type: ignore[no-untyped-def]
    """Redis behind a FaultProxy stops answering (its keys are kept): window writes time out, the
    worker pauses and is not ready; after the heal it resumes where it was — no rebuild, since the
    epoch marker is still there — and every bar is forecast."""
    async with redis_outage(broker, own_redis, ("RBA", "RBB")) as o:
        w, out = o.worker, o.out
        await eventually(lambda: not w.readiness_detail()[0], "not ready while Redis hangs", timeout=30)
        await eventually(lambda: metric(w, "signal_worker_paused_partitions") > 0, "paused", timeout=30)
        o.proxy.heal()
        await out.wait_for(lambda: set(out.bars()) >= o.expected, "every bar forecast after the heal")
        await eventually(lambda: w.readiness_detail()[0], "ready again")
        assert w.restores == [] or all(r["records"] == 0 for r in w.restores)


async def test_a_rebalance_during_a_redis_outage_resumes_once_redis_returns(broker, own_redis) -> None:  # type: ignore[no-untyped-def]
    """Redis stops answering with candle writes pending; a second member joins and leaves the
    group, so every partition is revoked (the pending candles dropped) and assigned back paused.
    With nothing left to write, no write could find Redis back: the worker stayed paused for good,
    /readyz blaming a healthy Redis. It must ask Redis itself and forecast every bar."""
    from aiokafka import AIOKafkaConsumer

    async with redis_outage(broker, own_redis, ("RRA", "RRB")) as o:
        w, out, env = o.worker, o.out, o.env
        await eventually(lambda: len(w._pending) > 0 and "redis" in w._paused_for, "paused with writes pending",
                         timeout=30)
        other = AIOKafkaConsumer(env.input, bootstrap_servers=env.bootstrap, group_id=env.group,
                                 enable_auto_commit=False)
        await other.start()
        try:
            await eventually(lambda: len(w.consumer.assignment()) < 2, "partitions split", timeout=60)
            other.pause(*other.assignment())
        finally:
            await other.stop()
        await eventually(lambda: len(w.consumer.assignment()) == 2, "partitions back", timeout=60)
        assert not w._pending  # what made the old worker wait for a write that never came
        o.proxy.heal()
        await out.wait_for(lambda: set(out.bars()) >= o.expected, "every bar forecast after the heal", timeout=60)
        await eventually(lambda: w.readiness_detail()[0], "ready again")


class RejectingEngine(TrivialEngine):
    """Rejects every bar (it wants more history than there is), so records complete without a
    publish: a commit is due while the broker is away. Holds its first batch until released."""

    def __init__(self) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS, window_bars=60)
        self.holding = threading.Event()
        self.release = threading.Event()

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        self.holding.set()
        self.release.wait(60)
        return super().process(requests)


async def test_stop_while_a_commit_waits_on_an_unreachable_broker_exits_in_bounded_time(
    proxied: ProxiedBroker, redis_url: str
) -> None:
    """aiokafka retries a commit while the coordinator is unreachable, with no end: the consume
    loop hung there for the whole outage and a SIGTERM was not honoured (Kubernetes would SIGKILL
    it). Each commit is now bounded by request_timeout_ms and counted as a failed commit."""
    env = await make_env(proxied, redis_url, partitions=1)
    assert proxied.proxy is not None
    engine = RejectingEngine()
    settings = env.settings(kafka={"request_timeout_ms": REQUEST_TIMEOUT_MS, "retry_max_backoff_s": 1.0},
                            service={"shutdown_grace_s": 3.0})
    running = await RunningWorker(settings, engine).start()
    w = running.worker
    try:
        await eventually(lambda: w.readiness_detail()[0], "ready")
        await publish_events(env.bootstrap, env.input, synthetic_events("CMA", 10))
        await eventually(engine.holding.is_set, "sampling")
        proxied.proxy.blackhole()
        await asyncio.sleep(0.5)
        engine.release.set()
        await eventually(lambda: w.tracker.pending_count() == 0, "records done (skipped)")
        await asyncio.sleep(1.0)  # the consume loop is in a commit by now
        t0 = time.monotonic()
        w.request_stop()
        # a periodic commit and the final one, each at most request_timeout_ms, then the grace
        bound = 2 * REQUEST_TIMEOUT_MS / 1000 + 3.0 + 5.0
        await asyncio.wait_for(asyncio.shield(running.task), bound)
        print(f"exited {time.monotonic() - t0:.1f} s after the stop request (bound {bound:g} s)")
        assert metric(w, "signal_worker_broker_errors_total") >= 1
    finally:
        proxied.proxy.heal()
        engine.release.set()
        await running.stop()

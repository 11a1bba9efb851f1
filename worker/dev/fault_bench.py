"""Measure what each fault costs the worker, with real faults: ``python -m worker.dev.fault_bench``.

Scenarios (each on its own embedded broker and Redis, the worker in process with the trivial engine
so the figures are the service's, not the model's):

* ``poison``: 2,000 malformed records of every kind interleaved with good candles.
* ``blackhole``: the broker black-holed (FaultProxy) for 2 x ``request_timeout_ms`` mid-stream.
* ``redis``: Redis restarted empty mid-stream (persistence off), windows rebuilt from the topic.
* ``rebalance``: a second worker joins and leaves mid-stream.
* ``redis-large`` (not in the default set): the ``redis`` scenario with 200 symbols x 300 bars.

For each: bars expected, forecast, lost, duplicates (same idempotency key twice), dead letters by
reason, and the times that matter (recovery, rebuild). Prints one JSON document with the machine and
the date; ``docs/reliability.md`` quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas import CandleEvent, decode_dead_letter, decode_forecast, encode_candle
from schemas.headers import IDEMPOTENCY_KEY, candle_headers, header_value
from worker.dev.embedded import EmbeddedBroker, EmbeddedRedis, create_topics
from worker.dev.proxy import ProxiedBroker
from worker.model.forecaster import ForecastRequest
from worker.service.app import SignalWorker
from worker.service.engine import EngineResult, TrivialEngine
from worker.settings import Settings, load_settings

TF_MS = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01, a whole hour
WINDOW_BARS = 8


class _SlowEngine(TrivialEngine):
    """The trivial engine plus a fixed sampling time, so a fault lands while batches are in flight."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(timeframe_ms=TF_MS, horizons_ms=[TF_MS, 4 * TF_MS], window_bars=WINDOW_BARS)
        self.delay_s = delay_s

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        time.sleep(self.delay_s)
        return super().process(requests)


def _events(symbol: str, n: int) -> list[CandleEvent]:
    rng = random.Random(symbol)
    close, out = 1.1 + rng.random(), []
    for i in range(n):
        o = close
        close = o * math.exp(rng.gauss(0, 0.002))
        out.append(CandleEvent(symbol=symbol, timeframe="1h", open_time=T0 + i * TF_MS, open=o,
                               high=max(o, close) * 1.0005, low=min(o, close) * 0.9995, close=close,
                               volume=float(rng.randint(1, 1000)), is_final=True))
    return out


def _interleave(per_symbol: Sequence[Sequence[CandleEvent]]) -> list[CandleEvent]:
    return [s[i] for i in range(max(map(len, per_symbol))) for s in per_symbol if i < len(s)]


def _forecastable(events: Sequence[CandleEvent]) -> set[tuple[str, int]]:
    seen: Counter[str] = Counter()
    out = set()
    for ev in events:
        seen[ev.symbol] += 1
        if seen[ev.symbol] >= WINDOW_BARS:
            out.add((ev.symbol, ev.open_time))
    return out


def _keyed(events: Sequence[CandleEvent]) -> list[tuple[bytes | None, bytes]]:
    return [(e.symbol.encode(), encode_candle(e)) for e in events]


async def _publish(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all",
                                max_request_size=2_000_000, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k, headers=candle_headers()) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class _Tail:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self._bars: list[tuple[str, int]] = []
        self._consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                          auto_offset_reset="earliest", fetch_max_wait_ms=100)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Tail:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            for recs in (await self._consumer.getmany(timeout_ms=100)).values():
                self.records.extend(recs)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def bars(self) -> list[tuple[str, int]]:
        # Decoded once each (strictly), so polling does not steal the worker's CPU in this process.
        for r in self.records[len(self._bars):]:
            m = decode_forecast(r.value)
            self._bars.append((m.symbol, m.open_time))
        return self._bars

    def duplicates(self) -> int:
        keys = Counter(header_value(list(r.headers), IDEMPOTENCY_KEY) for r in self.records)
        return sum(n - 1 for n in keys.values() if n > 1)


async def _until(pred: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``pred`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    return None


def _settings(bootstrap: str, redis_url: str, tag: str, **kafka: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": bootstrap, "input_topic": f"candles-{tag}", "output_topic": f"forecasts-{tag}",
               "dead_letter_topic": f"dlq-{tag}", "consumer_group": f"g-{tag}", **kafka},
        redis={"url": redis_url, "key_prefix": f"fb{tag}", "socket_timeout_s": 2.0, "retry_max_backoff_s": 1.0},
        window={"timeframe": "1h", "conflate": False, "length": 128},
        batch={"max_size": 16, "max_wait_ms": 5, "max_in_flight": 2},
        service={"metrics_port": 0, "host": "127.0.0.1", "worker_id": f"bench-{tag}", "shutdown_grace_s": 60.0},
    )


async def _topics(bootstrap: str, tag: str, partitions: int = 4) -> None:
    await create_topics(bootstrap, {f"candles-{tag}": partitions, f"forecasts-{tag}": 2, f"dlq-{tag}": 1})


def _summary(expected: set[tuple[str, int]], tail: _Tail, **extra: Any) -> dict[str, Any]:
    got = set(tail.bars())
    return {"bars_expected": len(expected), "bars_forecast": len(got & expected),
            "forecasts_lost": len(expected - got), "duplicates": tail.duplicates(), **extra}


# --------------------------------------------------------------------------------------- scenarios
async def poison(n_bad: int = 2000) -> dict[str, Any]:
    fut = (int(time.time() * 1000) // TF_MS + 48) * TF_MS
    base = {"schema_version": 1, "symbol": "BAD", "timeframe": "1h", "open_time": T0, "open": 1.1, "high": 1.12,
            "low": 1.09, "close": 1.11, "volume": 5.0, "is_final": True}
    nested: list[Any] = []
    node = nested
    for _ in range(1000):
        node.append([])
        node = node[0]

    def bad(**changes: Any) -> bytes:
        return msgpack.packb({**base, **changes})

    kinds: list[tuple[bytes | None, bytes, str]] = [
        (b"BAD", b"\xc1\xff garbage", "undecodable"), (b"BAD", msgpack.packb([1, 2]), "undecodable"),
        (b"BAD", bad(symbol=nested), "undecodable"), (b"BAD", bad(close=float("nan")), "non_finite"),
        (b"BAD", bad(low=0.0), "non_positive_price"), (b"BAD", bad(high=1.105), "inconsistent_ohlc"),
        (b"BAD", bad(open_time=T0 + 60_000), "misaligned_open_time"), (b"BAD", bad(timeframe="5m"),
                                                                       "timeframe_mismatch"),
        (b"bad/sym", bad(symbol="bad/sym"), "invalid_symbol"), (b"BAD", bad(pad="x" * 5000), "oversized"),
        (b"OTHER", bad(), "key_mismatch"), (None, bad(), "key_mismatch"), (b"BAD", bad(schema_version=2),
                                                                           "unsupported_version"),
        (b"BAD", bad(volume=True), "schema"), (b"BAD", bad(open_time=fut), "future_open_time"),
        (b"BAD", bad(pad="x" * 1_048_450), "oversized"),
    ]
    good = _interleave([_events(f"PZ{i}", 60) for i in range(8)])
    records: list[tuple[bytes | None, bytes]] = []
    want: Counter[str] = Counter()
    g = 0
    for i in range(n_bad):
        key, value, reason = kinds[i % (len(kinds) - 1)] if i else kinds[-1]  # one 1 MiB record, first
        records.append((key, value))
        want[reason] += 1
        if i % 4 == 0 and g < len(good):
            records.append((good[g].symbol.encode(), encode_candle(good[g])))
            g += 1
    records += [(ev.symbol.encode(), encode_candle(ev)) for ev in good[g:]]
    expected = _forecastable(good)
    tag = uuid.uuid4().hex[:8]
    with EmbeddedBroker(startup_timeout_s=60) as broker, EmbeddedRedis(startup_timeout_s=60) as redis:
        await _topics(broker.bootstrap, tag)
        worker = SignalWorker(_settings(broker.bootstrap, redis.url, tag), _SlowEngine(0.0))
        async with _Tail(broker.bootstrap, f"forecasts-{tag}") as out, _Tail(broker.bootstrap, f"dlq-{tag}") as dlq:
            task = asyncio.create_task(worker.run(install_signals=False))
            await _until(lambda: bool(worker.ledger.owned()), 60)
            started = time.monotonic()
            await _publish(broker.bootstrap, f"candles-{tag}", records)
            done = await _until(lambda: set(out.bars()) >= expected and len(dlq.records) >= n_bad, 300)
            seconds = time.monotonic() - started
            await asyncio.sleep(1.0)
            got = Counter(decode_dead_letter(r.value).reason.value for r in dlq.records)
            worker.request_stop()
            code = await task
            return _summary(expected, out, malformed=n_bad, dead_lettered=sum(got.values()),
                            dead_lettered_with_expected_reason=sum(min(got[r], n) for r, n in want.items()),
                            by_reason=dict(sorted(got.items())), records=len(records),
                            seconds_to_process_all=round(seconds, 2) if done is not None else None, exit_code=code)


async def blackhole(request_timeout_ms: int = 6000) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    events = _interleave([_events(f"BH{i}", 120) for i in range(6)])
    expected = _forecastable(events)
    with ProxiedBroker(startup_timeout_s=60) as broker, EmbeddedRedis(startup_timeout_s=60) as redis:
        assert broker.proxy is not None
        await _topics(broker.bootstrap, tag)
        settings = _settings(broker.bootstrap, redis.url, tag, request_timeout_ms=request_timeout_ms,
                             retry_max_backoff_s=1.0)
        worker = SignalWorker(settings, _SlowEngine(0.05))
        async with _Tail(broker.bootstrap, f"forecasts-{tag}") as out:
            task = asyncio.create_task(worker.run(install_signals=False))
            await _until(lambda: worker.readiness_detail()[0], 60)
            await _publish(broker.bootstrap, f"candles-{tag}", _keyed(events))
            await _until(lambda: len(out.records) >= 50, 60)
            broker.proxy.blackhole()
            t0 = time.monotonic()
            not_ready_after = await _until(lambda: not worker.readiness_detail()[0], 30)
            await asyncio.sleep(max(0.0, 2 * request_timeout_ms / 1000 - (time.monotonic() - t0)))
            alive = not task.done()
            ready_during = worker.readiness_detail()[0]
            broker.proxy.heal()
            healed = time.monotonic()
            all_done = await _until(lambda: set(out.bars()) >= expected, 300)
            ready_again = await _until(lambda: worker.readiness_detail()[0], 120)
            await asyncio.sleep(1.0)
            worker.request_stop()
            code = await task
            return _summary(expected, out, outage_s=round(healed - t0, 2), request_timeout_ms=request_timeout_ms,
                            alive_through_outage=alive, ready_during_outage=ready_during,
                            not_ready_after_s=None if not_ready_after is None else round(not_ready_after, 2),
                            publish_retries=worker.publisher.retries,
                            all_forecast_after_heal_s=None if all_done is None else round(all_done, 2),
                            ready_after_heal_s=None if ready_again is None else round(ready_again, 2), exit_code=code)


async def redis_restart(symbols: int = 20, bars: int = 200, during: int = 50) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    per_symbol = [_events(f"RR{i:03d}", bars) for i in range(symbols)]
    before = _interleave([e[: bars - during] for e in per_symbol])
    after = _interleave([e[bars - during :] for e in per_symbol])
    expected = _forecastable(_interleave(per_symbol))
    with EmbeddedBroker(startup_timeout_s=60) as broker, EmbeddedRedis(startup_timeout_s=60) as redis:
        await _topics(broker.bootstrap, tag)
        worker = SignalWorker(_settings(broker.bootstrap, redis.url, tag), _SlowEngine(0.0))
        async with _Tail(broker.bootstrap, f"forecasts-{tag}") as out:
            task = asyncio.create_task(worker.run(install_signals=False))
            await _until(lambda: worker.readiness_detail()[0], 60)
            await _publish(broker.bootstrap, f"candles-{tag}", _keyed(before))
            await _until(lambda: set(out.bars()) >= _forecastable(before) and not worker.tracker.pending_count(), 600)
            redis.stop()
            await _publish(broker.bootstrap, f"candles-{tag}", _keyed(after))
            await asyncio.sleep(2.0)
            redis.start()  # same port, empty
            back = time.monotonic()
            done = await _until(lambda: set(out.bars()) >= expected, 300)
            await asyncio.sleep(1.0)
            worker.request_stop()
            code = await task
            return _summary({b for b in expected if b[1] >= after[0].open_time}, out,
                            bars_before_outage=len(before), bars_during_outage=len(after),
                            restores=worker.restores,
                            all_forecast_after_redis_back_s=None if done is None else round(done, 2),
                            redis_back_to_rebuilt_s=round(time.monotonic() - back, 2) if done is None else None,
                            exit_code=code)


async def rebalance() -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    events = _interleave([_events(f"RB{i}", 90) for i in range(8)])
    expected = _forecastable(events)
    third = len(events) // 3
    with EmbeddedBroker(startup_timeout_s=60) as broker, EmbeddedRedis(startup_timeout_s=60) as redis:
        await _topics(broker.bootstrap, tag)
        settings = _settings(broker.bootstrap, redis.url, tag)
        a = SignalWorker(settings, _SlowEngine(0.05))
        b = SignalWorker(settings.model_copy(update={"service": settings.service.model_copy(
            update={"worker_id": f"bench-{tag}-b"})}), _SlowEngine(0.05))
        async with _Tail(broker.bootstrap, f"forecasts-{tag}") as out:
            ta = asyncio.create_task(a.run(install_signals=False))
            await _until(lambda: a.readiness_detail()[0], 60)
            await _publish(broker.bootstrap, f"candles-{tag}", _keyed(events[:third]))
            tb = asyncio.create_task(b.run(install_signals=False))
            await _until(lambda: bool(b.ledger.owned()), 60)
            await _publish(broker.bootstrap, f"candles-{tag}",
                           _keyed(events[third : 2 * third]))
            await asyncio.sleep(1.0)
            b.request_stop()
            code_b = await tb
            await _publish(broker.bootstrap, f"candles-{tag}", _keyed(events[2 * third :]))
            done = await _until(lambda: set(out.bars()) >= expected, 300)
            await asyncio.sleep(1.0)
            a.request_stop()
            code_a = await ta
            return _summary(expected, out, all_forecast_s=None if done is None else round(done, 2),
                            exit_codes=[code_a, code_b])


async def redis_restart_large() -> dict[str, Any]:
    """200 symbols x 300 bars before the loss (60,000 records), a 128-bar window: the rebuild's cost."""
    return await redis_restart(symbols=200, bars=300, during=20)


SCENARIOS = {"poison": poison, "blackhole": blackhole, "redis": redis_restart, "rebalance": rebalance,
             "redis-large": redis_restart_large}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    from worker.observability.logging import configure_logging

    configure_logging("json", os.environ.get("FAULT_BENCH_LOG_LEVEL", "critical"))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
    }
    for name in args.scenarios or [n for n in SCENARIOS if n != "redis-large"]:
        result[name] = asyncio.run(SCENARIOS[name]())
        print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

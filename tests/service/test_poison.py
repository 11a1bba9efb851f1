"""Poison records at volume, Kafka's "no timestamp", and identities checked at start-up."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaProducer

from schemas import decode_dead_letter, encode_candle
from schemas.headers import candle_headers
from worker.errors import ConfigError
from worker.settings import load_settings

from .conftest import (
    Collector,
    RunningWorker,
    WorkerEnv,
    eventually,
    forecastable,
    interleave,
    metric,
    publish_raw,
    synthetic_events,
    trivial_engine,
    wait_all_committed,
)
from .test_dead_letters import BAD_RECORDS

pytestmark = pytest.mark.integration


def _kinds() -> list[tuple[str, bytes | None, bytes, str]]:
    """One record of every kind of bad input; the 1 MiB one swapped for a small oversized one so
    that thousands of them stay cheap to publish (the 1 MiB case has its own test)."""
    return [k for k in BAD_RECORDS if len(k[2]) < 100_000] + [
        ("oversized, small", b"BADSYM", msgpack.packb({"padding": "x" * 5000}), "oversized")]


async def test_2000_malformed_records_interleaved_with_good_candles(wenv: WorkerEnv) -> None:
    """The target of docs/reliability.md: 100 % of the bad records dead-lettered with their reason,
    every good candle forecast, every offset committed, the worker never stopped."""
    kinds = _kinds()
    good = interleave([synthetic_events(s, 40) for s in ("PZA", "PZB", "PZC", "PZD")])
    engine = trivial_engine()
    expected = forecastable(good, engine.window_bars)
    records: list[tuple[bytes | None, bytes]] = []
    want: Counter[str] = Counter()
    n_bad, g = 2000, 0
    for i in range(n_bad):
        _, key, value, reason = kinds[i % len(kinds)]
        records.append((key, value))
        want[reason] += 1
        if i % 12 == 0 and g < len(good):  # good candles spread through the bad ones
            records.append((good[g].symbol.encode(), encode_candle(good[g])))
            g += 1
    records += [(ev.symbol.encode(), encode_candle(ev)) for ev in good[g:]]
    async with (
        Collector(wenv.bootstrap, wenv.output) as out,
        Collector(wenv.bootstrap, wenv.dlq) as dlq,
        RunningWorker(wenv.settings(), engine) as w,
    ):
        metas = await publish_raw(wenv.bootstrap, wenv.input, records)
        await out.wait_for(lambda: set(out.bars()) >= expected, "every good bar forecast")
        await dlq.wait_count(n_bad)
        await wait_all_committed(wenv, metas, "every offset committed")
        await dlq.settle(quiet_s=0.5)
        got = Counter(decode_dead_letter(r.value).reason.value for r in dlq.records)
        assert got == want
        assert sorted(out.bars()) == sorted(expected)
        for reason, n in want.items():
            assert metric(w, "signal_worker_dead_letters_total", {"reason": reason}) == n
        assert w.readiness_detail()[0], w.readiness_detail()


async def _publish_without_timestamp(bootstrap: str, topic: str,
                                     records: list[tuple[bytes | None, bytes]]) -> None:
    """Records with Kafka timestamp -1 ("no timestamp"), which brokers accept."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=candle_headers(), timestamp_ms=-1)
                   for key, value in records]
        metas = await asyncio.gather(*futures)
        assert all(m.timestamp == -1 for m in metas)
    finally:
        await producer.stop()


async def test_records_without_timestamp_are_forecast_and_dead_lettered(wenv: WorkerEnv) -> None:
    good = synthetic_events("NOTS", 12)
    engine = trivial_engine()
    expected = forecastable(good, engine.window_bars)
    bad: dict[str, Any] = {**good[0].model_dump(), "low": 0.0}
    started = int(time.time() * 1000)
    async with (
        Collector(wenv.bootstrap, wenv.output) as out,
        Collector(wenv.bootstrap, wenv.dlq) as dlq,
        RunningWorker(wenv.settings(), engine) as w,
    ):
        records: list[tuple[bytes | None, bytes]] = [(b"NOTS", encode_candle(ev)) for ev in good]
        records.append((b"NOTS", msgpack.packb(bad)))
        await _publish_without_timestamp(wenv.bootstrap, wenv.input, records)
        await out.wait_for(lambda: set(out.bars()) >= expected, "every bar forecast")
        await dlq.wait_count(1)
        dl = decode_dead_letter(dlq.records[0].value)
        assert dl.reason.value == "non_positive_price" and dl.record_timestamp is None
        # Forecasts decode strictly (done by out.bars()); the arrival time stands in for ingest_time.
        assert all(m.ingest_time >= started for m in out.forecasts())
        await eventually(lambda: w.tracker.pending_count() == 0, "every record done")


@pytest.mark.parametrize("worker_id", ["", "   ", "tab\tid"])
def test_unusable_worker_id_is_rejected_at_start_up(worker_id: str) -> None:
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_SERVICE__WORKER_ID"):
        load_settings(service={"worker_id": worker_id})


def test_producer_request_size_must_hold_the_largest_dead_letter() -> None:
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_KAFKA__MAX_REQUEST_BYTES"):
        load_settings(kafka={"max_request_bytes": 64 * 1024})

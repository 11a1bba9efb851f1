"""Rebuilding lost windows from the input topic (``worker.service.restore``), on the real broker and a
real Redis: which records are read again and which bars are written back."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from schemas import CandleEvent, encode_candle
from schemas.headers import candle_headers
from worker.service.restore import RestoreRange, restore_windows
from worker.state.connection import make_redis
from worker.state.windows import WindowStore
from worker.transport.reader import PartitionReader

from .conftest import T0, TF, TF_MS, WorkerEnv, publish_raw, synthetic_events

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


async def _publish_spaced(bootstrap: str, topic: str, partition: int, events: list[CandleEvent],
                         gap_s: float) -> list[int]:
    """One record a batch, ``gap_s`` apart, each stamped with the wall clock when sent; the stamps.

    Tansu answers a by-time offset lookup from the time it appended each batch, where Kafka uses the
    records' own (create) times; records stamped with the wall clock and sent one by one make the
    two agree to within the send's latency, far below ``gap_s``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    stamps = []
    try:
        for ev in events:
            ts = int(time.time() * 1000)
            await producer.send_and_wait(topic, encode_candle(ev), key=ev.symbol.encode(), partition=partition,
                                         timestamp_ms=ts, headers=candle_headers())
            stamps.append(ts)
            await asyncio.sleep(gap_s)
    finally:
        await producer.stop()
    return stamps


async def test_each_partition_is_rebuilt_from_its_own_anchor_time(wenv: WorkerEnv) -> None:
    """The reader holds every partition being restored, so while one partition's anchor (the
    timestamp of its last written record) is read, the others fetch too. Partition 1 has more
    records, all later: taking its record at the same offset as partition 0's anchor would look for
    partition 0's records after all of them and start its rebuild at its very beginning."""
    short = synthetic_events("RSA", 10)
    long_ = synthetic_events("RSB", 20)
    ts0 = await _publish_spaced(wenv.bootstrap, wenv.input, 0, short, gap_s=0.2)
    ts1 = await _publish_spaced(wenv.bootstrap, wenv.input, 1, long_, gap_s=0.2)
    p0, p1 = TopicPartition(wenv.input, 0), TopicPartition(wenv.input, 1)
    # Look back from partition 0's last record to halfway between its records 5 and 6.
    lookback_ms = ts0[-1] - (ts0[5] + ts0[6]) // 2
    client = make_redis(wenv.settings().redis)
    store = WindowStore(client, prefix=wenv.prefix, length=64, ttl_s=3600)
    try:
        async with PartitionReader(wenv.kafka()) as reader:
            report = await restore_windows(
                reader, store, {p0: RestoreRange(len(short), None), p1: RestoreRange(len(long_), None)},
                timeframe=TF, timeframe_ms=TF_MS, max_bytes=1_000_000, lookback_ms=lookback_ms, max_records=1000,
                wanted=lambda tp: True, now_ms=int(time.time() * 1000), future_tolerance_s=60, timeout_s=60.0)
        # Record 6 (the bug started at 0); one either side for the broker's append lag, as below.
        assert abs(report.start[p0] - 6) <= 1, report.start
        # Partition 1 from its own last record (its first stamp at or after the look-back; the
        # broker's append time may trail a stamp by the send's latency, hence one either side).
        want1 = next(i for i, t in enumerate(ts1) if t >= ts1[-1] - lookback_ms)
        assert abs(report.start[p1] - want1) <= 1, (report.start, want1)
        assert report.records == (len(short) - report.start[p0]) + (len(long_) - report.start[p1])
        a, b = await store.read("RSA"), await store.read("RSB")
        assert a.open_times().tolist() == [ev.open_time for ev in short[report.start[p0]:]]
        assert b.open_times().tolist() == [ev.open_time for ev in long_[report.start[p1]:]]
    finally:
        await client.aclose()


async def test_a_rebuild_writes_back_what_the_first_pass_stored_and_ends_on_a_poison_record(
        wenv: WorkerEnv) -> None:
    """The first pass's rules, judged against the clock now: unkeyed records, undecodable values,
    bars from the future, bars marked final before they close and in-progress bars are not written
    back. A poison record as the last of the range still ends that partition's rebuild (it used to
    wait for a record beyond the range until the timeout)."""
    now = T0 + 30 * TF_MS + TF_MS // 2  # half-way through bar 30
    good = synthetic_events("RSC", 30)  # bars 0 .. 29: all closed by ``now``
    future = synthetic_events("RSC", 40)[-1]  # opens 9 h after ``now``
    open_bar = synthetic_events("RSC", 31)[-1]  # bar 30, still open at ``now``
    records: list[tuple[bytes | None, bytes]] = [(ev.symbol.encode(), encode_candle(ev)) for ev in good[:-1]]
    records += [
        (None, encode_candle(good[-1])),  # unkeyed: refused, so bar 29 stays out
        (b"RSC", encode_candle(future)),
        (b"RSC", encode_candle(open_bar)),  # final before it closes
        (b"RSC", encode_candle(open_bar.model_copy(update={"is_final": False}))),
        (b"RSC", b"\xc1 not msgpack"),  # the range's last record
    ]
    await publish_raw(wenv.bootstrap, wenv.input, records, partition=0)
    p0 = TopicPartition(wenv.input, 0)
    client = make_redis(wenv.settings().redis)
    store = WindowStore(client, prefix=wenv.prefix, length=64, ttl_s=3600)
    try:
        # The records' timestamps are today's, after the ``now`` given: that anchor is not used
        # (lookup_time), so the rebuild starts ``max_records`` back, here at the first record.
        async with PartitionReader(wenv.kafka()) as reader:
            report = await restore_windows(
                reader, store, {p0: RestoreRange(len(records), None)}, timeframe=TF, timeframe_ms=TF_MS,
                max_bytes=1_000_000, lookback_ms=1000 * DAY_MS, max_records=1000, wanted=lambda tp: True,
                now_ms=now, future_tolerance_s=60, timeout_s=60.0)
        assert report.records == len(records)
        assert report.bars == len(good) - 1
        assert report.seconds < 30, report.seconds  # not the 60 s timeout
        snap = await store.read("RSC")
        assert snap.open_times().tolist() == [ev.open_time for ev in good[:-1]]
    finally:
        await client.aclose()

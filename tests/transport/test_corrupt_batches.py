"""A record batch that fails its CRC check, injected for real: a FaultProxy between the consumer and
an embedded Tansu damages the batch's bytes in every fetch response (the broker's copy is intact,
so the topic survives), exactly what a damaged log segment looks like to the client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException

from worker.dev.embedded import create_topics
from worker.dev.proxy import ProxiedBroker
from worker.dev.raw_records import send_with_binary_header_key
from worker.settings import KafkaSettings
from worker.transport import CandleConsumer
from worker.transport.corrupt import REFETCHES, SteppedPartition, corrupt_partition
from worker.transport.reader import PartitionReader

pytestmark = pytest.mark.integration

MARK = b"CRCBAD"  # a record holding it is damaged on the way back from the broker
DEADLINE_S = 30.0


@pytest.fixture
def proxied() -> Iterator[ProxiedBroker]:
    with ProxiedBroker(startup_timeout_s=60.0) as broker:
        yield broker


async def produce_batches(bootstrap: str, topic: str, batches: list[tuple[int, list[bytes]]]) -> list[list[int]]:
    """Each list of values as one record batch on its partition (sent together, then flushed);
    returns the offsets of each batch."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        offsets: list[list[int]] = []
        for partition, values in batches:
            futures = [await producer.send(topic, v, key=v, partition=partition) for v in values]
            await producer.flush()
            offsets.append([(await f).offset for f in futures])
        return offsets
    finally:
        await producer.stop()


def settings_for(bootstrap: str, topic: str) -> KafkaSettings:
    return KafkaSettings.model_validate({"bootstrap_servers": bootstrap, "input_topic": topic,
                                         "consumer_group": f"g-{uuid.uuid4().hex[:10]}", "client_id": "test",
                                         "request_timeout_ms": 10_000})


def test_the_partition_named_by_aiokafkas_message_is_parsed() -> None:
    tp = TopicPartition("candles.v1", 12)
    assert corrupt_partition(CorruptRecordException(f"Invalid CRC - {tp}")) == tp
    assert corrupt_partition(CorruptRecordException("Invalid CRC")) is None


def test_a_failure_is_refetched_then_its_offsets_given_up_until_a_record_reads() -> None:
    state = SteppedPartition()
    assert [state.failure(7) for _ in range(REFETCHES)] == [False] * REFETCHES  # refetched
    assert state.failure(7) is True  # given up
    assert state.failure(8) is True  # the same batch: no more refetches
    assert not state.passed(6)
    assert state.passed(9) and state.skipped == 2
    healed = SteppedPartition()
    assert healed.failure(3) is False and healed.passed(3)  # a damaged transfer: the refetch reads it


async def test_a_corrupt_batch_is_stepped_past_and_no_readable_record_is_lost(proxied: ProxiedBroker) -> None:
    """The first fetch holds good batches before and after the bad one, and the other partitions':
    aiokafka's exception drops the records it had drained from them (with their positions moved on)
    and the next fetch fails again. Every readable record is returned exactly once, in order, and
    only the bad batch's offsets are reported unreadable."""
    assert proxied.proxy is not None
    topic = f"crc-{uuid.uuid4().hex[:8]}"
    await create_topics(proxied.direct_bootstrap, {topic: 4})
    others = [0, 1, 3]
    offsets = await produce_batches(proxied.direct_bootstrap, topic, [
        (2, [b"good-a%d" % i for i in range(5)]),
        *[(p, [b"other-%d-%d" % (p, i) for i in range(6)]) for p in others],
        (2, [b"bad-0", b"bad-" + MARK, b"bad-2"]),
        (2, [b"good-b%d" % i for i in range(4)]),
    ])
    bad = offsets[-2]
    proxied.proxy.corrupt(MARK, b"CRCBAE")
    consumer = CandleConsumer(settings_for(proxied.bootstrap, topic), session_timeout_ms=3000,
                              heartbeat_interval_ms=300)
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    unreadable = []
    try:
        stop_at = time.monotonic() + DEADLINE_S
        while len(got) < 9 + 6 * len(others) or len(unreadable) < 3:
            assert time.monotonic() < stop_at, f"timed out: {[r.value for r in got]}, unreadable {unreadable}"
            got += await consumer.getmany(timeout_ms=100)
            unreadable += consumer.take_unreadable()
        await asyncio.sleep(0.5)  # nothing more comes: no duplicate, no late failure
        got += await consumer.getmany(timeout_ms=300)
        unreadable += consumer.take_unreadable()
    finally:
        await consumer.stop()
    assert proxied.proxy.corrupted > REFETCHES  # the fault was really injected, on every refetch
    by_partition = {p: [r.value for r in got if r.partition == p] for p in range(4)}
    assert by_partition[2] == [b"good-a%d" % i for i in range(5)] + [b"good-b%d" % i for i in range(4)]
    for p in others:
        assert by_partition[p] == [b"other-%d-%d" % (p, i) for i in range(6)]
    assert [(u.tp.partition, u.offset) for u in unreadable] == [(2, o) for o in bad]
    assert "CRC" in unreadable[0].detail


async def test_a_record_whose_header_key_is_not_utf8_is_given_up_and_the_rest_read(proxied: ProxiedBroker) -> None:
    """aiokafka raises UnicodeDecodeError from getmany for it, on every fetch, naming no partition:
    left alone the worker would exit at that offset on every restart. It is stepped past like a
    damaged batch: its offset alone is given up; every other record is read once, in order. The
    other partition, a suspect only, is fetched alone at full size and cleared — not read a record
    per fetch through its whole backlog (that took one fetch per record)."""
    topic = f"hdr-{uuid.uuid4().hex[:8]}"
    await create_topics(proxied.direct_bootstrap, {topic: 2})
    backlog = [b"o%d" % i for i in range(300)]
    await produce_batches(proxied.direct_bootstrap, topic, [(0, [b"a0", b"a1"]), (1, backlog[:150])])
    _, bad = await send_with_binary_header_key(proxied.direct_bootstrap, topic, b"binary-header", partition=0)
    await produce_batches(proxied.direct_bootstrap, topic, [(0, [b"b0", b"b1"]), (1, backlog[150:])])
    consumer = CandleConsumer(settings_for(proxied.direct_bootstrap, topic), session_timeout_ms=3000,
                              heartbeat_interval_ms=300)
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    unreadable = []
    calls = 0
    try:
        stop_at = time.monotonic() + DEADLINE_S
        while len(got) < 4 + len(backlog) or not unreadable:
            assert time.monotonic() < stop_at, f"timed out: {len(got)} records, unreadable {unreadable}"
            got += await consumer.getmany(timeout_ms=100)
            unreadable += consumer.take_unreadable()
            calls += 1
        await asyncio.sleep(0.5)
        got += await consumer.getmany(timeout_ms=300)
        unreadable += consumer.take_unreadable()
    finally:
        await consumer.stop()
    assert [r.value for r in got if r.partition == 0] == [b"a0", b"a1", b"b0", b"b1"]
    assert [r.value for r in got if r.partition == 1] == backlog
    assert [(u.tp.partition, u.offset) for u in unreadable] == [(0, bad)]
    assert "header key is not UTF-8" in unreadable[0].detail
    assert calls < 60, calls  # the suspect was not read a record at a time


async def test_the_rebuild_reader_skips_a_corrupt_batch_too(proxied: ProxiedBroker) -> None:
    assert proxied.proxy is not None
    topic = f"crc-{uuid.uuid4().hex[:8]}"
    await create_topics(proxied.direct_bootstrap, {topic: 1})
    offsets = await produce_batches(proxied.direct_bootstrap, topic, [
        (0, [b"a0", b"a1"]), (0, [MARK]), (0, [b"b0", b"b1", b"b2"])])
    proxied.proxy.corrupt(MARK, b"CRCBAE")
    reader = PartitionReader(settings_for(proxied.bootstrap, topic))
    await reader.start()
    values: list[bytes | None] = []
    skipped: list[int] = []
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        reader.seek(tp, 1)
        stop_at = time.monotonic() + DEADLINE_S
        while len(values) < 4:
            assert time.monotonic() < stop_at, f"timed out: {values}"
            values += [r.value for r in await reader.getmany(timeout_ms=100)]
            skipped += [u.offset for u in reader.take_unreadable()]
    finally:
        await reader.stop()
    assert values == [b"a1", b"b0", b"b1", b"b2"]
    assert skipped == offsets[1]


async def test_stepping_with_its_partition_paused_waits_instead_of_spinning(proxied: ProxiedBroker) -> None:
    """A stepping partition paused by backpressure, and nothing else assigned: getmany must still
    wait its timeout (a loop that never yields would starve the event loop: heartbeats, publishes)."""
    assert proxied.proxy is not None
    topic = f"crc-{uuid.uuid4().hex[:8]}"
    await create_topics(proxied.direct_bootstrap, {topic: 1})
    await produce_batches(proxied.direct_bootstrap, topic, [(0, [b"a0"]), (0, [MARK]), (0, [b"b0"])])
    proxied.proxy.corrupt(MARK, b"CRCBAE")
    consumer = CandleConsumer(settings_for(proxied.bootstrap, topic), session_timeout_ms=3000,
                              heartbeat_interval_ms=300)
    await consumer.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        stop_at = time.monotonic() + DEADLINE_S
        while not consumer._guard.stepping:  # the first fetch meets the bad batch
            assert time.monotonic() < stop_at, "the bad batch was never met"
            await consumer.getmany(timeout_ms=100)
        consumer.pause(consumer.assignment())
        ticks, started, calls = 0, time.monotonic(), 0
        while time.monotonic() - started < 0.5:
            assert await consumer.getmany(timeout_ms=100) == []
            calls += 1
        assert calls <= 8 and ticks >= 10, (calls, ticks)  # each call waited ~100 ms; the loop ran
        consumer.resume(consumer.assignment())
        got: list[bytes | None] = []
        while b"b0" not in got:
            assert time.monotonic() < stop_at + 10, f"timed out: {got}"
            got += [r.value for r in await consumer.getmany(timeout_ms=100)]
        assert [u.offset for u in consumer.take_unreadable()] == [1]
    finally:
        task.cancel()
        await consumer.stop()


async def test_a_rebalance_while_stepping_neither_crashes_nor_loses_a_record(proxied: ProxiedBroker) -> None:
    """A second member joins while the first steps through a large bad batch: partitions move in
    the middle of it. Neither member's getmany raises, every readable record reaches one of them
    (nothing is committed here, so the new owner reads from the start: duplicates are allowed),
    and every offset of the bad batches is given up by whoever owned it last."""
    assert proxied.proxy is not None
    topic = f"crc-{uuid.uuid4().hex[:8]}"
    await create_topics(proxied.direct_bootstrap, {topic: 2})
    offsets = await produce_batches(proxied.direct_bootstrap, topic, [
        (0, [b"p0-a%d" % i for i in range(3)]),
        (0, [b"bad-%d-" % i + MARK for i in range(150)]),
        (0, [b"p0-b%d" % i for i in range(3)]),
        (1, [b"p1-%d" % i for i in range(20)]),
        (1, [b"bad1-%d-" % i + MARK for i in range(150)]),  # both partitions step when it moves
        (1, [b"p1-b%d" % i for i in range(3)]),
    ])
    proxied.proxy.corrupt(MARK, b"CRCBAE")
    settings = settings_for(proxied.bootstrap, topic)
    group = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 300}
    first = CandleConsumer(settings, **group)
    second = CandleConsumer(settings, **group)
    await first.start()
    got: set[bytes] = set()
    unreadable: set[tuple[int, int]] = set()
    started_second = False
    try:
        stop_at = time.monotonic() + 60
        wanted = {b"p0-a%d" % i for i in range(3)} | {b"p0-b%d" % i for i in range(3)} | {
            b"p1-%d" % i for i in range(20)} | {b"p1-b%d" % i for i in range(3)}
        bad = {(0, o) for o in offsets[1]} | {(1, o) for o in offsets[4]}
        while not (wanted <= got and bad <= unreadable):
            assert time.monotonic() < stop_at, f"timed out: missing {wanted - got}, {len(unreadable)} unreadable"
            for consumer in ([first, second] if started_second else [first]):
                got |= {r.value for r in await consumer.getmany(timeout_ms=50) if r.value is not None}
                unreadable |= {(u.tp.partition, u.offset) for u in consumer.take_unreadable()}
            if not started_second and len(first._guard.stepping) == 2:
                await second.start()  # joins mid-batch: a rebalance while the first steps
                started_second = True
    finally:
        await first.stop()
        await second.stop()
    assert started_second
    assert not any(MARK in v for v in got)
    assert unreadable <= bad  # nothing readable was given up

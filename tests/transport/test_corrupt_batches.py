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

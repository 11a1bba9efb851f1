"""CandleConsumer and RecordProducer against a real (embedded Tansu) broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from worker.dev.embedded import EmbeddedBroker, create_topics
from worker.settings import KafkaSettings
from worker.transport import CandleConsumer, OutRecord, RecordProducer

pytestmark = pytest.mark.integration

# Tansu holds a group's first JoinGroup for about session_timeout/2 and members learn of a
# rebalance at their next heartbeat, so short values keep these tests quick. Real deployments
# keep aiokafka's defaults.
FAST_GROUP: dict[str, Any] = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 300}
DEADLINE_S = 30.0


def settings_for(broker: EmbeddedBroker, topic: str, group: str | None = None) -> KafkaSettings:
    return KafkaSettings.model_validate(
        {
            "bootstrap_servers": broker.bootstrap,
            "input_topic": topic,
            "consumer_group": group or f"g-{uuid.uuid4().hex[:10]}",
            "client_id": "test",
            "request_timeout_ms": 10_000,
        }
    )


async def produce(
    settings: KafkaSettings, topic: str, values: Iterable[bytes], *, partition: int | None = None
) -> None:
    async with RecordProducer(settings) as producer:
        futures = [await producer.send(topic, v, key=v, partition=partition) for v in values]
        await asyncio.gather(*futures)


async def consume_until(
    consumers: list[CandleConsumer],
    done: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    *,
    deadline_s: float = DEADLINE_S,
) -> list[list[ConsumerRecord[bytes, bytes]]]:
    """Poll every consumer in turn (each must keep polling to take part in rebalances)."""
    got: list[list[ConsumerRecord[bytes, bytes]]] = [[] for _ in consumers]
    stop_at = time.monotonic() + deadline_s
    while not done([r for records in got for r in records]):
        if time.monotonic() > stop_at:
            raise AssertionError(f"timed out; got {[[r.value for r in g] for g in got]}")
        for i, consumer in enumerate(consumers):
            got[i] += await consumer.getmany(timeout_ms=100)
    return got


async def test_produce_and_consume_with_headers(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("candles")
    await create_topics(broker.bootstrap, {topic: 1})
    settings = settings_for(broker, topic)
    async with RecordProducer(settings) as producer:
        futures = [
            await producer.send(topic, b"v%d" % i, key=b"EURUSD", headers=[("schema", b"candle.v1"), ("n", b"%d" % i)])
            for i in range(5)
        ]
        acks = await asyncio.gather(*futures)
    assert [a.offset for a in acks] == [0, 1, 2, 3, 4]

    async with CandleConsumer(settings, **FAST_GROUP) as consumer:
        ((records,)) = await consume_until([consumer], lambda rs: len(rs) >= 5)
    assert [r.value for r in records] == [b"v%d" % i for i in range(5)]
    assert {r.key for r in records} == {b"EURUSD"}
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert [list(r.headers) for r in records][3] == [("schema", b"candle.v1"), ("n", b"3")]


async def test_flush_waits_for_acks(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("out")
    settings = settings_for(broker, topic)
    async with RecordProducer(settings) as producer:
        futures = [await producer.send(topic, b"x%d" % i) for i in range(20)]
        await producer.flush()
        assert all(f.done() and f.exception() is None for f in futures)


async def test_new_member_resumes_after_the_committed_offset(
    broker: EmbeddedBroker, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("candles")
    await create_topics(broker.bootstrap, {topic: 1})
    settings = settings_for(broker, topic)
    await produce(settings, topic, [b"%d" % i for i in range(10)])
    tp = TopicPartition(topic, 0)

    async with CandleConsumer(settings, **FAST_GROUP) as first:
        await consume_until([first], lambda rs: len(rs) >= 10)
        await first.commit({tp: 6})  # records 0-5 are done; 6 is the next to read
        assert await first.committed(tp) == 6

    async with CandleConsumer(settings, **FAST_GROUP) as second:
        ((records,)) = await consume_until([second], lambda rs: len(rs) >= 4)
    assert [r.offset for r in records] == [6, 7, 8, 9]


async def test_pause_and_resume(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("candles")
    await create_topics(broker.bootstrap, {topic: 2})
    settings = settings_for(broker, topic)
    p0 = TopicPartition(topic, 0)
    await produce(settings, topic, [b"a%d" % i for i in range(5)], partition=0)
    await produce(settings, topic, [b"b%d" % i for i in range(5)], partition=1)

    assigned = asyncio.Event()

    async def on_assigned(tps: frozenset[TopicPartition]) -> None:
        if tps:
            assigned.set()

    async with CandleConsumer(settings, on_assigned=on_assigned, **FAST_GROUP) as consumer:
        await asyncio.wait_for(assigned.wait(), DEADLINE_S)
        consumer.pause([p0])
        assert consumer.paused() == {p0}
        ((records,)) = await consume_until([consumer], lambda rs: len(rs) >= 5)
        for _ in range(5):  # p0 stays silent while paused
            records += await consumer.getmany(timeout_ms=100)
        assert {r.partition for r in records} == {1}

        consumer.resume([p0])
        assert consumer.paused() == frozenset()
        ((records,)) = await consume_until([consumer], lambda rs: len(rs) >= 5)
        assert [r.value for r in records] == [b"a%d" % i for i in range(5)]


async def test_lag_is_highwater_minus_position(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("candles")
    await create_topics(broker.bootstrap, {topic: 1})
    settings = settings_for(broker, topic)
    tp = TopicPartition(topic, 0)
    await produce(settings, topic, [b"%d" % i for i in range(10)])

    async with CandleConsumer(settings, **FAST_GROUP) as consumer:
        records: list[ConsumerRecord[bytes, bytes]] = []
        stop_at = time.monotonic() + DEADLINE_S
        while not records and time.monotonic() < stop_at:
            records = await consumer.getmany(timeout_ms=200, max_records=3)
        assert len(records) == 3
        assert consumer.highwater(tp) == 10
        assert await consumer.position(tp) == 3
        assert await consumer.lag() == {tp: 7}

        await consume_until([consumer], lambda rs: len(rs) >= 7)
        assert await consumer.lag() == {tp: 0}

        await produce(settings, topic, [b"late"] * 4)
        late: list[ConsumerRecord[bytes, bytes]] = []
        stop_at = time.monotonic() + DEADLINE_S
        while not late and time.monotonic() < stop_at:
            late = await consumer.getmany(timeout_ms=200, max_records=1)
        # The fetch that brought the late records also brought the new highwater.
        assert consumer.highwater(tp) == 14
        assert await consumer.lag() == {tp: 3}


async def test_two_members_split_the_partitions(broker: EmbeddedBroker, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("candles")
    await create_topics(broker.bootstrap, {topic: 4})
    settings = settings_for(broker, topic)
    events: list[tuple[str, frozenset[int]]] = []

    def recorder(name: str) -> Callable[[frozenset[TopicPartition]], Awaitable[None]]:
        async def record(tps: frozenset[TopicPartition]) -> None:
            events.append((name, frozenset(tp.partition for tp in tps)))

        return record

    one = CandleConsumer(settings, on_assigned=recorder("one+"), on_revoked=recorder("one-"), **FAST_GROUP)
    two = CandleConsumer(settings, on_assigned=recorder("two+"), on_revoked=recorder("two-"), **FAST_GROUP)
    await one.start()
    try:
        joining = asyncio.create_task(two.start())
        while not joining.done():  # the first member must keep polling to rebalance
            await one.getmany(timeout_ms=100)
        await joining

        def split() -> bool:
            a, b = one.assignment(), two.assignment()
            return bool(a) and bool(b) and not (a & b) and len(a | b) == 4

        stop_at = time.monotonic() + DEADLINE_S
        while not split():
            assert time.monotonic() < stop_at, (one.assignment(), two.assignment(), events)
            await one.getmany(timeout_ms=100)
            await two.getmany(timeout_ms=100)
        assert ("one-", frozenset({0, 1, 2, 3})) in events  # the first member gave everything back

        await produce(settings, topic, [b"%d" % i for i in range(40)])
        got_one, got_two = await consume_until([one, two], lambda rs: len({r.value for r in rs}) >= 40)
        assert {r.partition for r in got_one} <= {tp.partition for tp in one.assignment()}
        assert {r.partition for r in got_two} <= {tp.partition for tp in two.assignment()}
        assert got_one and got_two
    finally:
        await two.stop()
        await one.stop()


@pytest.mark.slow
async def test_clients_survive_a_short_broker_outage(topic_factory: Callable[..., str]) -> None:
    # Tansu keeps everything in memory, so the restarted broker is empty: the topic is
    # auto-created again and the consumer's old position is out of range (reset to earliest).
    topic = topic_factory("outage")
    with EmbeddedBroker() as own_broker:
        settings = settings_for(own_broker, topic)
        async with (
            RecordProducer(settings) as producer,
            CandleConsumer(settings, **FAST_GROUP) as consumer,
        ):
            await (await producer.send(topic, b"before"))
            await consume_until([consumer], lambda rs: any(r.value == b"before" for r in rs))

            own_broker.stop()
            for _ in range(10):  # the consumer keeps polling through the outage without raising
                await consumer.getmany(timeout_ms=100)
            queued = await producer.send(topic, b"during")  # buffered until the broker is back
            own_broker.start()

            await asyncio.wait_for(queued, DEADLINE_S)
            await asyncio.wait_for(await producer.send(topic, b"after"), DEADLINE_S)
            await consume_until([consumer], lambda rs: {b"during", b"after"} <= {r.value for r in rs})


async def test_send_many_uses_the_default_partitioner_and_keeps_order(
    broker: EmbeddedBroker, topic_factory: Callable[..., str]
) -> None:
    """Batched sends must put each key where a plain send (any Kafka client's default partitioner)
    puts it, or one symbol's forecasts would be split across partitions."""
    topic = topic_factory("out")
    await create_topics(broker.bootstrap, {topic: 5})
    settings = settings_for(broker, topic)
    keys = [b"EURUSD", b"GBPUSD", b"USDJPY", b"AUDUSD", b"XAUUSD", b"SIM7", b"B0042"]
    records = [OutRecord(k, b"%s-%d" % (k, i), [("n", b"%d" % i)]) for i in range(40) for k in keys]
    async with RecordProducer(settings) as producer:
        reference = {k: (await (await producer.send(topic, b"ref", key=k))).partition for k in keys}
        futures = await producer.send_many(topic, records)
        await asyncio.gather(*futures)
    assert 1 < len(futures) <= 5  # one record batch per partition used, nothing per record
    assert len(set(reference.values())) > 1

    async with CandleConsumer(settings, **FAST_GROUP) as consumer:
        ((got,)) = await consume_until([consumer], lambda rs: len(rs) >= len(records) + len(keys))
    batched = [r for r in got if r.value != b"ref"]
    assert sorted(r.value for r in batched) == sorted(r.value for r in records)
    for r in batched:
        assert r.partition == reference[r.key], r.key
    for k in keys:  # per key, the order of the call
        values = [r.value for r in sorted(batched, key=lambda r: r.offset) if r.key == k]
        assert values == [b"%s-%d" % (k, i) for i in range(40)]
    assert dict(batched[0].headers)["n"] == batched[0].value.rsplit(b"-", 1)[1]


async def test_send_many_splits_a_batch_that_outgrows_the_batch_size(
    broker: EmbeddedBroker, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("out")
    await create_topics(broker.bootstrap, {topic: 1})
    settings = settings_for(broker, topic)
    records = [OutRecord(b"K", bytes([i % 251]) * 3000, []) for i in range(20)]
    async with RecordProducer(settings, max_batch_size=16 * 1024) as producer:
        futures = await producer.send_many(topic, records)
        await asyncio.gather(*futures)
    assert len(futures) >= 4  # 60 kB in batches of at most 16 kB
    async with CandleConsumer(settings, **FAST_GROUP) as consumer:
        ((got,)) = await consume_until([consumer], lambda rs: len(rs) >= 20)
    assert [r.value for r in got] == [r.value for r in records]

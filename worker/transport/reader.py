"""Reads a range of offsets of given partitions, or follows a topic, outside any consumer group.

Used to restore lost state from the input topic (the way Kafka Streams restores a store from its
changelog): the group consumer keeps its position and its membership while this one, with no group
and no commits, re-reads what was consumed before; and by the CLI's ``tail`` and the benchmarks,
which watch a topic without joining a group.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from worker.settings import KafkaSettings
from worker.transport.broker import KafkaClient, kafka_client_kwargs
from worker.transport.corrupt import CorruptBatchGuard, UnreadableOffset

__all__ = ["PartitionReader"]


class PartitionReader(KafkaClient):
    """``assign`` + ``seek`` + ``getmany`` over explicit partitions; never joins a group or commits."""

    def __init__(self, settings: KafkaSettings, **overrides: Any) -> None:
        kwargs: dict[str, Any] = {
            **kafka_client_kwargs(settings),
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": settings.max_poll_records,
            "fetch_max_wait_ms": settings.fetch_max_wait_ms,
            **overrides,
        }
        self._consumer = AIOKafkaConsumer(**kwargs)
        self._guard = CorruptBatchGuard(self._consumer)

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    def follow(self, topic: str) -> None:
        """Every partition of ``topic``, from ``auto_offset_reset`` (no group: nothing is committed)."""
        self._consumer.subscribe([topic])

    def assign(self, partitions: Collection[TopicPartition]) -> None:
        self._guard.forget(set(self._consumer.assignment()) - set(partitions))
        self._consumer.assign(list(partitions))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(partition, offset)
        self._guard.sought(partition, offset)

    def pause(self, partitions: Collection[TopicPartition]) -> None:
        self._consumer.pause(*partitions)

    async def offsets_for_times(self, times: Mapping[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """Per partition, the earliest offset whose record timestamp is >= the given ms (None: none is)."""
        found = await self._consumer.offsets_for_times(dict(times))
        return {tp: (None if meta is None else int(meta.offset)) for tp, meta in found.items()}

    async def beginning_offsets(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        found = await self._consumer.beginning_offsets(list(partitions))
        return {tp: int(offset) for tp, offset in found.items()}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> list[ConsumerRecord[bytes, bytes]]:
        """As the group consumer's: a batch failing its CRC check is stepped past, not raised."""
        batches = await self._guard.getmany(timeout_ms, max_records)
        return [record for records in batches.values() for record in records]

    def take_unreadable(self) -> list[UnreadableOffset]:
        """Offsets given up since the last call (their batch failed the CRC check on every fetch)."""
        return self._guard.take_unreadable()

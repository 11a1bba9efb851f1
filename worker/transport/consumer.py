"""Candle-topic consumer: a thin typed wrapper over ``AIOKafkaConsumer`` with manual commits.

It deals in raw ``bytes`` records; decoding, validation and dead-lettering belong to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaTimeoutError

from worker.settings import KafkaSettings
from worker.transport.broker import KafkaClient, kafka_client_kwargs
from worker.transport.corrupt import CorruptBatchGuard, UnreadableOffset
from worker.transport.lag import compute_lag

__all__ = ["CandleConsumer", "RebalanceCallback"]

RebalanceCallback = Callable[[frozenset[TopicPartition]], Awaitable[None]]


class _ForwardingListener(ConsumerRebalanceListener):
    """aiokafka awaits these inside the rebalance, so the caller can finish in-flight work and
    commit on revoke before another member takes the partitions over."""

    def __init__(self, on_revoked: RebalanceCallback | None, on_assigned: RebalanceCallback | None,
                 guard: CorruptBatchGuard) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._guard = guard

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = frozenset(revoked)
        self._guard.forget(revoked)
        if self._on_revoked is not None:
            await self._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = frozenset(assigned)
        self._guard.forget(assigned)  # positions known from an earlier assignment are stale
        if self._on_assigned is not None:
            await self._on_assigned(assigned)


_T = TypeVar("_T")


class CandleConsumer(KafkaClient):
    """Group consumer of ``settings.input_topic`` (or ``topics``), ``auto_offset_reset="earliest"``.

    Offsets are committed only by :meth:`commit`, with the *next* offset to read, after the
    caller has made the records' effects durable; a crash therefore replays, never skips.
    ``overrides`` go straight to ``AIOKafkaConsumer`` (e.g. ``session_timeout_ms``).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topics: Sequence[str] | None = None,
        group_id: str | None = None,
        on_assigned: RebalanceCallback | None = None,
        on_revoked: RebalanceCallback | None = None,
        **overrides: Any,
    ) -> None:
        self.topics = tuple(topics) if topics is not None else (settings.input_topic,)
        kwargs: dict[str, Any] = {
            **kafka_client_kwargs(settings),
            "group_id": group_id or settings.consumer_group,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": settings.max_poll_records,
            **overrides,
        }
        self._consumer = AIOKafkaConsumer(**kwargs)
        self._guard = CorruptBatchGuard(self._consumer, committed=self.committed)
        self._listener = _ForwardingListener(on_revoked, on_assigned, self._guard)
        # aiokafka retries a commit or an offset lookup while the coordinator is unreachable, with
        # no end: the caller's loop would hang there for the whole outage, deaf to a stop request.
        self._request_timeout_s = settings.request_timeout_ms / 1000

    async def start(self) -> None:
        # Subscribing before start() lets the listener see the very first assignment.
        self._consumer.subscribe(list(self.topics), listener=self._listener)
        await self._consumer.start()

    async def stop(self) -> None:
        """Leave the group (the listener's ``on_revoked`` is not called) and close connections."""
        await self._consumer.stop()

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> list[ConsumerRecord[bytes, bytes]]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` when none are buffered.

        Records of one partition stay in offset order; partitions follow one another. A batch that
        fails its CRC check neither raises nor loses a readable record: its offsets, once given up,
        are in :meth:`take_unreadable` (:mod:`worker.transport.corrupt`).
        """
        batches = await self._guard.getmany(timeout_ms, max_records)
        return [record for records in batches.values() for record in records]

    def take_unreadable(self) -> list[UnreadableOffset]:
        """Offsets given up since the last call: their batch failed the CRC check on every fetch."""
        return self._guard.take_unreadable()

    def pause(self, partitions: Collection[TopicPartition]) -> None:
        self._consumer.pause(*partitions)

    def resume(self, partitions: Collection[TopicPartition]) -> None:
        self._consumer.resume(*partitions)

    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(self._consumer.paused())

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._consumer.assignment())

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``{partition: next offset to read}``.

        Raises aiokafka's ``CommitFailedError`` if the group rebalanced meanwhile; the records
        will be redelivered to the partition's new owner, so the caller may just log it.
        """
        if offsets:
            await self._bounded(self._consumer.commit(dict(offsets)), "commit")

    async def committed(self, partition: TopicPartition) -> int | None:
        result: int | None = await self._bounded(self._consumer.committed(partition), "committed offset lookup")
        return result

    async def _bounded(self, call: Awaitable[_T], what: str) -> _T:
        """``call``, or KafkaTimeoutError (retriable: the broker is away) after request_timeout_ms."""
        try:
            return await asyncio.wait_for(call, self._request_timeout_s)
        except TimeoutError:
            raise KafkaTimeoutError(f"{what} unanswered after {self._request_timeout_s:g} s "
                                    "(group coordinator unreachable)") from None

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(partition, offset)
        self._guard.sought(partition, offset)

    async def position(self, partition: TopicPartition) -> int:
        result: int = await self._consumer.position(partition)
        return result

    async def offsets_for_times(self, times: Mapping[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """Per partition, the earliest offset whose record timestamp is >= the given ms (None: none is)."""
        found = await self._consumer.offsets_for_times(dict(times))
        return {tp: (None if meta is None else int(meta.offset)) for tp, meta in found.items()}

    async def beginning_offsets(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        found = await self._consumer.beginning_offsets(list(partitions))
        return {tp: int(offset) for tp, offset in found.items()}

    def highwater(self, partition: TopicPartition) -> int | None:
        result: int | None = self._consumer.highwater(partition)
        return result

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: highwater minus position, i.e. records not yet returned.

        Free (no request): the highwater is the one carried by the partition's last fetch
        response. Partitions not fetched since assignment are left out. Neither the group-offsets
        admin API nor ``end_offsets`` is used: Tansu breaks the connection on the first and
        answers the second with the last *batch's* base offset + 1, not the log end.
        """
        position: dict[TopicPartition, int | None] = {}
        highwater: dict[TopicPartition, int | None] = {}
        for tp in self._consumer.assignment():
            highwater[tp] = self._consumer.highwater(tp)
            if highwater[tp] is None:
                continue
            try:
                position[tp] = await self._consumer.position(tp)
            except IllegalStateError:  # revoked while we were asking
                position[tp] = None
        return compute_lag(highwater, position)

"""Getting past a record batch that fails its CRC check, without losing a readable record.

aiokafka raises ``CorruptRecordException`` from ``getmany`` when a fetched batch fails its CRC check
(a damaged log segment on the broker, bytes damaged on the way). Left alone, two things go wrong:

* The records the same call had already drained — from this partition's earlier batches and from
  other partitions — go down with the exception, although aiokafka has moved those partitions'
  positions past them. Nothing would ever read them again, and the next commit would skip them
  without a trace. :class:`CorruptBatchGuard` therefore rewinds every partition of the failed call
  to the offset after the last record it returned (or, before any, to the committed offset).
* The batch is refetched and fails again, for ever: the worker could not get past it. The exception
  names the partition but not the offset, and the bad batch need not be the first of a fetch, so
  the partition is *stepped*: read one record at a time until the failure comes with the position
  at the bad batch, refetch it :data:`REFETCHES` times (a transfer damaged on the way heals), then
  give up on one offset at a time — each becomes an :class:`UnreadableOffset`, which the service
  dead-letters — until a record reads again.

Both consumers use it: the group consumer (whose unreadable offsets go to the dead-letter topic) and
the partition reader of a state rebuild (which skips them: they were dead-lettered when first read).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException

from worker.observability.logging import get_logger

__all__ = ["REFETCHES", "CorruptBatchGuard", "SteppedPartition", "UnreadableOffset", "corrupt_partition"]

_log = get_logger("worker.transport.corrupt")

# Refetches of a batch that failed its CRC check before its offsets are given up: a failure that
# survives them is in the broker's copy, not in one transfer.
REFETCHES = 3

# aiokafka's message: f"Invalid CRC - {tp}" (aiokafka/consumer/fetcher.py, 0.11 to 0.14).
_TP_IN_MESSAGE = re.compile(r"TopicPartition\(topic='(?P<topic>[^']*)', partition=(?P<partition>\d+)\)")


def corrupt_partition(exc: BaseException) -> TopicPartition | None:
    """The partition a ``CorruptRecordException`` names; None when its message does not name one."""
    m = _TP_IN_MESSAGE.search(str(exc))
    return None if m is None else TopicPartition(m["topic"], int(m["partition"]))


@dataclass(frozen=True, slots=True)
class UnreadableOffset:
    """An offset given up: its batch failed the CRC check on every refetch."""

    tp: TopicPartition
    offset: int
    detail: str


@dataclass(slots=True)
class SteppedPartition:
    """One partition being read a record at a time past a batch that failed its CRC check."""

    failed_at: int | None = None  # position of the last failure (the bad batch holds it)
    failures: int = 0  # failures in a row at ``failed_at``
    confirmed: bool = False  # the batch failed every refetch: give up its offsets without retrying
    skipped: int = 0  # offsets given up

    def failure(self, position: int) -> bool:
        """A failure with the position at ``position``; True: give that offset up."""
        if position == self.failed_at:
            self.failures += 1
        else:
            self.failed_at, self.failures = position, 1
        if self.confirmed or self.failures > REFETCHES:
            self.confirmed = True
            self.skipped += 1
            return True
        return False

    def passed(self, offset: int) -> bool:
        """A record at ``offset`` was read: True once it is at or past the last failure."""
        return self.failed_at is not None and offset >= self.failed_at


class CorruptBatchGuard:
    """Wraps one ``AIOKafkaConsumer``'s ``getmany``; see the module docstring.

    ``delivered`` is, per partition, the offset after the last record handed out (or sought to):
    where a rewind goes. The caller reports seeks and revocations (:meth:`sought`, :meth:`forget`).
    ``committed`` (a group consumer's, bounded in time) answers where a partition not read yet
    starts; without it, or with no offset committed, it starts at the beginning (the worker's
    ``auto_offset_reset``).
    """

    def __init__(self, consumer: AIOKafkaConsumer, *,
                 committed: Callable[[TopicPartition], Awaitable[int | None]] | None = None) -> None:
        self._consumer = consumer
        self._committed = committed
        self.delivered: dict[TopicPartition, int] = {}
        self.stepping: dict[TopicPartition, SteppedPartition] = {}
        self._rewind: set[TopicPartition] = set()  # still to rewind (the last attempt failed)
        self._unreadable: list[UnreadableOffset] = []

    def sought(self, tp: TopicPartition, offset: int) -> None:
        self.delivered[tp] = offset
        self.stepping.pop(tp, None)
        self._rewind.discard(tp)

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        for tp in partitions:
            self.delivered.pop(tp, None)
            self.stepping.pop(tp, None)
            self._rewind.discard(tp)
        self._unreadable = [u for u in self._unreadable if u.tp not in partitions]

    def take_unreadable(self) -> list[UnreadableOffset]:
        """The offsets given up since the last call."""
        out, self._unreadable = self._unreadable, []
        return out

    async def getmany(self, timeout_ms: int, max_records: int | None) -> dict[TopicPartition,
                                                                           list[ConsumerRecord[bytes, bytes]]]:
        if self._rewind:
            await self._do_rewind()
        if not self.stepping:  # the usual case: one plain call
            try:
                batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            except CorruptRecordException as exc:
                await self._failed(exc, self._assigned())
                return {}
            self._note(batches)
            return batches
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        others = self._assigned() - self.stepping.keys()
        for i, tp in enumerate(list(self.stepping)):
            # Wait only when there is nothing else to wait on, or an all-stepping loop would spin.
            records = await self._step(tp, timeout_ms if not others and i == 0 else 0)
            if records:
                out[tp] = records
        if others:
            wait = 0 if out else timeout_ms
            try:
                batches = await self._consumer.getmany(*others, timeout_ms=wait, max_records=max_records)
            except CorruptRecordException as exc:
                await self._failed(exc, others)
                return out
            self._note(batches)
            out.update(batches)
        return out

    # -- inside ---------------------------------------------------------------------------
    def _assigned(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def _note(self, batches: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, records in batches.items():
            if records:
                self.delivered[tp] = records[-1].offset + 1

    async def _failed(self, exc: CorruptRecordException, drained: set[TopicPartition]) -> None:
        named = corrupt_partition(exc)
        suspects = {named} if named is not None and named in drained else set(drained)  # unnamed: all of them
        for tp in suspects:
            self.stepping.setdefault(tp, SteppedPartition())
        _log.warning("corrupt_batch", error=str(exc), stepping=sorted(f"{t.topic}:{t.partition}" for t in suspects),
                     message="a fetched record batch failed its CRC check; reading that partition one record "
                             "at a time to find it")
        self._rewind |= drained
        await self._do_rewind()

    async def _do_rewind(self) -> None:
        """Seek each partition to be rewound to where its next undelivered record is."""
        assigned = self._assigned()
        for tp in sorted(self._rewind & assigned):
            offset = self.delivered.get(tp)
            if offset is None and self._committed is not None:
                offset = await self._committed(tp)  # raises while the coordinator is away: retried
            if offset is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
                self.delivered[tp] = offset
            self._rewind.discard(tp)
        self._rewind &= assigned

    async def _step(self, tp: TopicPartition, timeout_ms: int) -> list[ConsumerRecord[bytes, bytes]]:
        state = self.stepping[tp]
        if tp in self._consumer.paused():
            return []  # backpressure: aiokafka returns nothing for it; the others are served meanwhile
        try:
            got = await self._consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        except CorruptRecordException as exc:
            position: int = await self._consumer.position(tp)
            if state.failure(position):
                self._unreadable.append(UnreadableOffset(
                    tp, position, f"the record batch holding it failed the CRC check on every fetch ({exc}; "
                                  f"{REFETCHES} refetches): the record cannot be read, its offset is skipped"))
                _log.error("corrupt_record_skipped", topic=tp.topic, partition=tp.partition, offset=position)
                position += 1
            self._consumer.seek(tp, position)  # refetch (the same offset, or the next one)
            self.delivered[tp] = position
            return []
        records = got.get(tp, [])
        if records:
            self.delivered[tp] = records[-1].offset + 1
            if state.passed(records[-1].offset):
                del self.stepping[tp]
                _log.warning("corrupt_batch_passed", topic=tp.topic, partition=tp.partition,
                             offset=records[-1].offset, skipped=state.skipped)
            return records
        highwater, delivered = self._consumer.highwater(tp), self.delivered.get(tp)
        if highwater is not None and delivered is not None and delivered >= highwater:
            # Read (or skipped) to the end of the log: nothing left that could fail. Back to plain reads.
            del self.stepping[tp]
            _log.warning("corrupt_batch_passed", topic=tp.topic, partition=tp.partition,
                         offset=highwater - 1, skipped=state.skipped)
        return []

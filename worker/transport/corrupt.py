"""Getting past a record batch that fails its CRC check, without losing a readable record.

aiokafka raises ``CorruptRecordException`` from ``getmany`` when a fetched batch fails its CRC check
(a damaged log segment on the broker, bytes damaged on the way), and ``UnicodeDecodeError`` when a
record's header key is not UTF-8 (the protocol says it is a string; aiokafka decodes it strictly,
but brokers store whatever a producer sent — another client's binary header name). Both are
:data:`UNREADABLE` and handled alike. Left alone, two things go wrong:

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
  dead-letters — until a record reads again. An offset that holds no record (a transaction marker,
  a compacted-away record) just before or inside the bad batch is given up the same way: nothing
  tells it apart from a record of the batch. A failure that names no partition (the header key)
  makes every partition of the call a suspect: each is first fetched alone at full size, which
  clears the innocent ones at once and names the bad one, so only that one is stepped.

Both consumers use it: the group consumer (whose unreadable offsets go to the dead-letter topic) and
the partition reader of a state rebuild (which skips them: they were dead-lettered when first read).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError

from worker.observability.logging import get_logger

__all__ = ["REFETCHES", "UNREADABLE", "CorruptBatchGuard", "SteppedPartition", "UnreadableOffset",
           "corrupt_partition"]

_log = get_logger("worker.transport.corrupt")

# Refetches of a batch that failed its CRC check before its offsets are given up: a failure that
# survives them is in the broker's copy, not in one transfer.
REFETCHES = 3

# What getmany raises for a batch it cannot read: a failed CRC check (aiokafka/consumer/fetcher.py;
# its message f"Invalid CRC - {tp}" names the partition, 0.11 to 0.14) and a header key that is not
# UTF-8 (record/default_records.py and its C twin; the message names no partition).
UNREADABLE: tuple[type[Exception], ...] = (CorruptRecordException, UnicodeDecodeError)

_UNREADABLE_KEPT = 10_000  # offsets kept for a caller that never takes them (the `tail` CLI)

_TP_IN_MESSAGE = re.compile(r"TopicPartition\(topic='(?P<topic>[^']*)', partition=(?P<partition>\d+)\)")


def corrupt_partition(exc: BaseException) -> TopicPartition | None:
    """The partition a ``CorruptRecordException`` names; None when its message does not name one
    (and for a ``UnicodeDecodeError``, which never does)."""
    m = _TP_IN_MESSAGE.search(str(exc))
    return None if m is None else TopicPartition(m["topic"], int(m["partition"]))


@dataclass(frozen=True, slots=True)
class UnreadableOffset:
    """An offset given up: its batch could not be read (failed the CRC check, or held a header key
    that is not UTF-8) on every refetch."""

    tp: TopicPartition
    offset: int
    detail: str


@dataclass(slots=True)
class SteppedPartition:
    """One partition being read a record at a time past a batch that could not be read."""

    until: int | None = None  # the highwater when it failed: read up to there, the batch is behind
    # A suspect only (the failure named no partition and several were drained): first fetched alone,
    # at full size; a clean fetch clears it, a failure makes it the one stepped a record at a time.
    probe: bool = False
    failed_at: int | None = None  # position of the last failure while stepping (the bad batch holds it)
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
        """A record at ``offset`` was read: True once it is at or past the last failure, or (the
        failure did not come back: a damaged transfer) at the end of what was there when it failed."""
        if self.failed_at is not None:
            return offset >= self.failed_at
        return self.until is not None and offset + 1 >= self.until


class CorruptBatchGuard:
    """Wraps one ``AIOKafkaConsumer``'s ``getmany``; see the module docstring.

    ``delivered`` is, per partition, the offset after the last record handed out (or sought to):
    where a rewind goes. The caller reports seeks, assignments and revocations (:meth:`sought`,
    :meth:`forget`). ``committed`` (a group consumer's, bounded in time) answers where a partition
    not read yet starts, the beginning when nothing is committed (the worker's
    ``auto_offset_reset``); without it (a reader, whose partitions are sought or merely tailed) a
    partition not read yet is left where it is.
    """

    def __init__(self, consumer: AIOKafkaConsumer, *,
                 committed: Callable[[TopicPartition], Awaitable[int | None]] | None = None) -> None:
        self._consumer = consumer
        self._committed = committed
        self.delivered: dict[TopicPartition, int] = {}
        self.stepping: dict[TopicPartition, SteppedPartition] = {}
        self._rewind: set[TopicPartition] = set()  # still to rewind (the last attempt failed)
        self._unreadable: deque[UnreadableOffset] = deque(maxlen=_UNREADABLE_KEPT)
        self._deferred: Exception | None = None  # raised by the next call: this one had records to return

    def sought(self, tp: TopicPartition, offset: int) -> None:
        self.delivered[tp] = offset
        self.stepping.pop(tp, None)
        self._rewind.discard(tp)

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Partitions revoked, or newly assigned (what was known of an earlier assignment is stale)."""
        for tp in partitions:
            self.delivered.pop(tp, None)
            self.stepping.pop(tp, None)
            self._rewind.discard(tp)
        kept = [u for u in self._unreadable if u.tp not in partitions]
        self._unreadable.clear()
        self._unreadable.extend(kept)

    def take_unreadable(self) -> list[UnreadableOffset]:
        """The offsets given up since the last call."""
        if not self._unreadable:  # the usual case, asked once per fetch
            return []
        out = list(self._unreadable)
        self._unreadable.clear()
        return out

    async def getmany(self, timeout_ms: int, max_records: int | None) -> dict[TopicPartition,
                                                                           list[ConsumerRecord[bytes, bytes]]]:
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc
        if self._rewind:
            await self._do_rewind()
        if not self.stepping:  # the usual case: one plain call
            try:
                batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            except UNREADABLE as exc:
                self._failed(exc, self._assigned())
                await self._do_rewind()  # nothing is in hand: a failure here is the caller's to retry
                return {}
            self._note(batches)
            return batches
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        waited = False
        try:
            assigned, paused = self._assigned(), set(self._consumer.paused())
            others = assigned - self.stepping.keys()
            # Paused ones (backpressure) get nothing from aiokafka: skip them, serve the others.
            for tp in [tp for tp in self.stepping if tp in assigned and tp not in paused]:
                wait = timeout_ms if not others and not waited else 0  # one wait per call, at most
                waited = waited or wait > 0
                state = self.stepping.get(tp)  # a revocation during an earlier step may have dropped it
                if state is None:
                    continue
                records = await (self._probe(tp, wait, max_records) if state.probe else self._step(tp, wait))
                if records:
                    out[tp] = records
            if others:
                wait = 0 if out or waited else timeout_ms
                waited = waited or wait > 0
                try:
                    batches = await self._consumer.getmany(*others, timeout_ms=wait, max_records=max_records)
                except UNREADABLE as exc:
                    self._failed(exc, others)
                else:
                    self._note(batches)
                    out.update(batches)
            if self._rewind:
                await self._do_rewind()
        except Exception as exc:
            if not out:
                raise
            self._deferred = exc  # the records in hand were delivered (positions moved): return them
            return out
        if not out and not waited:
            # Every partition paused or stepping through refetches: nothing awaited, so wait here,
            # or the caller's loop would spin without ever yielding to the event loop.
            await asyncio.sleep(timeout_ms / 1000)
        return out

    # -- inside ---------------------------------------------------------------------------
    def _assigned(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def _note(self, batches: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        # aiokafka returns records only of partitions assigned when the call returns: no check here.
        for tp, records in batches.items():
            if records:
                self.delivered[tp] = records[-1].offset + 1

    def _failed(self, exc: Exception, drained: set[TopicPartition]) -> None:
        named = corrupt_partition(exc)
        suspects = {named} if named is not None and named in drained else set(drained)  # unnamed: all of them
        probe = len(suspects) > 1  # which one it was is found by fetching each alone (_probe)
        for tp in suspects:
            self.stepping.setdefault(tp, SteppedPartition(until=self._consumer.highwater(tp), probe=probe))
        _log.warning("corrupt_batch", error=_describe(exc),
                     stepping=sorted(f"{t.topic}:{t.partition}" for t in suspects),
                     message="a fetched record batch could not be read; reading that partition one record "
                             "at a time to find it")
        self._rewind |= drained

    async def _do_rewind(self) -> None:
        """Seek each partition to be rewound to where its next undelivered record is."""
        for tp in sorted(self._rewind):
            if tp not in self._assigned():
                self._rewind.discard(tp)
                continue
            offset = self.delivered.get(tp)
            from_start = False
            if offset is None and self._committed is not None:
                offset = await self._committed(tp)  # raises while the coordinator is away: retried
                from_start = offset is None  # nothing committed: auto_offset_reset (earliest)
            try:
                if tp not in self._assigned():
                    pass  # revoked while we asked
                elif from_start:
                    await self._consumer.seek_to_beginning(tp)
                elif offset is not None:  # None: a reader's partition never read, left where it is
                    self._consumer.seek(tp, offset)
                    self.delivered[tp] = offset
            except IllegalStateError:
                pass  # revoked meanwhile: the next owner reads it from its committed offset
            self._rewind.discard(tp)

    async def _probe(self, tp: TopicPartition, timeout_ms: int,
                     max_records: int | None) -> list[ConsumerRecord[bytes, bytes]]:
        """Fetch a suspect alone, at full size: records read clean clear it (it was another
        partition's batch; stepping every partition of a backlog a record a time would take hours),
        a failure names it — rewound to its last delivered record and stepped from there."""
        try:
            got = await self._consumer.getmany(tp, timeout_ms=timeout_ms, max_records=max_records)
        except UNREADABLE:
            state = self.stepping.get(tp)
            if state is not None and tp in self._assigned():
                state.probe = False
                self._rewind.add(tp)  # what the failed fetch drained goes back
            return []
        records = got.get(tp, [])
        if records and tp in self.stepping and tp in self._assigned():
            self.delivered[tp] = records[-1].offset + 1
            self.stepping.pop(tp, None)  # read clean: not the bad one
        return records

    async def _step(self, tp: TopicPartition, timeout_ms: int) -> list[ConsumerRecord[bytes, bytes]]:
        try:
            got = await self._consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        except UNREADABLE as exc:
            state = self.stepping.get(tp)
            if state is None or tp not in self._assigned():
                return []  # revoked (or sought) while it fetched
            # The failure left the position at the bad batch, valid: position() does not wait.
            position: int = await self._consumer.position(tp)
            if state.failure(position):
                self._unreadable.append(UnreadableOffset(
                    tp, position, f"the record batch holding it could not be read on any fetch ({_describe(exc)}; "
                                  f"{REFETCHES} refetches): the record cannot be read, its offset is skipped"))
                _log.error("corrupt_record_skipped", topic=tp.topic, partition=tp.partition, offset=position)
                position += 1
            self._consumer.seek(tp, position)  # refetch (the same offset, or the next one)
            self.delivered[tp] = position
            return []
        records = got.get(tp, [])
        state = self.stepping.get(tp)
        if not records or state is None or tp not in self._assigned():
            return records  # (an unassigned partition returns nothing)
        self.delivered[tp] = records[-1].offset + 1
        if state.passed(records[-1].offset):
            self.stepping.pop(tp, None)
            _log.warning("corrupt_batch_passed", topic=tp.topic, partition=tp.partition,
                         offset=records[-1].offset, skipped=state.skipped)
        return records


def _describe(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a record header key is not UTF-8: {exc}"
    return f"failed the CRC check: {exc}"

"""Rebuild lost windows from the input topic, the way Kafka Streams and Quix Streams restore a state
store from its changelog.

Redis is a cache of the input topic: every bar it held came from a record Kafka still has (within
its retention). When Redis comes back empty (no persistence, a failover that lost writes), each
partition is read again by a :class:`~worker.transport.reader.PartitionReader` (no group, no
commits) from the offset of the first record within one window's worth of time before the last
record written, bounded by ``window.restore_max_records``, up to that record; the bars are written
back (upserts, so a bar already there is not changed) and nothing is forecast or dead-lettered a
second time. The worker then resumes where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition

from schemas import CandleFields, CandleRejected
from worker.observability.logging import get_logger
from worker.service.intake import decode_record, latest_admitted_ms
from worker.state.windows import WindowStore
from worker.transport.reader import PartitionReader

__all__ = ["RestoreRange", "RestoreReport", "StateEpoch", "lookup_time", "restore_windows"]

_log = get_logger("worker.service.restore")
_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class RestoreRange:
    """Re-read ``tp`` up to ``end`` (exclusive): records before it were written to the lost Redis.
    ``anchor_ms``: the Kafka timestamp of the record at ``end - 1`` when known."""

    end: int
    anchor_ms: int | None


@dataclass
class RestoreReport:
    records: int = 0
    bars: int = 0
    symbols: set[str] = field(default_factory=set)
    seconds: float = 0.0
    start: dict[TopicPartition, int] = field(default_factory=dict)


async def _anchor(reader: PartitionReader, tp: TopicPartition, end: int, timeout_s: float) -> int | None:
    """The timestamp of the record at ``end - 1`` (when the state was written), read from the topic."""
    reader.seek(tp, end - 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for rec in await reader.getmany(timeout_ms=200):
            if rec.partition != tp.partition or rec.topic != tp.topic:
                continue  # the reader holds every partition being restored: the others fetch too
            if rec.offset == end - 1 and rec.timestamp is not None and rec.timestamp >= 0:
                return int(rec.timestamp)
            if rec.offset >= end - 1:
                return None
        if any(u.tp == tp and u.offset >= end - 1 for u in reader.take_unreadable()):
            return None  # that record cannot be read
    return None


def lookup_time(anchor_ms: int | None, lookback_ms: int, latest_ms: int) -> int | None:
    """Where a partition's rebuild starts by time: a window's worth before its anchor, or None
    (start ``max_records`` back instead). An anchor after ``latest_ms`` (the clock plus tolerance) is
    a producer's clock error (CreateTime in µs, say): Kafka would find no record after
    ``anchor - lookback`` but the last one, and the rebuild would read back a single bar."""
    if anchor_ms is None or anchor_ms > latest_ms:
        return None
    return max(0, anchor_ms - lookback_ms)


async def restore_windows(
    reader: PartitionReader,
    store: WindowStore,
    ranges: Mapping[TopicPartition, RestoreRange],
    *,
    timeframe: str,
    timeframe_ms: int,
    max_bytes: int,
    lookback_ms: int,
    max_records: int,
    wanted: Callable[[TopicPartition], bool],
    now_ms: int,
    future_tolerance_s: int,
    timeout_s: float = 120.0,
) -> RestoreReport:
    """Write the bars of ``ranges`` back into ``store``; partitions no longer ``wanted`` are dropped.

    A record is written back when the first pass would have stored it (:func:`decode_record`, then
    final bars only), judged against the clock now (``now_ms``), not the record's timestamp: that is
    the producer's claim, and backfill tools stamp records with the bar's own time. A bar refused as
    ``final_before_close`` at intake that has closed since is therefore written back; the real final
    bar, consumed after the rebuild, replaces it.
    """
    report = RestoreReport()
    started = time.monotonic()
    todo = {tp: r for tp, r in ranges.items() if r.end > 0 and max_records > 0}
    if not todo:
        return report
    reader.assign(list(todo))
    begin = await reader.beginning_offsets(list(todo))
    anchors = {tp: r.anchor_ms for tp, r in todo.items()}
    for tp, r in todo.items():
        if anchors[tp] is None:
            anchors[tp] = await _anchor(reader, tp, r.end, timeout_s=10.0)
    latest_ms = latest_admitted_ms(now_ms, future_tolerance_s)
    by_time = await reader.offsets_for_times(
        {tp: t for tp, a in anchors.items() if (t := lookup_time(a, lookback_ms, latest_ms)) is not None})
    for tp, r in todo.items():
        start = max(begin.get(tp, 0), r.end - max_records)
        found = by_time.get(tp)
        if found is not None:
            start = max(start, min(found, r.end))
        report.start[tp] = start
        reader.seek(tp, start)
    remaining = {tp for tp, r in todo.items() if report.start[tp] < r.end}
    reader.pause([tp for tp in todo if tp not in remaining])
    deadline = time.monotonic() + timeout_s
    bars: list[CandleFields] = []
    while remaining and time.monotonic() < deadline:
        records: list[ConsumerRecord[bytes, bytes]] = await reader.getmany(timeout_ms=200)
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            if tp not in remaining:
                continue
            if rec.offset >= todo[tp].end:
                remaining.discard(tp)
                reader.pause([tp])
                continue
            report.records += 1
            try:
                candle = decode_record(rec, timeframe=timeframe, timeframe_ms=timeframe_ms, max_bytes=max_bytes,
                                       now_ms=now_ms, future_tolerance_s=future_tolerance_s)
            except CandleRejected:
                pass  # dead-lettered by the first pass
            else:
                if candle.is_final:  # in-progress bars are never stored
                    bars.append(candle)
            if rec.offset + 1 >= todo[tp].end:
                remaining.discard(tp)
                reader.pause([tp])
        for u in reader.take_unreadable():  # dead-lettered by the first pass; a last one ends the range
            if u.tp in remaining and u.offset + 1 >= todo[u.tp].end:
                remaining.discard(u.tp)
                reader.pause([u.tp])
        for tp in [tp for tp in remaining if not wanted(tp)]:
            remaining.discard(tp)
            reader.pause([tp])
        if len(bars) >= _CHUNK or (bars and not remaining):
            await _write(store, bars, report)
            bars = []
    if bars:
        await _write(store, bars, report)
    if remaining:
        _log.warning("restore_incomplete", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in remaining),
                     timeout_s=timeout_s)
    report.seconds = time.monotonic() - started
    return report


async def _write(store: WindowStore, bars: list[CandleFields], report: RestoreReport) -> None:
    await store.apply(bars)
    report.bars += len(bars)
    report.symbols.update(b.symbol for b in bars)


@dataclass
class StateEpoch:
    """Whether Redis still holds this deployment's state, from its epoch marker.

    The worker claims the marker at start-up; every ``apply`` reads it in the same round trip and
    the health tick claims it again. Another token than ours (or none) means Redis lost the state in
    between, whichever replica noticed first and wrote the new one: the windows are rebuilt
    (``due``) before anything else is written.
    """

    token: str | None = None
    due: bool = False  # ask the marker (and maybe rebuild) before the next write
    lost: bool = False  # the state is known to be lost: rebuild whatever the marker says now

    def started(self, token: str, created: bool) -> None:
        # No marker at start-up: the first start of this deployment, or a Redis that lost its data.
        # Either way the windows of partitions with committed offsets are rebuilt from the topic.
        self.token = token
        self.due = self.lost = created

    def unknown(self) -> None:
        """Redis was unreachable at start-up: ask again before the first write."""
        self.due = True

    def seen(self, token: str | None) -> bool:
        """The marker as Redis held it (read with a write, or claimed): True if it is still ours."""
        if token == self.token:
            return True
        if not self.due:
            self.due = self.lost = True
        return False

    def needs_rebuild(self, token: str, created: bool) -> bool:
        """Before rebuilding: adopt the marker now stored; rebuild if the state is known lost or
        the marker had to be created."""
        self.token = token
        return self.lost or created

    def rebuilt(self) -> None:
        self.due = self.lost = False

"""Which offset of each partition may be committed.

Every record is registered when it is fetched and completed when its effects are durable (its
forecast or dead-letter record acknowledged, or its window write done when it triggers nothing).
The committable offset of a partition is the lowest offset still pending, or one past the highest
seen when nothing is pending: an offset is never committed before every earlier one is done.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class _PartitionState:
    pending: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # lazily pruned min-heap over pending
    next_offset: int | None = None  # one past the highest offset seen


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._committed: dict[TopicPartition, int] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        st = self._parts.setdefault(tp, _PartitionState())
        if offset in st.pending:
            return
        st.pending.add(offset)
        heapq.heappush(st.heap, offset)
        if st.next_offset is None or offset + 1 > st.next_offset:
            st.next_offset = offset + 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        st = self._parts.get(tp)
        if st is not None:
            st.pending.discard(offset)

    def done_many(self, items: Iterable[tuple[TopicPartition, int]]) -> None:
        for tp, offset in items:
            self.done(tp, offset)

    def pending_count(self) -> int:
        return sum(len(st.pending) for st in self._parts.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets (next to read) that are safe to commit and newer than the last commit."""
        out: dict[TopicPartition, int] = {}
        for tp, st in self._parts.items():
            while st.heap and st.heap[0] not in st.pending:
                heapq.heappop(st.heap)
            position = st.heap[0] if st.heap else st.next_offset
            if position is not None and position > self._committed.get(tp, -1):
                out[tp] = position
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: their uncommitted records are the next owner's to replay."""
        for tp in partitions:
            self._parts.pop(tp, None)
            self._committed.pop(tp, None)

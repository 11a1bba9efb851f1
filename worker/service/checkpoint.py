"""The commit policy, as one object (Quix Streams' ``checkpointing/checkpoint.py`` plays this part).

It knows which offset of each partition is safe (the :class:`OffsetTracker`: the lowest record
whose effects are not durable yet), and when to commit: at most every ``interval_s`` while
running, at once on a revoke (before the partition moves) and at shutdown. Only partitions that
the ledger still owns are committed; a failed commit (a rebalance under way, a broker away) is
counted and retried at the next turn — the records stay uncommitted, so nothing is lost and at
worst the next owner forecasts them again.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

from aiokafka import TopicPartition

from worker.observability.logging import get_logger
from worker.observability.metrics import Metrics
from worker.service.jobs import Offset
from worker.service.offsets import OffsetTracker
from worker.transport.consumer import CandleConsumer

__all__ = ["Checkpoint"]

_log = get_logger("worker.service.checkpoint")


class Checkpoint:
    def __init__(self, metrics: Metrics, *, interval_s: float = 0.2) -> None:
        self.tracker = OffsetTracker()
        self.interval_s = interval_s
        self._metrics = metrics
        self._last = 0.0
        self.failures = 0  # consecutive failed commits (readiness reads it)

    # -- what is done ---------------------------------------------------------------------
    def register(self, tp: TopicPartition, offset: int) -> None:
        self.tracker.add(tp, offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self.tracker.done(tp, offset)

    def done_many(self, items: Iterable[Offset]) -> None:
        self.tracker.done_many(items)

    def pending(self) -> int:
        return self.tracker.pending_count()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        self.tracker.forget(partitions)

    # -- when to commit -------------------------------------------------------------------
    async def maybe_commit(self, consumer: CandleConsumer, owned: Collection[TopicPartition]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        await self.commit(consumer, owned)

    async def commit(self, consumer: CandleConsumer, partitions: Collection[TopicPartition]) -> bool:
        """Commit what is safe for ``partitions``; False (logged, counted) if the broker refused."""
        offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in partitions}
        if not offsets:
            return True
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # a rebalance in progress, or the broker away: retried next turn
            self.failures += 1
            self._metrics.broker_errors.inc()
            _log.warning("commit_failed", error=repr(exc), partitions=len(offsets), consecutive=self.failures)
            return False
        self.failures = 0
        self.tracker.mark_committed(offsets)
        return True

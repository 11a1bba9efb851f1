"""The commit policy, as one object (Quix Streams' ``checkpointing/checkpoint.py`` plays this part).

It knows which offset of each partition is safe (the :class:`OffsetTracker`: the lowest record
whose effects are not durable yet), and when to commit: at most every ``interval_s`` while
running, at once on a revoke (before the partition moves) and at shutdown. Only partitions that
the ledger still owns are committed; a failed commit (a rebalance under way, a broker away) is
counted and retried after the service's backoff (:class:`~worker.service.retry.Backoff`, so a
refusing broker is not asked five times a second, nor the log filled at that rate) — the records
stay uncommitted, so nothing is lost and at worst the next owner forecasts them again.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable

from aiokafka import TopicPartition

from worker.observability.logging import get_logger
from worker.observability.metrics import Metrics
from worker.service.jobs import Offset
from worker.service.offsets import OffsetTracker
from worker.service.retry import Backoff
from worker.transport.consumer import CandleConsumer

__all__ = ["Checkpoint"]

_log = get_logger("worker.service.checkpoint")


class Checkpoint:
    def __init__(self, metrics: Metrics, *, interval_s: float = 0.2, max_backoff_s: float = 10.0) -> None:
        self.tracker = OffsetTracker()
        self.interval_s = interval_s
        self._metrics = metrics
        self._next_at = 0.0  # monotonic time of the next periodic commit
        self._backoff = Backoff(max(max_backoff_s, interval_s), initial_s=interval_s)
        self.failures = 0  # consecutive failed commits

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
        if time.monotonic() < self._next_at:
            return
        await self.commit(consumer, owned)

    async def commit(self, consumer: CandleConsumer, partitions: Collection[TopicPartition]) -> bool:
        """Commit what is safe for ``partitions``; False (logged, counted) if the broker refused."""
        offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in partitions}
        if not offsets:
            self._next_at = time.monotonic() + self.interval_s
            return True
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # a rebalance in progress, or the broker away: retried after a backoff
            self.failures += 1
            delay = self._backoff.next_delay()
            self._next_at = time.monotonic() + delay
            self._metrics.broker_errors.inc()
            _log.warning("commit_failed", error=repr(exc), partitions=len(offsets), consecutive=self.failures,
                         retry_in_s=round(delay, 2))
            return False
        self.failures = 0
        self._backoff.reset()
        self._next_at = time.monotonic() + self.interval_s
        self.tracker.mark_committed(offsets)
        return True

"""Publishing with the one retry policy: every record acknowledged, retried, or a clear fatal error.

A failed acknowledgement is classified by :func:`worker.service.retry.is_retriable`:

* retriable (the broker away, a leader moving, a produce batch expired after
  ``request_timeout_ms``): the batches that failed are sent again with backoff, as long as the work
  is still wanted (its partitions still owned, the worker not stopping). Meanwhile the publisher
  reports an outage, so the worker pauses its partitions and says it is not ready. A resent batch
  may duplicate records the broker did store; every forecast carries its idempotency key.
* not retriable (a record too large, no authorisation, an invalid topic): :class:`PublishFailed`
  naming the topic and the setting to check; the worker exits non-zero without committing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, TopicAuthorizationFailedError

from worker.errors import PublishFailed
from worker.observability.logging import get_logger
from worker.observability.metrics import Metrics
from worker.service.retry import Backoff, is_retriable
from worker.transport.producer import OutRecord, RecordProducer

__all__ = ["Publisher"]

_log = get_logger("worker.service.publisher")


def _hint(exc: BaseException) -> str:
    if isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError)):
        return ("SIGNAL_WORKER_KAFKA__MAX_REQUEST_BYTES and the topic's max.message.bytes / the broker's "
                "message.max.bytes")
    if isinstance(exc, TopicAuthorizationFailedError):
        return "the ACLs of SIGNAL_WORKER_KAFKA__SASL_USERNAME (WRITE on the topic)"
    return "the topic's configuration and the broker's log"


class Publisher:
    def __init__(self, producer: RecordProducer, metrics: Metrics, *, max_backoff_s: float,
                 stall_after_s: float, on_outage: Callable[[bool], None]) -> None:
        self.producer = producer
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._stall_after_s = stall_after_s
        self._on_outage = on_outage
        self._failing = 0  # publishes currently between a failed attempt and their next success
        self._started: dict[int, float] = {}  # publish id -> monotonic start, while unacknowledged
        self._ids = 0
        self.retries = 0

    @property
    def failing(self) -> bool:
        return self._failing > 0

    def stalled(self) -> bool:
        """A publish is failing, or has waited for its acknowledgement longer than it should."""
        if self._failing:
            return True
        now = time.monotonic()
        return any(now - t > self._stall_after_s for t in self._started.values())

    async def publish(self, topic: str, records: list[OutRecord], *, setting: str,
                      wanted: Callable[[], bool], keep: Callable[[OutRecord], bool] | None = None) -> bool:
        """Send ``records`` and wait until the broker acknowledged every one.

        Returns False when the work stopped being ``wanted`` while retrying (partitions revoked,
        worker stopping): the records are then left to whoever replays them. Before every resend the
        failed records are filtered by ``keep`` (a record of a partition revoked meanwhile is the new
        owner's to publish: resending it would race the owner with a duplicate); True once every record
        still kept is acknowledged. Raises :class:`PublishFailed` for an error no retry can fix.
        """
        if not records:
            return True
        self._ids += 1
        pid = self._ids
        self._started[pid] = time.monotonic()
        backoff = Backoff(self._max_backoff_s)
        failing = False
        todo = records
        try:
            while True:
                failed, error = await self._attempt(topic, todo)
                if error is None:
                    return True
                self._metrics.broker_errors.inc()
                if not is_retriable(error):
                    raise PublishFailed(
                        f"publishing to topic {topic!r} ({setting}) failed and cannot succeed by retrying: "
                        f"{error!r}; check {_hint(error)}") from error
                if not failing:
                    failing = True
                    self._failing += 1
                    self._on_outage(True)
                self.retries += 1
                delay = backoff.next_delay()
                _log.warning("publish_retry", topic=topic, records=len(failed), attempt=backoff.attempts,
                             error=repr(error), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                if not wanted():
                    _log.info("publish_abandoned", topic=topic, records=len(failed))
                    return False
                todo = failed if keep is None else [r for r in failed if keep(r)]
                if len(todo) < len(failed):
                    _log.info("publish_dropped_revoked", topic=topic, records=len(failed) - len(todo))
                if not todo:
                    return True
        finally:
            self._started.pop(pid, None)
            if failing:
                self._failing -= 1
                if not self._failing:
                    _log.info("publish_recovered", topic=topic, attempts=backoff.attempts)
                    self._on_outage(False)

    async def _attempt(self, topic: str, records: list[OutRecord]) -> tuple[list[OutRecord], BaseException | None]:
        """One try: the records whose batch failed, and the first error (None: all acknowledged)."""
        try:
            sent = await self.producer.send_batches(topic, records)
        except Exception as exc:  # no metadata in time, no room in the queue, a record too large
            return records, exc
        results: list[Any] = await asyncio.gather(*(f for f, _ in sent), return_exceptions=True)
        failed: list[OutRecord] = []
        error: BaseException | None = None
        for (_, batch), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                failed.extend(batch)
                if error is None or (is_retriable(error) and not is_retriable(result)):
                    error = result  # a non-retriable failure decides
        return failed, error

"""The one retry policy of the service: which errors are worth retrying, and how long to wait.

Every operation the worker repeats after a failure (publishing, committing, a Redis write, the
broker bootstrap) asks :func:`is_retriable` and waits :class:`Backoff` between attempts; nothing
else decides. The classification reads the errors' own ``retriable`` flag — aiokafka's
``KafkaError.retriable`` and ours (:mod:`worker.errors`) — with one deliberate exception, named
below, so a new error is classified once, where it is defined.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from aiokafka.errors import KafkaError, KafkaTimeoutError

from worker.errors import SignalWorkerError

__all__ = ["Backoff", "is_retriable"]


def is_retriable(exc: BaseException) -> bool:
    """True when the same operation may succeed if repeated later."""
    if isinstance(exc, SignalWorkerError):
        return exc.retriable
    if isinstance(exc, KafkaTimeoutError):
        # aiokafka marks it non-retriable, but it is what a produce batch gets when it expired
        # after request_timeout_ms without an acknowledgement, and what a metadata wait gets while
        # the broker is away: an outage, not a wrong request. Retrying resends the same records
        # (same idempotency keys), so at worst a consumer sees a duplicate.
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    # Socket-level failures below aiokafka's own classes.
    return isinstance(exc, (TimeoutError, ConnectionError))


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``initial_s``, doubling up to ``max_s``; ``reset`` after a success."""

    max_s: float
    initial_s: float = 0.1
    attempts: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2 ** min(self.attempts, 30))
        self.attempts += 1
        # Up to 20 % jitter, so replicas that failed together do not retry in lockstep.
        return delay * (0.8 + 0.2 * random.random())

    def reset(self) -> None:
        self.attempts = 0

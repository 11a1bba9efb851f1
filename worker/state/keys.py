"""Where a deployment's state lives in Redis: one key layout, one namespace rule.

Keys are ``{prefix}:{namespace}:{{SYMBOL}}:w`` (window) and ``…:m`` (watermark), plus one
``{prefix}:{namespace}:epoch`` marker per deployment. The namespace is the deployment's identity
(``SIGNAL_WORKER_REDIS__NAMESPACE``, or ``<consumer group>@<timeframe>`` when unset), so a canary
with its own group, or a 1h deployment beside a 5m one, never reads or writes another's bars. The
braces around the symbol are a Redis Cluster hash tag: both keys of a symbol share a slot, so one
script may touch them together.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.timeframe import format_duration, parse_duration_ms
from worker.errors import ConfigError
from worker.settings import NAMESPACE_PATTERN, NAMESPACE_RULE, Settings

__all__ = ["KeyLayout", "check_namespace", "deployment_namespace"]

NAMESPACE_ENV = "SIGNAL_WORKER_REDIS__NAMESPACE"


def check_namespace(namespace: str, *, source: str = NAMESPACE_ENV) -> str:
    """``namespace`` if it is usable inside a key; otherwise :class:`ConfigError` naming ``source``."""
    if NAMESPACE_PATTERN.fullmatch(namespace) is None:
        raise ConfigError(f"{source}: namespace {namespace!r} is not usable in Redis keys: {NAMESPACE_RULE}")
    return namespace


def deployment_namespace(settings: Settings, timeframe: str) -> str:
    """The deployment's namespace: the explicit setting, else ``<consumer group>@<timeframe>``.

    The timeframe is normalised (``"60m"`` and ``"1h"`` are one deployment's identity).
    """
    if settings.redis.namespace:
        return check_namespace(settings.redis.namespace)
    try:
        frame = format_duration(parse_duration_ms(timeframe))
    except ValueError as exc:
        raise ConfigError(f"SIGNAL_WORKER_WINDOW__TIMEFRAME: {exc}") from exc
    return check_namespace(
        f"{settings.kafka.consumer_group}@{frame}",
        source=f"SIGNAL_WORKER_KAFKA__CONSUMER_GROUP (set {NAMESPACE_ENV} to a key-safe name instead)",
    )


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The key names of one deployment. ``namespace=None`` is the layout before namespaces existed
    (``{prefix}:{{SYMBOL}}:w``), kept for tools that read old keys; the service always has one."""

    prefix: str
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.namespace is not None:
            check_namespace(self.namespace)

    @property
    def base(self) -> str:
        return self.prefix if self.namespace is None else f"{self.prefix}:{self.namespace}"

    def window(self, symbol: str) -> str:
        return f"{self.base}:{{{symbol}}}:w"

    def watermark(self, symbol: str) -> str:
        return f"{self.base}:{{{symbol}}}:m"

    def epoch(self) -> str:
        return f"{self.base}:epoch"

"""Build the worker's Redis client from :class:`~worker.settings.RedisSettings`."""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from worker.errors import ConfigError
from worker.settings import RedisSettings

__all__ = ["make_redis"]


def make_redis(
    settings: RedisSettings,
    *,
    health_check_interval_s: int = 30,
    max_connections: int = 16,
    client_name: str | None = None,
) -> Redis:
    """A ``redis.asyncio.Redis`` for ``settings.url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``settings.username``/``password`` override credentials in the URL. The client retries a
    failed command once, quickly: that hides a pooled connection gone stale after a Redis restart
    or failover, while a real outage surfaces within about one socket timeout, so the caller's own
    backoff (and pausing of Kafka input) takes over. redis-py's default (10 retries with up to 1 s
    backoff) would stall the worker for seconds without telling anyone.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": health_check_interval_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), retries=1),
        "decode_responses": False,
        "client_name": client_name,
    }
    kwargs.update(parse_url(settings.url))
    if settings.username is not None:
        kwargs["username"] = settings.username
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    if settings.ssl_ca_certs is not None:
        connection_class = kwargs.get("connection_class")
        if not (isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)):
            raise ConfigError("SIGNAL_WORKER_REDIS__SSL_CA_CERTS is set but SIGNAL_WORKER_REDIS__URL is not rediss://")
        kwargs["ssl_ca_certs"] = str(settings.ssl_ca_certs)
    pool = ConnectionPool(max_connections=max_connections, **kwargs)
    return Redis.from_pool(pool)

"""Shared fixtures: a real broker (embedded Tansu) and a real Redis, never mocks of them.

* ``broker`` (session): an :class:`~worker.dev.embedded.EmbeddedBroker`; ``kafka_bootstrap`` is its
  ``host:port``. Shared by every test: use ``topic_factory`` names and unique group ids, never
  stop it (tests that need an outage start their own ``EmbeddedBroker``).
* ``redis_url`` (session): ``SIGNAL_WORKER_TEST_REDIS_URL`` if set, else the machine's Redis at
  127.0.0.1:6379 when it answers PING, else an embedded valkey. The first two may be shared with
  other users: keep to ``unique_prefix`` keys, delete only those, never FLUSHDB/SCRIPT FLUSH/CONFIG
  SET there.
* ``own_redis`` (per test): an :class:`~worker.dev.embedded.EmbeddedRedis` the test may stop, restart,
  flush or reconfigure.
* ``redis_client`` (per test): a ``redis.asyncio.Redis`` on ``redis_url`` that deletes the test's
  ``unique_prefix`` keys afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis

from worker.dev.embedded import EmbeddedBroker, EmbeddedRedis

MACHINE_REDIS_URL = "redis://127.0.0.1:6379/0"

# Generous: a 2-core CI box running other jobs can take seconds to spawn a server.
STARTUP_TIMEOUT_S = 60.0


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(startup_timeout_s=STARTUP_TIMEOUT_S) as embedded:
        yield embedded


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: EmbeddedBroker) -> str:
    return broker.bootstrap


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("SIGNAL_WORKER_TEST_REDIS_URL")
    if configured:
        yield configured
    elif _answers_ping(MACHINE_REDIS_URL):
        yield MACHINE_REDIS_URL
    else:
        with EmbeddedRedis(startup_timeout_s=STARTUP_TIMEOUT_S) as embedded:
            yield embedded.url


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(startup_timeout_s=STARTUP_TIMEOUT_S) as embedded:
        yield embedded


@pytest.fixture
def unique_prefix() -> str:
    """A key prefix no other test (or other user of a shared Redis) will use."""
    return f"t{uuid.uuid4().hex[:16]}"


@pytest_asyncio.fixture
async def redis_client(redis_url: str, unique_prefix: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{unique_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def topic_factory() -> Callable[..., str]:
    """``topic_factory("candles") -> "candles-3f9a..."``: a topic name no other test uses.

    Topics auto-create on first use (with the broker's default partition count); call
    :func:`worker.dev.embedded.create_topics` first for a specific number of partitions.
    """

    def make(hint: str = "t") -> str:
        return f"{hint}-{uuid.uuid4().hex[:12]}"

    return make

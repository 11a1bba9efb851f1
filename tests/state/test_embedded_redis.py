"""EmbeddedRedis: the throw-away valkey the tests and ``dev`` runs use."""

from __future__ import annotations

import pytest
import redis

from worker.dev.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration


def test_restart_keeps_the_url_and_starts_empty() -> None:
    with EmbeddedRedis() as server:
        url = server.url
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}

        server.stop()
        assert not server.is_running()
        server.stop()  # idempotent
        server.start()
        assert server.url == url
        assert client.get("k") is None
        client.close()
    assert not server.is_running()

"""make_redis: how settings become a redis.asyncio client (no server needed)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from worker.errors import ConfigError
from worker.settings import RedisSettings
from worker.state import make_redis


def settings(**values: Any) -> RedisSettings:
    return RedisSettings.model_validate(values)


def kwargs_of(client: Redis) -> dict[str, Any]:
    return dict(client.connection_pool.connection_kwargs)


async def test_url_parts_and_timeouts() -> None:
    client = make_redis(settings(url="redis://cache.internal:6380/3", socket_timeout_s=2.5))
    kw = kwargs_of(client)
    assert (kw["host"], kw["port"], kw["db"]) == ("cache.internal", 6380, 3)
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 2.5
    assert kw["health_check_interval"] == 30
    assert kw["decode_responses"] is False
    assert kw["retry"].get_retries() == 1  # fail fast; the caller owns the backoff
    await client.aclose()


async def test_settings_credentials_override_the_url() -> None:
    client = make_redis(settings(url="redis://urluser:urlpass@h:6379/0", username="worker", password="s3cret"))
    kw = kwargs_of(client)
    assert (kw["username"], kw["password"]) == ("worker", "s3cret")
    await client.aclose()

    client = make_redis(settings(url="redis://urluser:urlpass@h:6379/0"))
    kw = kwargs_of(client)
    assert (kw["username"], kw["password"]) == ("urluser", "urlpass")
    await client.aclose()


async def test_tls_with_ca_bundle(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until connect")
    client = make_redis(settings(url="rediss://h:6380/0", ssl_ca_certs=ca))
    assert client.connection_pool.connection_class is SSLConnection
    assert kwargs_of(client)["ssl_ca_certs"] == str(ca)
    await client.aclose()


async def test_tls_verifies_the_server_host_name() -> None:
    # redis-py >= 6 (the floor in pyproject.toml): a certificate for another host is refused.
    client = make_redis(settings(url="rediss://cache.internal:6380/0"))
    connection = client.connection_pool.make_connection()
    assert isinstance(connection, SSLConnection)
    assert connection.ssl_context.check_hostname is True
    assert connection.ssl_context.cert_reqs == ssl.CERT_REQUIRED
    await client.aclose()


def test_ca_bundle_without_tls_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="SIGNAL_WORKER_REDIS__SSL_CA_CERTS"):
        make_redis(settings(url="redis://h:6379/0", ssl_ca_certs=tmp_path / "ca.pem"))


async def test_unix_socket_url() -> None:
    client = make_redis(settings(url="unix:///run/redis/redis.sock?db=2"))
    assert client.connection_pool.connection_class is UnixDomainSocketConnection
    assert kwargs_of(client)["path"] == "/run/redis/redis.sock"
    await client.aclose()


def test_a_certificate_the_ca_bundle_does_not_trust_is_a_setting_to_fix_not_an_outage() -> None:
    """redis-py raises a refused server certificate as a ConnectionError (retried for ever as an
    outage) with the TLS error as its context; the worker must stop and name the setting."""
    import ssl

    from redis import exceptions as rexc

    from worker.errors import StateMisconfigured, StateUnavailable
    from worker.state.classify import state_error

    def raised(tls: BaseException) -> BaseException:
        try:
            try:
                raise tls
            except OSError as exc:  # as redis-py's Connection.connect does
                raise rexc.ConnectionError(f"Error 1 connecting to redis.example:6380. {exc}.") from None
        except rexc.ConnectionError as exc:
            exc.__context__ = tls
            return exc

    refused = raised(ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer"))
    err = state_error(refused, "ping")
    assert isinstance(err, StateMisconfigured)
    assert "SIGNAL_WORKER_REDIS__SSL_CA_CERTS" in str(err) and "SIGNAL_WORKER_REDIS__URL" in str(err)
    # a TLS session cut mid-way is the network's doing: still an outage
    assert isinstance(state_error(raised(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), "ping"),
                      StateUnavailable)
    assert isinstance(state_error(rexc.ConnectionError("Connection refused"), "ping"), StateUnavailable)

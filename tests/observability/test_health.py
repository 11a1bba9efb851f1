from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from worker.observability import HealthServer, Metrics


class _Readiness:
    def __init__(self) -> None:
        self.ready = False
        self.detail: dict[str, Any] = {"assigned_partitions": [], "model_loaded": True, "redis": "ok"}
        self.raise_: Exception | None = None
        self.delay = 0.0

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.raise_ is not None:
            raise self.raise_
        return self.ready, self.detail


@pytest.fixture
def readiness() -> _Readiness:
    return _Readiness()


@pytest.fixture
async def server(readiness: _Readiness) -> AsyncIterator[HealthServer]:
    metrics = Metrics()
    metrics.forecasts_out.inc(5)
    srv = HealthServer(
        "127.0.0.1", 0, metrics.registry, readiness, readiness_timeout_s=0.2, request_timeout_s=0.5
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await _raw(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n".encode())


async def test_port_zero_binds_a_real_port(server: HealthServer) -> None:
    assert server.port > 0


async def test_healthz(server: HealthServer) -> None:
    status, headers, body = await _get(server.port, "/healthz")
    assert status == 200 and body == b"ok\n"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)


async def test_metrics(server: HealthServer) -> None:
    status, headers, body = await _get(server.port, "/metrics?x=1")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"signal_worker_forecasts_total 5.0" in body


async def test_readyz_follows_the_callback(server: HealthServer, readiness: _Readiness) -> None:
    status, headers, body = await _get(server.port, "/readyz")
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "ready": False,
        "assigned_partitions": [],
        "model_loaded": True,
        "redis": "ok",
    }

    readiness.ready = True
    readiness.detail = {"assigned_partitions": ["candles-0", "candles-3"]}
    status, _, body = await _get(server.port, "/readyz")
    assert status == 200
    assert json.loads(body)["assigned_partitions"] == ["candles-0", "candles-3"]


async def test_readyz_is_503_when_the_check_fails_or_hangs(
    server: HealthServer, readiness: _Readiness
) -> None:
    readiness.ready = True
    readiness.raise_ = ConnectionError("redis down")
    status, _, body = await _get(server.port, "/readyz")
    assert status == 503 and "redis down" in json.loads(body)["error"]

    readiness.raise_ = None
    readiness.delay = 1.0
    status, _, body = await _get(server.port, "/readyz")
    assert status == 503 and "timed out" in json.loads(body)["error"]


async def test_head_has_no_body(server: HealthServer) -> None:
    status, headers, body = await _get(server.port, "/healthz", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == "3"


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"\x00\xff\xfe binary junk\r\n\r\n", 400),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
    ],
)
async def test_bad_requests_get_an_error_not_a_crash(
    server: HealthServer, request_bytes: bytes, expected: int
) -> None:
    status, _, _ = await _raw(server.port, request_bytes)
    assert status == expected
    status, _, _ = await _get(server.port, "/healthz")  # still serving
    assert status == 200


async def test_slow_or_silent_clients_are_cut_off(server: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finishes the headers
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    assert raw.startswith(b"HTTP/1.1 408")
    writer.close()

    # a client that connects and vanishes does not disturb the next one
    _, w2 = await asyncio.open_connection("127.0.0.1", server.port)
    w2.close()
    status, _, _ = await _get(server.port, "/healthz")
    assert status == 200


async def test_stop_closes_idle_connections_and_the_port(readiness: _Readiness) -> None:
    srv = HealthServer("127.0.0.1", 0, Metrics().registry, readiness, request_timeout_s=30)
    await srv.start()
    port = srv.port
    _, writer = await asyncio.open_connection("127.0.0.1", port)  # idle, holds a handler
    await asyncio.sleep(0.05)
    await asyncio.wait_for(srv.stop(), 2)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await srv.stop()  # idempotent

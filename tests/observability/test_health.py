from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

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


# -- slots under abuse (issue 9, E13): real sockets, the server's own deadlines -------------------


async def _open_idle(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]


async def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_200_idle_connections_never_starve_the_probes(readiness: _Readiness) -> None:
    # Read deadline far away: only eviction of the oldest idle connections can make room here.
    srv = HealthServer("127.0.0.1", 0, Metrics().registry, readiness, request_timeout_s=60, max_connections=64)
    await srv.start()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        idle = await _open_idle(srv.port, 200)
        await _until(lambda: srv.evicted >= 200 - 64)
        assert srv.open_connections <= 64
        for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
            status, _, _ = await asyncio.wait_for(_get(srv.port, path), 2.0)  # far inside the 60 s deadline
            assert status in (200, 503)
        # The oldest idle connections were the ones closed, without a word.
        assert await asyncio.wait_for(idle[0][0].read(), 2.0) == b""
        await _close_all(idle)
        idle = []
        await _until(lambda: srv.open_connections == 0)
        status, _, _ = await _get(srv.port, "/healthz")
        assert status == 200
    finally:
        await _close_all(idle)
        await srv.stop()


async def test_idle_connections_are_closed_at_the_read_deadline(readiness: _Readiness) -> None:
    srv = HealthServer("127.0.0.1", 0, Metrics().registry, readiness, request_timeout_s=0.3)
    await srv.start()
    try:
        idle = await _open_idle(srv.port, 50)
        await _until(lambda: srv.open_connections == 50, timeout=5)
        answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in idle)), 5.0)
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
        await _until(lambda: srv.open_connections == 0)
        await _close_all(idle)
    finally:
        await srv.stop()


async def test_slowloris_headers_do_not_block_probes(readiness: _Readiness) -> None:
    srv = HealthServer("127.0.0.1", 0, Metrics().registry, readiness, request_timeout_s=60, max_connections=32)
    await srv.start()
    slow = await _open_idle(srv.port, 100)
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            for _, writer in slow:
                with contextlib.suppress(Exception):
                    writer.write(b"X")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        for _ in range(5):
            status, _, body = await asyncio.wait_for(_get(srv.port, "/healthz"), 2.0)
            assert status == 200 and body == b"ok\n"
        assert srv.open_connections <= 32
    finally:
        stop.set()
        await task
        await _close_all(slow)
        await srv.stop()


class _ManyMetrics:
    """A collector whose exposition is a few MB, so a client that does not read blocks the write."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("t_padding", "padding", labels=["i", "pad"])
        pad = "x" * 8000  # few samples with long labels: MBs of output, cheap to render
        for i in range(500):
            family.add_metric([str(i), pad], float(i))
        yield family


async def test_a_client_that_never_reads_is_dropped_at_the_write_deadline(readiness: _Readiness) -> None:
    registry = CollectorRegistry()
    registry.register(_ManyMetrics())
    srv = HealthServer("127.0.0.1", 0, registry, readiness, write_timeout_s=0.5)
    await srv.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
        await asyncio.get_running_loop().sock_sendall(sock, b"GET /metrics HTTP/1.1\r\n\r\n")
        await _until(lambda: srv.open_connections == 1, timeout=5)
        status, _, _ = await _get(srv.port, "/healthz")  # served meanwhile
        assert status == 200
        await _until(lambda: srv.open_connections == 0, timeout=15)  # never read a byte: dropped
    finally:
        sock.close()
        await srv.stop()


async def test_clients_that_request_and_never_read_cannot_exhaust_the_slots(readiness: _Readiness) -> None:
    registry = CollectorRegistry()
    registry.register(_ManyMetrics())
    # Write deadline far away: only eviction of the oldest response can make room here.
    srv = HealthServer("127.0.0.1", 0, registry, readiness, write_timeout_s=60, max_connections=4)
    await srv.start()
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(8):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            socks.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", srv.port))
            await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\n\r\n")
        await _until(lambda: srv.evicted >= 4)
        status, _, body = await asyncio.wait_for(_get(srv.port, "/healthz"), 5.0)
        assert status == 200 and body == b"ok\n"
        assert srv.open_connections <= 4
    finally:
        for sock in socks:
            sock.close()
        await srv.stop()


async def test_concurrent_readiness_probes_share_one_check(readiness: _Readiness) -> None:
    calls = 0

    async def counted() -> tuple[bool, dict[str, Any]]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return True, {}

    srv = HealthServer("127.0.0.1", 0, Metrics().registry, counted, readiness_timeout_s=1.0)
    await srv.start()
    try:
        results = await asyncio.gather(*(_get(srv.port, "/readyz") for _ in range(20)))
        assert [r[0] for r in results] == [200] * 20
        assert calls == 1
        await _get(srv.port, "/readyz")  # a later probe runs a fresh check
        assert calls == 2
    finally:
        await srv.stop()


async def test_a_hung_readiness_check_is_replaced(readiness: _Readiness) -> None:
    hang = asyncio.Event()
    calls = 0

    async def sometimes_hangs() -> tuple[bool, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await hang.wait()
        return True, {}

    srv = HealthServer("127.0.0.1", 0, Metrics().registry, sometimes_hangs, readiness_timeout_s=0.2)
    await srv.start()
    try:
        assert (await _get(srv.port, "/readyz"))[0] == 503
        await asyncio.sleep(0.05)
        assert (await _get(srv.port, "/readyz"))[0] == 200
    finally:
        await srv.stop()

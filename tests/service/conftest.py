"""Helpers for the streaming worker's integration tests: real broker (Tansu), real Redis, real worker.

Every test gets its own topics, consumer group and Redis key prefix (fixture ``wenv``), so tests can
share the session broker and the machine's Redis. Waiting is always polling with a generous deadline
(a 2-core CI box runs the broker, Redis, the worker and the test at once), never a fixed sleep that
has to be "long enough".

The real model: the hourly checkpoint as first shipped (``eurusd-1h-v1``; these tests feed hourly
candles), or the directory in
``SIGNAL_WORKER_TEST_CHECKPOINT`` when set (handy while the shipped one is being trained). Tests that
need it are skipped when neither exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from schemas import CandleEvent, ForecastMessage, decode_forecast, encode_candle
from schemas.headers import candle_headers
from worker.dev.embedded import EmbeddedBroker, create_topics
from worker.features.candles import load_csv
from worker.model.registry import CHECKPOINTS
from worker.service.app import SignalWorker
from worker.service.engine import TrivialEngine
from worker.settings import KafkaSettings, Settings, load_settings

TF = "1h"
TF_MS = 3_600_000
HORIZONS_MS = [TF_MS, 4 * TF_MS]
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a whole hour
DEADLINE_S = 90.0  # polling deadline for "eventually" checks; generous for a loaded 2-core box
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SIGNAL_WORKER = str(VENV_BIN / "signal-worker")

# The hourly checkpoint as first shipped (format 1): the service tests feed hourly candles.
CHECKPOINT = Path(os.environ.get("SIGNAL_WORKER_TEST_CHECKPOINT") or CHECKPOINTS["eurusd-1h-v1"])
HAVE_CHECKPOINT = (CHECKPOINT / "manifest.json").exists()
needs_model = pytest.mark.skipif(not HAVE_CHECKPOINT, reason=f"no model checkpoint at {CHECKPOINT}")
# Small sampling budget for tests: the behaviour under test is the pipeline, not forecast quality.
MODEL_SAMPLING = {"checkpoint": str(CHECKPOINT), "steps": 4, "samples": 16, "torch_threads": 1}


# ----------------------------------------------------------------------------------- candles
def synthetic_events(symbol: str, n: int, *, start: int = T0, seed: int | None = None,
                     level: float = 1.1) -> list[CandleEvent]:
    """``n`` consecutive valid final 1h bars (a random walk), deterministic per symbol and seed."""
    rng = random.Random(f"{symbol}/{seed}")
    out = []
    close = level * (1 + rng.random())
    for i in range(n):
        o = close
        close = o * math.exp(rng.gauss(0, 0.002))
        hi = max(o, close) * (1 + rng.random() * 0.001)
        lo = min(o, close) * (1 - rng.random() * 0.001)
        out.append(CandleEvent(symbol=symbol, timeframe=TF, open_time=start + i * TF_MS, open=o, high=hi, low=lo,
                               close=close, volume=float(rng.randint(1, 1000)), is_final=True))
    return out


_BASE = None


def model_events(symbol: str, n: int, index: int) -> list[CandleEvent]:
    """``n`` realistic bars (resampled EURUSD shapes on the real calendar) for the real model."""
    from worker.cli.service_commands import SHIPPED_CANDLES, candle_events, simulated_series

    global _BASE
    if _BASE is None:
        _BASE = load_csv(SHIPPED_CANDLES)
    return candle_events(simulated_series(_BASE, n, index, seed=11), symbol, TF)


def forecastable(events: Iterable[CandleEvent], window_bars: int) -> set[tuple[str, int]]:
    """(symbol, open_time) of every bar with at least ``window_bars`` bars of history (itself included),
    given each symbol's events in order and without gaps the engine would refuse."""
    seen: dict[str, int] = {}
    out = set()
    for ev in events:
        seen[ev.symbol] = seen.get(ev.symbol, 0) + 1
        if seen[ev.symbol] >= window_bars:
            out.add((ev.symbol, ev.open_time))
    return out


def interleave(per_symbol: Sequence[Sequence[CandleEvent]]) -> list[CandleEvent]:
    """Bar 0 of every symbol, then bar 1 of every symbol ... (how a live feed publishes)."""
    out = []
    for i in range(max(len(s) for s in per_symbol)):
        out.extend(s[i] for s in per_symbol if i < len(s))
    return out


# ----------------------------------------------------------------------------------- environment
@dataclass
class WorkerEnv:
    """Names one test's worker uses: topics, group, Redis prefix; plus where the servers are."""

    bootstrap: str
    redis_url: str
    prefix: str
    input: str
    output: str
    dlq: str
    group: str
    partitions: int

    def kafka(self, **overrides: Any) -> KafkaSettings:
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap, "input_topic": self.input, "output_topic": self.output,
            "dead_letter_topic": self.dlq, "consumer_group": self.group, "client_id": "svc-test",
            "request_timeout_ms": 15_000,
        }
        values.update(overrides)
        return KafkaSettings(**values)

    def settings(self, *, kafka: dict[str, Any] | None = None, redis: dict[str, Any] | None = None,
                 window: dict[str, Any] | None = None, batch: dict[str, Any] | None = None,
                 service: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None) -> Settings:
        sections: dict[str, Any] = {
            "kafka": self.kafka(**(kafka or {})),
            "redis": {"url": self.redis_url, "key_prefix": self.prefix, "socket_timeout_s": 2.0,
                      "retry_max_backoff_s": 1.0, **(redis or {})},
            "window": {"timeframe": TF, "conflate": False, "length": 64, **(window or {})},
            "batch": {"max_size": 64, "max_wait_ms": 10, **(batch or {})},
            "service": {"metrics_port": 0, "host": "127.0.0.1", "worker_id": f"w-{uuid.uuid4().hex[:6]}",
                        "shutdown_grace_s": 60.0, **(service or {})},
        }
        if sampling is not None:
            sections["sampling"] = sampling
        return load_settings(**sections)

    def subprocess_env(self, **overrides: str) -> dict[str, str]:
        """Environment for ``signal-worker run`` (real model, small sampling budget)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_WORKER_")}
        env.update({
            "SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "SIGNAL_WORKER_KAFKA__INPUT_TOPIC": self.input,
            "SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC": self.output,
            "SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC": self.dlq,
            "SIGNAL_WORKER_KAFKA__CONSUMER_GROUP": self.group,
            "SIGNAL_WORKER_KAFKA__REQUEST_TIMEOUT_MS": "15000",
            "SIGNAL_WORKER_REDIS__URL": self.redis_url,
            "SIGNAL_WORKER_REDIS__KEY_PREFIX": self.prefix,
            "SIGNAL_WORKER_WINDOW__TIMEFRAME": TF,
            "SIGNAL_WORKER_WINDOW__CONFLATE": "false",
            "SIGNAL_WORKER_SAMPLING__CHECKPOINT": str(CHECKPOINT),
            "SIGNAL_WORKER_SAMPLING__STEPS": "4",
            "SIGNAL_WORKER_SAMPLING__SAMPLES": "16",
            "SIGNAL_WORKER_SAMPLING__TORCH_THREADS": "1",
            "SIGNAL_WORKER_SAMPLING__DEVICE": "cpu",
            "SIGNAL_WORKER_SERVICE__METRICS_PORT": "0",
            "SIGNAL_WORKER_SERVICE__HOST": "127.0.0.1",
            "SIGNAL_WORKER_SERVICE__LOG_FORMAT": "json",
            "SIGNAL_WORKER_SERVICE__SHUTDOWN_GRACE_S": "60",
            "OMP_NUM_THREADS": "1",
        })
        env.update(overrides)
        return env


def delete_prefix(url: str, prefixes: Iterable[str]) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
    except (redis.RedisError, OSError):
        pass  # an owned Redis may be gone already
    finally:
        client.close()


async def make_env(broker: EmbeddedBroker, redis_url: str, *, partitions: int = 4,
                   prefix: str | None = None) -> WorkerEnv:
    tag = uuid.uuid4().hex[:10]
    env = WorkerEnv(bootstrap=broker.bootstrap, redis_url=redis_url, prefix=prefix or f"t{tag}",
                    input=f"candles-{tag}", output=f"forecasts-{tag}", dlq=f"dlq-{tag}", group=f"g-{tag}",
                    partitions=partitions)
    await create_topics(broker.bootstrap, {env.input: partitions, env.output: 2, env.dlq: 1})
    return env


@pytest_asyncio.fixture
async def wenv(broker: EmbeddedBroker, redis_url: str, unique_prefix: str) -> AsyncIterator[WorkerEnv]:
    """Topics (input: 4 partitions), group and key prefix for one test on the shared Redis."""
    env = await make_env(broker, redis_url, prefix=unique_prefix)
    try:
        yield env
    finally:
        delete_prefix(redis_url, [env.prefix])


@pytest_asyncio.fixture
async def wenv1(broker: EmbeddedBroker, redis_url: str, unique_prefix: str) -> AsyncIterator[WorkerEnv]:
    """As ``wenv`` with a one-partition input topic: the worker sees records in publication order."""
    env = await make_env(broker, redis_url, partitions=1, prefix=unique_prefix)
    try:
        yield env
    finally:
        delete_prefix(redis_url, [env.prefix])


# ----------------------------------------------------------------------------------- kafka helpers
async def publish_events(bootstrap: str, topic: str, events: Sequence[CandleEvent]) -> list[RecordMetadata]:
    """Publish in order (keyed by symbol, like a feed) and return each record's metadata."""
    return await publish_raw(bootstrap, topic, [(ev.symbol.encode(), encode_candle(ev)) for ev in events])


async def publish_raw(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]],
                      *, partition: int | None = None, compression_type: str | None = None) -> list[RecordMetadata]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all",
                                max_request_size=2_000_000, linger_ms=5, compression_type=compression_type)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=candle_headers(), partition=partition)
                   for key, value in records]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def offsets_by_bar(events: Sequence[CandleEvent], metas: Sequence[RecordMetadata]) -> dict[tuple[str, int],
                                                                                         tuple[int, int]]:
    return {(ev.symbol, ev.open_time): (m.partition, m.offset) for ev, m in zip(events, metas, strict=True)}


class Collector:
    """Reads a topic from the beginning in the background (no group), keeping every record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self._consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                          auto_offset_reset="earliest", enable_auto_commit=False,
                                          fetch_max_wait_ms=100)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Collector:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for recs in batches.values():
                self.records.extend(recs)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def __aenter__(self) -> Collector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def forecasts(self) -> list[ForecastMessage]:
        return [decode_forecast(r.value) for r in self.records]

    def bars(self) -> list[tuple[str, int]]:
        return [(m.symbol, m.open_time) for m in self.forecasts()]

    async def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
        await eventually(pred, what, timeout=timeout, detail=lambda: f"{len(self.records)} records on {self.topic}")

    async def wait_count(self, n: int, timeout: float = DEADLINE_S) -> None:
        await self.wait_for(lambda: len(self.records) >= n, f"{n} records", timeout)

    async def settle(self, quiet_s: float = 1.5, timeout: float = DEADLINE_S) -> None:
        """Wait until no new record arrived for ``quiet_s`` (used before asserting 'nothing more')."""
        deadline = time.monotonic() + timeout
        last, since = len(self.records), time.monotonic()
        while time.monotonic() - since < quiet_s:
            assert time.monotonic() < deadline, "topic never went quiet"
            await asyncio.sleep(0.1)
            if len(self.records) != last:
                last, since = len(self.records), time.monotonic()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The group's committed offsets (next offset to read) per partition, read by a non-member."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def wait_all_committed(env: WorkerEnv, metas: Sequence[RecordMetadata], what: str,
                             timeout: float = 30) -> None:
    """Until the group's committed offset of each partition is one past the last record published."""
    ends: dict[int, int] = {}
    for m in metas:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)

    async def all_committed() -> bool:
        got = await committed_offsets(env.bootstrap, env.group, env.input, env.partitions)
        return all(got[p] == end for p, end in ends.items())

    await eventually(all_committed, what, timeout=timeout)


# ----------------------------------------------------------------------------------- waiting
async def eventually(pred: Callable[[], bool | Awaitable[bool]], what: str, *, timeout: float = DEADLINE_S,
                     interval: float = 0.05, detail: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" +
                                 (f" ({detail()})" if detail else ""))
        await asyncio.sleep(interval)


def metric(w: SignalWorker, name: str, labels: dict[str, str] | None = None) -> float:
    value = w.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


# ----------------------------------------------------------------------------------- in-process worker
def trivial_engine(window_bars: int = 8) -> TrivialEngine:
    return TrivialEngine(timeframe_ms=TF_MS, horizons_ms=HORIZONS_MS, window_bars=window_bars)


class RunningWorker:
    """A :class:`SignalWorker` run as a task on the test's loop (``install_signals=False``)."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.worker = SignalWorker(settings, engine)
        self.task: asyncio.Task[int] | None = None

    async def start(self, *, wait_assigned: bool = True) -> RunningWorker:
        self.task = asyncio.create_task(self.worker.run(install_signals=False))
        if wait_assigned:
            await eventually(lambda: bool(self.worker.consumer.assignment()) or self.task.done(),
                             "the worker to join its group")
            if self.task.done():
                raise AssertionError(f"worker exited early with {self.task.result()}")
        return self

    async def stop(self, timeout: float = 90.0) -> int:
        assert self.task is not None
        self.worker.request_stop()
        return await asyncio.wait_for(self.task, timeout)

    async def __aenter__(self) -> SignalWorker:
        if self.task is None:
            await self.start()
        return self.worker

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if self.task is None:
            return
        if self.task.done():
            return
        code = await self.stop()
        if exc_type is None:
            assert code == 0, f"worker exit code {code}"


# ----------------------------------------------------------------------------------- subprocess worker
class WorkerProcess:
    """``signal-worker run`` (or another command) in its own process group, logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: Sequence[str] = (SIGNAL_WORKER, "run")) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(list(argv), env=env, cwd=str(REPO), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
        return out

    async def wait_event(self, name: str, timeout: float = DEADLINE_S) -> None:
        await eventually(lambda: bool(self.events(name)) or self.proc.poll() is not None, f"log event {name}",
                         timeout=timeout, detail=lambda: self.log()[-3000:])
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}:\n{self.log()[-5000:]}"

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {timeout}s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn(env, name="a")`` starts a worker process; every one is SIGKILLed at teardown."""
    procs: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str = "worker", argv: Sequence[str] = (SIGNAL_WORKER, "run")) -> WorkerProcess:
        p = WorkerProcess(env, tmp_path / f"{name}-{len(procs)}.log", argv)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


def dup_keys(bars: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    seen: set[tuple[str, int]] = set()
    dups = set()
    for b in bars:
        (dups if b in seen else seen).add(b)
    return dups

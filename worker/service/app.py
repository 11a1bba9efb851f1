"""The streaming worker: Kafka candles -> Redis windows -> micro-batched sampling -> forecast topic.

Delivery is at-least-once. A record's offset is committed only once its effect is durable: its
forecast (or dead-letter record) acknowledged by the broker, or, when it triggers nothing, its
window write done. :class:`SignalWorker` is the orchestrator; each of its methods is one step:
fetch, ingest (decode or dead-letter), write windows, plan, sample, publish, mark, commit. The state
lives in three objects: the :class:`~worker.service.ledger.SymbolLedger` (per partition and symbol:
generation, newest bar seen, open jobs, forecast-up-to), the
:class:`~worker.service.checkpoint.Checkpoint` (which offsets are safe, when to commit) and the
:class:`~worker.service.publisher.Publisher` (the one retry policy of produce acknowledgements).

What happens on each failure (``docs/reliability.md`` has the tests and the measured costs):

* malformed record (any content: undecodable, deeply nested, oversized, no key or a key that is not
  its symbol, an open time in the future): dead-lettered with the reason; the dead letter always
  fits (bounded prefix + size + SHA-256 of the original); the offset moves on. A record without a
  Kafka timestamp (-1) is served with its arrival time as ``ingest_time``.
* one symbol's Redis keys unusable (WRONGTYPE, a non-integer watermark): that symbol is quarantined
  for a minute (metric, one log line, its bars skipped with their offsets committed); every other
  symbol is served. Redis refusing the worker itself (NOPERM, MOVED): exit non-zero, naming it.
* Redis unavailable: the batch's window writes are retried with backoff while every partition is
  paused (heartbeats continue) and the worker reports not ready; nothing past the unwritten records
  is committed; it resumes by itself. If Redis came back empty, the windows are rebuilt from the
  input topic first (``worker.service.restore``).
* broker unavailable: publishing retries with backoff (batches expired after ``request_timeout_ms``
  included), partitions stay paused, the worker reports not ready, commits wait. A non-retriable
  produce error exits non-zero naming the topic and the setting. At start-up an unreachable broker
  is retried up to ``kafka.bootstrap_timeout_s``, then the worker exits 2 naming
  ``SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS``, every client closed.
* sampling fails (e.g. CUDA OOM after the half-batch retry): the worker exits non-zero without
  committing the batch, so it is redelivered after the restart; in-flight work is cancelled.
* rebalance: revoked partitions are fenced at once (every record, job and window write carries its
  partition's assignment generation); queued jobs of revoked partitions are abandoned (the new owner
  replays them), batches already sampling are finished and committed before the partitions move,
  and nothing started after the revoke publishes, marks or writes for them.
* SIGTERM: stop fetching, finish queued and in-flight batches, flush, commit, exit 0 within
  ``service.shutdown_grace_s``; past it, exit 1 leaving the rest uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import CandleRejected
from schemas.timeframe import format_duration
from worker.errors import SamplingStalled, StateMisconfigured, StateUnavailable, SymbolStateCorrupt
from worker.features.candles import CandleSeries
from worker.model.forecaster import Forecast, ForecastRequest
from worker.observability.health import HealthServer
from worker.observability.logging import get_logger
from worker.observability.metrics import Metrics
from worker.service.batcher import MicroBatcher
from worker.service.checkpoint import Checkpoint
from worker.service.engine import Engine, EngineResult
from worker.service.intake import (
    ClockWatch,
    dead_letter_record,
    decode_record,
    ingest_time,
    latest_admitted_ms,
    unreadable_record,
)
from worker.service.jobs import ForecastJob, Offset, Received
from worker.service.ledger import SymbolLedger
from worker.service.messages import forecast_record
from worker.service.publisher import Publisher
from worker.service.restore import RestoreRange, StateEpoch, restore_windows
from worker.service.retry import Backoff, is_retriable
from worker.service.scoring import OnlineScorer
from worker.service.triggers import watermarks_ahead
from worker.settings import Settings
from worker.state.connection import make_redis
from worker.state.windows import WindowStore
from worker.transport.broker import missing_codecs
from worker.transport.consumer import CandleConsumer
from worker.transport.corrupt import UnreadableOffset
from worker.transport.producer import OutRecord, RecordProducer
from worker.transport.reader import PartitionReader

_log = get_logger("worker.service")
_COMMIT_INTERVAL_S = 0.2
_LAG_INTERVAL_S = 2.0
_HEALTH_INTERVAL_S = 2.0
_MIN_TTL_BARS = 4  # a window must outlive a few missing bars (SIGNAL_WORKER_REDIS__WINDOW_TTL_S)
_WEEKEND_MS = 72 * 3_600_000  # the FX weekend close (~49 h) with a holiday beside it
_REDIS_RETRY_TIMEOUT_S = 1.0  # one epoch read while paused for Redis (as the health probe's ping)
_QUARANTINE_S = 60.0  # a quarantined symbol is tried again after this (an operator may have reset it)
EXIT_OK, EXIT_FAILED, EXIT_STARTUP = 0, 1, 2
_BOOTSTRAP_SETTING = "SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS"


def _now_ms() -> int:
    return int(time.time() * 1000)


class SignalWorker:
    def __init__(self, settings: Settings, engine: Engine, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.timeframe = format_duration(engine.timeframe_ms)
        self.worker_id = settings.service.worker_id
        if settings.window.length < engine.window_bars:
            raise ValueError(f"SIGNAL_WORKER_WINDOW__LENGTH={settings.window.length} is shorter than the "
                             f"{engine.window_bars} bars the model needs")
        ttl_ms = settings.redis.window_ttl_s * 1000
        if ttl_ms < _MIN_TTL_BARS * engine.timeframe_ms:
            # The TTL is refreshed by each write: a window idle for one bar must not expire, or no
            # symbol ever holds the bars the model needs and every bar is skipped.
            raise ValueError(f"SIGNAL_WORKER_REDIS__WINDOW_TTL_S={settings.redis.window_ttl_s} is shorter than "
                             f"{_MIN_TTL_BARS} bars of {self.timeframe}: every window would expire between bars")
        if ttl_ms < _WEEKEND_MS:
            _log.warning("window_ttl_shorter_than_a_weekend", window_ttl_s=settings.redis.window_ttl_s,
                         detail="FX windows idle over the weekend close expire and refill from scratch on Sunday; "
                         "SIGNAL_WORKER_REDIS__WINDOW_TTL_S of at least 259200 (3 days) keeps them")
        self.batcher: MicroBatcher[ForecastJob] = MicroBatcher(settings.batch.max_size, settings.batch.max_wait_ms)
        self.ledger = SymbolLedger()
        # Read at scrape time, so it drops when a quarantine expires without waiting for a bar.
        self.metrics.quarantined_symbols.set_function(lambda: self.ledger.quarantined_count(time.monotonic()))
        self.checkpoint = Checkpoint(self.metrics, interval_s=_COMMIT_INTERVAL_S,
                                     max_backoff_s=settings.kafka.retry_max_backoff_s)
        self.scorer = OnlineScorer()
        self._pending: list[Received] = []
        self._paused_for: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()  # sampling batches
        self._background: set[asyncio.Task[None]] = set()  # dead-letter publishes
        self._revoking: set[TopicPartition] = set()
        self._write_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.batch.max_in_flight)
        self._executor = ThreadPoolExecutor(settings.batch.max_in_flight, thread_name_prefix="sampler")
        # Monotonic start of every sampling call still running (by a per-call key): a call that
        # outlives SIGNAL_WORKER_SAMPLING__STALL_AFTER_S is a wedged sampler (_check_sampling).
        self._sampling_since: dict[int, float] = {}
        self._sampling_calls = 0
        self.sampler_threads_left = False  # a sampler thread outlived the shutdown (the CLI then exits hard)
        self._stopping = asyncio.Event()
        self._closed = False  # after the drain: no batch may start
        self._fatal: BaseException | None = None
        self._assigned_once = False
        self._redis_ok = False
        self._broker_ok = False
        self._redis_backoff = Backoff(settings.redis.retry_max_backoff_s, initial_s=0.05)
        self._redis_retry_at = 0.0  # monotonic: next _retry_redis while paused with nothing to write
        self.epoch = StateEpoch()
        self.clock = ClockWatch()  # does this clock still agree with the feed (readiness)
        self._restoring = False
        self._last_lag = 0.0
        self.forecasts_published = 0
        self.restores: list[dict[str, Any]] = []  # one entry per rebuild, for tests and the bench
        self._final_candles = self.metrics.candles_in.labels(kind="final")  # per-candle: resolve once
        self._partial_candles = self.metrics.candles_in.labels(kind="partial")
        # Per batch: (wall-clock end, sampling ms), for `signal-worker bench`.
        self.sampling_log: deque[tuple[float, float]] = deque(maxlen=100_000)
        self.redis = make_redis(settings.redis)
        self.store = WindowStore.from_settings(self.redis, settings, self.timeframe)
        self.consumer, self.producer = self._kafka_clients()
        self.publisher = Publisher(self.producer, self.metrics, max_backoff_s=settings.kafka.retry_max_backoff_s,
                                   stall_after_s=settings.kafka.request_timeout_ms / 1000,
                                   on_outage=self._on_broker_outage)
        self.health = HealthServer(settings.service.host, settings.service.metrics_port, self.metrics.registry,
                                   self._readiness)

    @property
    def tracker(self) -> Any:
        """The offset tracker (tests and tools read ``pending_count()``)."""
        return self.checkpoint.tracker

    def _kafka_clients(self) -> tuple[CandleConsumer, RecordProducer]:
        k = self.settings.kafka
        # How long the group waits for this member to finish a revoke and rejoin. aiokafka's default
        # is the session timeout (10 s), under the revoke's own budget (the grace for batches still
        # sampling, then a commit bounded by request_timeout_ms): past it Kafka hands the partitions
        # on while this member's batches still publish (duplicates), and its late rejoin costs a
        # second rebalance.
        rebalance_timeout_ms = max(k.session_timeout_ms,
                                   int(self.settings.service.shutdown_grace_s * 1000) + k.request_timeout_ms + 5000)
        consumer = CandleConsumer(k, on_assigned=self._on_assigned, on_revoked=self._on_revoked,
                                  request_timeout_ms=k.request_timeout_ms, fetch_max_wait_ms=k.fetch_max_wait_ms,
                                  session_timeout_ms=k.session_timeout_ms,
                                  heartbeat_interval_ms=k.heartbeat_interval_ms,
                                  rebalance_timeout_ms=rebalance_timeout_ms)
        return consumer, RecordProducer(k, request_timeout_ms=k.request_timeout_ms)

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, *, install_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT or :meth:`request_stop`; returns the process exit code."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        self.metrics.set_model_info(model_version=self.engine.model_version, scheduler=self.engine.scheduler,
                                    steps=self.engine.steps, samples=self.engine.samples, device=self.engine.device,
                                    calibrated_for=self.engine.calibrated_for,
                                    timeframe=self.timeframe)
        await self.health.start()
        try:
            await self._connect_redis()
            connected = await self._connect_kafka()
        except StateMisconfigured as exc:
            _log.error("redis_misconfigured", error=str(exc))
            connected = False
        if not connected:
            await self._close_clients()
            _log.info("worker_stopped", exit_code=EXIT_STARTUP, forecasts=0, seconds=0.0, fatal="start-up failed")
            return EXIT_STARTUP
        _log.info("worker_started", worker_id=self.worker_id, input_topic=self.settings.kafka.input_topic,
                  output_topic=self.settings.kafka.output_topic, model_version=self.engine.model_version,
                  scheduler=self.engine.scheduler, steps=self.engine.steps, samples=self.engine.samples,
                  device=self.engine.device, timeframe=self.timeframe, metrics_port=self.health.port,
                  redis_namespace=self.store.namespace)
        sampler = asyncio.create_task(self._sample_loop(), name="sample-loop")
        watcher = asyncio.create_task(self._watch_health(), name="health-watch")
        try:
            await self._consume_loop()
        except Exception as exc:
            self._fail(exc)
        return await self._shutdown(sampler, watcher)

    async def _connect_redis(self) -> None:
        """Load the scripts and claim the state epoch; a Redis that is down now is retried later."""
        try:
            await self.store.load_scripts()
            claim = await self.store.claim_epoch()
        except StateUnavailable as exc:
            _log.warning("redis_unavailable_at_start", error=str(exc))
            self.epoch.unknown()
            return
        self._redis_ok = True
        self.epoch.started(claim.token, claim.created)

    async def _connect_kafka(self) -> bool:
        """Start producer and consumer, retrying an unreachable broker up to the bootstrap deadline."""
        k = self.settings.kafka
        missing = missing_codecs()
        if missing:
            _log.error("kafka_codecs_missing", codecs=missing,
                       message=f"this installation cannot decode Kafka batches compressed with {', '.join(missing)} "
                               "(pip install 'aiokafka[lz4,snappy,zstd]', i.e. cramjam); a feed using one would "
                               "stop the worker at its first batch")
            return False
        deadline = time.monotonic() + k.bootstrap_timeout_s
        backoff = Backoff(k.retry_max_backoff_s, initial_s=0.5)
        while True:
            try:
                await asyncio.wait_for(self.producer.start(), timeout=k.request_timeout_ms / 1000 + 5)
                await asyncio.wait_for(self.consumer.start(), timeout=k.request_timeout_ms / 1000 + 5)
                self._broker_ok = True
                return True
            except Exception as exc:
                await self._close_kafka()
                left = deadline - time.monotonic()
                if not is_retriable(exc) or left <= 0 or self._stopping.is_set():
                    _log.error("kafka_unreachable", error=repr(exc), attempts=backoff.attempts + 1,
                               waited_s=round(k.bootstrap_timeout_s - max(0.0, left), 1),
                               setting=_BOOTSTRAP_SETTING, bootstrap_servers=k.bootstrap_servers,
                               message=f"no Kafka broker answered at {k.bootstrap_servers!r}; check "
                                       f"{_BOOTSTRAP_SETTING} (and the security settings)")
                    return False
                delay = min(backoff.next_delay(), left)
                _log.warning("kafka_connect_retry", attempt=backoff.attempts, error=repr(exc),
                             bootstrap_servers=k.bootstrap_servers, retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                self.consumer, self.producer = self._kafka_clients()
                self.publisher.producer = self.producer

    async def _close_kafka(self) -> None:
        for closer in (self.consumer.stop, self.producer.stop):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), timeout=5)

    async def _close_clients(self) -> None:
        await self._close_kafka()
        for closer in (self.health.stop, self.redis.aclose):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), timeout=5)

    async def _shutdown(self, sampler: asyncio.Task[None], watcher: asyncio.Task[None]) -> int:
        grace = self.settings.service.shutdown_grace_s
        started = time.monotonic()
        self._stopping.set()
        self._pause(self.consumer.assignment(), "shutdown")
        # The drain takes the queued jobs itself; the sample loop must not start one meanwhile.
        for task in (sampler, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        code = EXIT_OK if self._fatal is None else EXIT_FAILED
        if self._fatal is None:
            try:
                await asyncio.wait_for(self._drain(), timeout=grace)
            except TimeoutError:
                _log.error("drain_timeout", grace_s=grace, queued=len(self.batcher), in_flight=len(self._inflight))
                code = EXIT_FAILED
        self._closed = True
        # After a fatal error or a drain timeout: what is left is cancelled, never finished later.
        await self._cancel(self._inflight | self._background)
        with contextlib.suppress(Exception):
            left = max(1.0, grace - (time.monotonic() - started))
            await asyncio.wait_for(self.checkpoint.commit(self.consumer, self.ledger.owned()), timeout=left)
        await self._close_clients()
        # A wedged sampler will not finish in any grace: do not wait it out.
        wait_s = 1.0 if isinstance(self._fatal, SamplingStalled) else max(1.0, grace - (time.monotonic() - started))
        await self._stop_sampler_threads(wait_s)
        _log.info("worker_stopped", exit_code=code, forecasts=self.forecasts_published,
                  seconds=round(time.monotonic() - started, 3), fatal=repr(self._fatal) if self._fatal else None)
        return code

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _stop_sampler_threads(self, timeout_s: float) -> None:
        """A sampling call cannot be interrupted; wait for the threads (bounded) so none outlives us.

        The join runs on a daemon thread of its own, not the loop's default executor: asyncio.run
        joins that executor's threads without a timeout on the way out, so a join stuck behind a hung
        sampler would keep the process from ever exiting."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        loop = asyncio.get_running_loop()
        joined = loop.create_future()

        def settle() -> None:
            if not joined.done():
                joined.set_result(None)

        def join() -> None:
            self._executor.shutdown(wait=True)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle)

        # not named "sampler…": it is not one of the sampling threads, and ends right after them
        threading.Thread(target=join, name="join-samplers", daemon=True).start()
        try:
            await asyncio.wait_for(joined, timeout=timeout_s)
        except TimeoutError:
            self.sampler_threads_left = True
            _log.error("sampler_threads_still_running", waited_s=round(timeout_s, 1))

    async def _drain(self) -> None:
        """Finish what was fetched: queued jobs and in-flight batches; then flush and commit."""
        while self._pending and self._fatal is None:
            await self._write_windows()
        while len(self.batcher) and self._fatal is None:
            jobs = self.batcher.take_all()
            for i in range(0, len(jobs), self.settings.batch.max_size):
                await self._slots.acquire()
                self._start_batch(jobs[i : i + self.settings.batch.max_size])
        while self._inflight or self._background:
            await asyncio.wait(self._inflight | self._background)
        await self.producer.flush()
        await self.checkpoint.commit(self.consumer, self.ledger.owned())

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            _log.error("fatal", error=str(exc) or repr(exc), error_type=type(exc).__name__)
        self._stopping.set()

    # -- consuming ------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        poll_ms = max(5, min(100, self.settings.batch.max_wait_ms))
        while not self._stopping.is_set() and self._fatal is None:
            if self.epoch.due and self._assigned_once:
                await self._restore()
            records = await self._fetch(poll_ms)
            if records:
                await self._ingest(records)
            unreadable = self.consumer.take_unreadable()
            if unreadable:
                self._ingest_unreadable(unreadable)
            if self._pending:
                await self._write_windows()
            elif "redis" in self._paused_for and not self._restoring:
                await self._retry_redis()
            self._backpressure()
            await self.checkpoint.maybe_commit(self.consumer, self.ledger.owned())
            await self._update_lag()

    async def _fetch(self, poll_ms: int) -> list[ConsumerRecord[bytes, bytes]]:
        try:
            return await self.consumer.getmany(timeout_ms=poll_ms, max_records=self.settings.kafka.max_poll_records)
        except Exception as exc:
            self.metrics.broker_errors.inc()
            if not is_retriable(exc):
                raise
            _log.warning("fetch_failed", error=repr(exc))
            await asyncio.sleep(0.5)
            return []

    async def _ingest(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        now = _now_ms()
        tolerance_s, max_bytes = self.settings.window.future_tolerance_s, self.settings.kafka.max_message_bytes
        rejected: list[tuple[ConsumerRecord[bytes, bytes], TopicPartition, int, CandleRejected]] = []
        generations: dict[TopicPartition, int | None] = {}
        quarantined = self.ledger.quarantined
        mono = time.monotonic()
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            gen = generations.get(tp, -1)
            if gen == -1:
                gen = generations[tp] = self._accepting(tp)
            if gen is None:
                continue  # fetched just before its partition was revoked: the next owner reads it
            self.checkpoint.register(tp, rec.offset)
            try:
                candle = decode_record(rec, timeframe=self.timeframe, timeframe_ms=self.engine.timeframe_ms,
                                       max_bytes=max_bytes, now_ms=now, future_tolerance_s=tolerance_s)
            except CandleRejected as err:
                rejected.append((rec, tp, gen, err))
                if self.clock.refused(err, rec.key):
                    _log.error("clock_disagrees_with_feed", refused_in_a_row=self.clock.streak,
                               last=self.clock.last_refusal,
                               message="every recent bar is ahead of this worker's clock: check this host's time "
                                       "sync (and the feed's); not ready until a final bar is admitted")
                continue
            if not candle.is_final:
                # In-progress bars are never stored: windows hold closed bars only.
                self._partial_candles.inc()
                self.checkpoint.done(tp, rec.offset)
                continue
            self._final_candles.inc()
            if self.clock.reported:
                _log.info("clock_agrees_with_feed", refused_in_a_row=self.clock.streak)
            self.clock.admitted(candle.symbol)
            self.ledger.bind(candle.symbol, tp)
            if quarantined and self.ledger.is_quarantined(candle.symbol, mono):
                self.metrics.skipped.labels(reason="quarantined").inc()
                self.checkpoint.done(tp, rec.offset)
                continue
            self._pending.append(Received(candle, tp, rec.offset, ingest_time(rec, now), gen))
        if rejected:
            self._spawn(self._dead_letter(rejected))

    def _ingest_unreadable(self, unreadable: Iterable[UnreadableOffset]) -> None:
        """Offsets whose batch failed the CRC check on every fetch: dead-lettered (no bytes), so the
        partition's commit moves past them as past any rejected record."""
        rejected: list[tuple[ConsumerRecord[bytes, bytes], TopicPartition, int, CandleRejected]] = []
        for u in unreadable:
            gen = self._accepting(u.tp)
            if gen is None:
                continue  # revoked meanwhile: the next owner meets the batch and dead-letters it
            self.checkpoint.register(u.tp, u.offset)
            rec, err = unreadable_record(u)
            rejected.append((rec, u.tp, gen, err))
        if rejected:
            self._spawn(self._dead_letter(rejected))

    def _accepting(self, tp: TopicPartition) -> int | None:
        """The generation new work of ``tp`` is done under; None while it is being (or was) revoked."""
        if tp in self._revoking:
            return None
        return self.ledger.generation(tp)

    def _accepts(self, tp: TopicPartition, generation: int) -> bool:
        return tp not in self._revoking and self.ledger.owns(tp, generation)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _dead_letter(self, rejected: list[tuple[ConsumerRecord[bytes, bytes], TopicPartition, int,
                                                      CandleRejected]]) -> None:
        # Fenced like forecasts: a partition revoked meanwhile is the new owner's to dead-letter.
        rejected = [r for r in rejected if self._accepts(r[1], r[2])]
        if not rejected:
            return
        out: list[OutRecord] = []
        for rec, _, _, err in rejected:
            letter, record = dead_letter_record(rec, err, self.worker_id)
            _log.warning("dead_letter", reason=str(err.reason), detail=record.detail, topic=rec.topic,
                         partition=rec.partition, offset=rec.offset, size=record.original_size)
            out.append(letter)
        try:
            source = {id(letter): (tp, g) for letter, (_, tp, g, _) in zip(out, rejected, strict=True)}
            ok = await self.publisher.publish(
                self.settings.kafka.dead_letter_topic, out, setting="SIGNAL_WORKER_KAFKA__DEAD_LETTER_TOPIC",
                wanted=lambda: self._fatal is None and any(self._accepts(tp, g) for _, tp, g, _ in rejected),
                keep=lambda letter: self.ledger.owns(*source[id(letter)]))  # as checked before commit
        except Exception as exc:
            self._fail(exc)
            return
        if not ok:
            return
        for rec, tp, gen, err in rejected:
            if self.ledger.owns(tp, gen):
                self.metrics.dead_letters.labels(reason=str(err.reason)).inc()
                self.checkpoint.done(tp, rec.offset)

    # -- windows --------------------------------------------------------------------------
    async def _write_windows(self) -> None:
        while self._pending and self._fatal is None:
            if self.epoch.due and not await self._restore():
                return
            pending = self._pending
            chunk = self._next_chunk()
            n = len(chunk)  # `chunk` may be `pending` itself
            if not await self._write_chunk(chunk):
                return
            if self._pending is pending:  # the usual case: the chunk is still the list's head
                del pending[:n]
            else:  # a revocation during the write replaced the list: remove exactly this chunk
                applied = {(r.tp, r.offset) for r in chunk}
                self._pending = [r for r in self._pending if (r.tp, r.offset) not in applied]

    def _next_chunk(self) -> list[Received]:
        """The longest prefix of the fetched candles that gives no symbol more new bars than its window
        can hold beside the model's history — else a long backlog would evict the history of its own
        first bars before they are forecast. Normally the whole batch: one round trip."""
        limit = max(1, self.settings.window.length - self.engine.window_bars)
        counts: dict[str, int] = {}
        for i, r in enumerate(self._pending):
            n = counts.get(r.candle.symbol, 0) + 1
            if n > limit:
                return self._pending[:i]
            counts[r.candle.symbol] = n
        return self._pending

    async def _write_chunk(self, received: list[Received]) -> bool:
        """Write one chunk of candles; plan and queue the forecasts. False: Redis is away, retry later."""
        try:
            async with self._write_lock:
                snapshots = await self.store.apply([r.candle for r in received])
        except StateUnavailable as exc:
            await self._redis_down(exc)
            return False
        except StateMisconfigured as exc:
            self._fail(exc)
            return False
        self._redis_up()
        epoch = snapshots.epoch
        if not self.epoch.seen(epoch):
            # Redis held another epoch (or none) just before this write: it lost our state since the
            # last one. Rebuild first, then write this chunk again (upserts: the bars are the same),
            # so no bar is forecast from a window holding only the newest bars.
            _log.error("redis_state_lost", epoch=epoch)
            return False
        bad: Mapping[str, SymbolStateCorrupt] = snapshots.quarantined
        # Not while this clock is suspect: then the mark is likely right and the clock wrong.
        ahead = {} if self.clock.suspect else watermarks_ahead(
            snapshots, latest_admitted_ms(_now_ms(), self.settings.window.future_tolerance_s), self.store.watermark_key)
        if ahead:
            bad = {**bad, **ahead}
        if bad:
            self._quarantine(bad)
        live = [r for r in received if self._accepts(r.tp, r.generation)]  # fence: revoked meanwhile
        if len(live) != len(received) or bad:
            for r in live:
                if r.candle.symbol in bad:
                    self.metrics.skipped.labels(reason="quarantined").inc()
                    self.checkpoint.done(r.tp, r.offset)
            live = [r for r in live if r.candle.symbol not in bad]
        self.ledger.applied(live)
        plan = self.ledger.plan(live, snapshots, conflate=self.settings.window.conflate)
        m = self.metrics
        if plan.late:
            m.late.inc(len(plan.late))
            self.checkpoint.done_many((r.tp, r.offset) for r in plan.late)
        if plan.conflated:
            m.conflated.inc(plan.conflated)
        if self.settings.service.online_scoring:
            self._score_realised(snapshots, {r.candle.symbol for r in live})
        for job in plan.jobs:
            snap = snapshots[job.symbol]
            end = int(snap.times.searchsorted(job.open_time, side="right"))  # the window up to the job's bar
            job.candles = CandleSeries(snap.times[:end], snap.values[:end])
            self.batcher.add(job)
        return True

    def _score_realised(self, snapshots: Mapping[str, Any], symbols: set[str]) -> None:
        m = self.metrics
        scored = [label for s, snap in snapshots.items() if s in symbols for label, _, _ in self.scorer.observe(snap)]
        for label in scored:
            m.online_scored.labels(horizon=label).inc()
        # The rolling summaries only change when something was scored.
        for label, s in (self.scorer.summary() if scored else {}).items():
            m.online_crps.labels(horizon=label).set(s["crps"])
            for interval in ("50", "80", "90"):
                m.online_coverage.labels(horizon=label, interval=interval).set(s[f"coverage_{interval}"])

    async def _redis_down(self, exc: StateUnavailable) -> None:
        self._redis_ok = False
        self.metrics.redis_errors.inc()
        delay = self._redis_backoff.next_delay()
        if "redis" not in self._paused_for:
            _log.error("redis_unavailable", error=str(exc), pending=len(self._pending), retry_in_s=round(delay, 3))
        self._pause(self.consumer.assignment(), "redis")
        await asyncio.sleep(delay)

    async def _retry_redis(self) -> None:
        """Paused for Redis with no write left to retry — a rebalance dropped the pending candles,
        and the partitions came back paused, so none will be fetched: ask Redis itself (the epoch,
        as a write would), at the write retry's backoff, so the pause ends when Redis answers.
        Without this the worker stayed paused for good while Redis was back and /readyz said it
        was not."""
        if time.monotonic() < self._redis_retry_at:
            return
        try:
            await asyncio.wait_for(self._check_epoch(), timeout=_REDIS_RETRY_TIMEOUT_S)
        except (StateUnavailable, TimeoutError):
            self.metrics.redis_errors.inc()
            self._redis_retry_at = time.monotonic() + self._redis_backoff.next_delay()
            return
        except StateMisconfigured as exc:
            self._fail(exc)
            return
        self._redis_up()

    def _redis_up(self) -> None:
        if "redis" in self._paused_for:
            _log.info("redis_recovered", after_failures=self._redis_backoff.attempts)
            self._resume("redis")
        self._redis_ok = True
        self._redis_backoff.reset()

    def _quarantine(self, bad: Mapping[str, SymbolStateCorrupt]) -> None:
        """Skip these symbols for a while (one log line each); every other symbol goes on."""
        until = time.monotonic() + _QUARANTINE_S
        for symbol, err in bad.items():
            self.metrics.redis_errors.inc()
            if self.ledger.quarantine(symbol, until):
                _log.error("symbol_quarantined", symbol=symbol, reason=err.reason, detail=err.detail,
                           retry_in_s=_QUARANTINE_S, hint=f"signal-worker state show --symbol {symbol}")

    # -- rebuilding lost windows ------------------------------------------------------------
    async def _restore(self) -> bool:
        """Redis lost this deployment's state: re-read each owned partition's recent records into it.
        False: Redis went away again (retried later)."""
        self._restoring = True
        self._pause(self.consumer.assignment(), "restore")
        still_due = False  # the broker failed it: input stays paused until a restore succeeds
        try:
            async with self._write_lock:
                await self._restore_owned()
            self.epoch.rebuilt()
            self._redis_up()
            return True
        except StateUnavailable as exc:
            await self._redis_down(exc)  # paused for "redis" until it is back, then restored again
            return False
        except StateMisconfigured as exc:
            self._fail(exc)
            return False
        except Exception as exc:
            if not is_retriable(exc):
                raise
            # The broker is away (reading the topic, or asking for committed offsets): try again.
            # Fetching meanwhile would only pile records up in _pending (their windows cannot be
            # written before the restore), up to max_poll_records every poll, without bound.
            still_due = True
            self.metrics.broker_errors.inc()
            _log.warning("restore_retry", error=repr(exc), retry_in_s=1.0)
            await asyncio.sleep(1.0)
            return False
        finally:
            self._restoring = False
            if not still_due:
                self._resume("restore")

    async def _restore_owned(self) -> None:
        claim = await self.store.claim_epoch()
        if not self.epoch.needs_rebuild(claim.token, claim.created):
            return  # the state survived (e.g. Redis was only unreachable at start-up)
        owned = sorted(self.ledger.owned() - self._revoking, key=lambda tp: (tp.topic, tp.partition))
        ranges: dict[TopicPartition, RestoreRange] = {}
        for tp in owned:
            st = self.ledger.partition_state(tp)
            if st is not None and st.applied_upto is not None:
                ranges[tp] = RestoreRange(st.applied_upto, st.last_timestamp)
            else:
                committed = await self.consumer.committed(tp)
                if committed:
                    ranges[tp] = RestoreRange(committed, None)
        w = self.settings.window
        if not ranges or w.restore_max_records == 0:
            return
        gens = {tp: self.ledger.generation(tp) for tp in ranges}

        def wanted(tp: TopicPartition) -> bool:
            gen = gens.get(tp)
            return gen is not None and self._accepts(tp, gen)

        async with PartitionReader(self.settings.kafka) as reader:
            report = await restore_windows(
                reader, self.store, ranges, timeframe=self.timeframe, timeframe_ms=self.engine.timeframe_ms,
                max_bytes=self.settings.kafka.max_message_bytes, lookback_ms=(w.length + 1) * self.engine.timeframe_ms,
                max_records=w.restore_max_records, wanted=wanted, now_ms=_now_ms(),
                future_tolerance_s=w.future_tolerance_s)
        entry = {"partitions": len(ranges), "records": report.records, "bars": report.bars,
                 "symbols": len(report.symbols), "seconds": round(report.seconds, 3)}
        self.restores.append(entry)
        _log.warning("windows_restored", **entry,
                     start={f"{tp.topic}/{tp.partition}": o for tp, o in report.start.items()},
                     end={f"{tp.topic}/{tp.partition}": r.end for tp, r in ranges.items()})

    async def _check_epoch(self) -> None:
        """Did Redis keep this deployment's state? Asked after every Redis failure before the next
        write, and on every health tick (a Redis that restarted between two writes). Another epoch
        than ours means the state was lost, whichever replica noticed first and wrote the new one."""
        claim = await self.store.claim_epoch()
        if not self.epoch.due and not self.epoch.seen(claim.token):
            _log.error("redis_state_lost", epoch=claim.token)

    # -- flow control ---------------------------------------------------------------------
    def _pause(self, partitions: Iterable[TopicPartition], reason: str) -> None:
        self._paused_for.add(reason)
        parts = set(partitions)
        if parts:
            self.consumer.pause(parts)
        self.metrics.paused_partitions.set(len(self.consumer.paused()))

    def _resume(self, reason: str) -> None:
        self._paused_for.discard(reason)
        if not self._paused_for:
            self.consumer.resume(self.consumer.assignment())
        self.metrics.paused_partitions.set(len(self.consumer.paused()))

    def _backpressure(self) -> None:
        b = self.settings.batch
        full = len(self._inflight) >= b.max_in_flight and len(self.batcher) >= b.max_size
        if full and "backpressure" not in self._paused_for:
            self._pause(self.consumer.assignment(), "backpressure")
        elif not full and "backpressure" in self._paused_for:
            self._resume("backpressure")

    def _on_broker_outage(self, down: bool) -> None:
        """The publisher failed (or recovered): fetching more would only queue work that cannot leave."""
        if down:
            self._broker_ok = False
            self._pause(self.consumer.assignment(), "broker")
        elif "broker" in self._paused_for:
            self._resume("broker")

    # -- sampling and publishing ----------------------------------------------------------
    async def _sample_loop(self) -> None:
        # The slot first, then the batch: a batch is never held while waiting (a cancel at shutdown
        # or a revoke then finds every job still in the batcher), and it starts as soon as taken.
        while True:
            await self._slots.acquire()
            try:
                jobs = await self.batcher.next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._start_batch(jobs)

    def _start_batch(self, jobs: list[ForecastJob]) -> None:
        if self._closed:
            self._slots.release()
            return
        task = asyncio.create_task(self._process(jobs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _process(self, jobs: list[ForecastJob]) -> None:
        m = self.metrics
        m.batches_in_flight.inc()
        try:
            # Fence: a batch taken before a revoke and started after it drops the revoked jobs.
            jobs = [j for j in jobs if self._accepts(j.offsets[0][0], j.generation)]
            if not jobs:
                return
            started = time.perf_counter()
            # Every job got its window when it was planned; indices of the result refer to ``jobs``.
            requests = [ForecastRequest(j.symbol, j.candles) for j in jobs if j.candles is not None]
            assert len(requests) == len(jobs)
            self._sampling_calls += 1
            call = self._sampling_calls
            self._sampling_since[call] = time.monotonic()
            try:
                result: EngineResult = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.engine.process, requests)
            finally:
                self._sampling_since.pop(call, None)
            sampling_s = time.perf_counter() - started
            m.sampling_seconds.observe(sampling_s)
            self.sampling_log.append((time.time(), sampling_s * 1000))
            m.batch_size.observe(len(jobs))
            await self._publish(jobs, result, sampling_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)
        finally:
            m.batches_in_flight.dec()
            self._slots.release()

    async def _publish(self, jobs: list[ForecastJob], result: EngineResult, sampling_s: float) -> None:
        m = self.metrics
        rejected = {i for i, _ in result.rejected}
        for i, err in result.rejected:
            m.skipped.labels(reason=err.reason).inc()
            _log.info("forecast_skipped", symbol=jobs[i].symbol, open_time=jobs[i].open_time, reason=err.reason,
                      detail=err.detail)
            if self.ledger.owns_job(jobs[i]):  # revoked meanwhile: the offsets are the new assignment's
                self.checkpoint.done_many(jobs[i].offsets)
        done_jobs = [j for i, j in enumerate(jobs) if i not in rejected]
        now = _now_ms()
        published: list[ForecastJob] = []
        forecasts: list[tuple[int, Forecast]] = []
        records: list[OutRecord] = []
        for i, (job, fc) in enumerate(zip(done_jobs, result.forecasts, strict=True)):
            if not self.ledger.owns_job(job):
                # Revoked while it sampled, and the revoke did not wait (it ran out of grace): the
                # partition's new owner forecasts this bar; publishing it here would race it.
                continue
            try:
                value, headers = forecast_record(fc, timeframe=self.timeframe, timeframe_ms=self.engine.timeframe_ms,
                                                 ingest_ms=job.ingest_ms, publish_ms=now, worker_id=self.worker_id)
            except ValueError as exc:  # a NaN from the model, a wrong quantile count (ValidationError is one)
                m.skipped.labels(reason="invalid_forecast").inc()
                _log.error("forecast_invalid", symbol=job.symbol, open_time=job.open_time, error=str(exc))
                self.checkpoint.done_many(job.offsets)  # owned: checked just above
                continue
            published.append(job)
            forecasts.append((i, fc))
            records.append(OutRecord(job.symbol.encode(), value, headers))
        job_of = {id(r): j for r, j in zip(records, published, strict=True)}
        ok = await self.publisher.publish(
            self.settings.kafka.output_topic, records, setting="SIGNAL_WORKER_KAFKA__OUTPUT_TOPIC",
            wanted=lambda: self._fatal is None
            and any(self._accepts(j.offsets[0][0], j.generation) for j in published),
            # Still ours while its revoke waits for this batch (it commits what we publish); dropped
            # once the revoke has given up waiting and forgotten it — the check that commits below.
            keep=lambda r: self.ledger.owns_job(job_of[id(r)]))
        if not ok:  # every partition of the batch moved while the broker was away: the new owner redoes it
            self.ledger.release(jobs, [])
            return
        # Those revoked while it retried may have been dropped unsent: counted only if still ours.
        owned = [self.ledger.owns_job(j) for j in published]
        forecasts = [f for f, mine in zip(forecasts, owned, strict=True) if mine]
        published = [j for j, mine in zip(published, owned, strict=True) if mine]
        acked = _now_ms()
        e2e = [acked - j.ingest_ms for j in published]
        for v in e2e:
            m.end_to_end_seconds.observe(v / 1000)
        m.forecasts_out.inc(len(published))
        self.forecasts_published += len(published)
        await self._mark_watermarks(self.ledger.release(jobs, published))
        offsets: list[Offset] = [o for j in published if self.ledger.owns_job(j) for o in j.offsets]
        self.checkpoint.done_many(offsets)
        if self.settings.service.online_scoring:
            for i, fc in forecasts:
                self.scorer.add(fc, result.samples[i] if result.samples is not None else None)
        by_tp: dict[str, list[int]] = {}
        for tp, off in offsets:
            by_tp.setdefault(f"{tp.topic}/{tp.partition}", []).append(off)
        _log.info("batch", size=len(jobs), forecasts=len(published), skipped=len(jobs) - len(published),
                  symbols=sorted({j.symbol for j in jobs})[:64], sampling_ms=round(sampling_s * 1000, 2),
                  e2e_ms_max=max(e2e) if e2e else None, e2e_ms_min=min(e2e) if e2e else None,
                  offsets={k: [min(v), max(v)] for k, v in by_tp.items()})

    async def _mark_watermarks(self, marks: dict[str, int]) -> None:
        """The watermark only saves duplicate forecasts after a replay; a few retries are enough."""
        backoff = Backoff(1.0)
        for attempt in range(5):
            try:
                result = await self.store.mark_forecast(marks)
            except StateUnavailable as exc:
                self.metrics.redis_errors.inc()
                if attempt == 4:
                    _log.warning("watermark_not_saved", error=str(exc), symbols=len(marks))
                    return
                await asyncio.sleep(backoff.next_delay())
                continue
            except StateMisconfigured as exc:
                self._fail(exc)
                return
            bad: Mapping[str, SymbolStateCorrupt] = result.quarantined
            if bad:
                self._quarantine(bad)
            return

    # -- rebalances -----------------------------------------------------------------------
    async def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = set(assigned)
        self._assigned_once = True
        self.clock.reset()  # refusals of partitions this worker may no longer hold say nothing now
        self._revoking -= parts
        self.ledger.assign(parts)
        if self._paused_for and parts:
            self.consumer.pause(parts)
        _log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in parts))

    async def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Fence, finish what already runs, commit, forget — before another member takes over."""
        parts = set(revoked) & self.ledger.owned()
        if not parts:
            return
        started = time.monotonic()
        # 1. Fence: no new work for these partitions from here (queued jobs, fetched candles, a batch
        #    the sampler took but has not started, a task started from now on).
        self._revoking |= parts
        abandoned = self.batcher.remove_if(lambda j: j.offsets[0][0] in parts)
        self._pending = [r for r in self._pending if r.tp not in parts]
        # 2. Work already under way finishes: a window write, then every batch sampling now.
        grace = self.settings.service.shutdown_grace_s
        # The lock is held for one window write (bounded by Redis's socket timeout) — or for a whole
        # state rebuild, minutes on a long topic: wait for it within the grace, not beyond (the group
        # would drop this member). A rebuild left running skips the fenced partitions' records.
        try:
            await asyncio.wait_for(self._write_lock.acquire(), timeout=grace)
        except TimeoutError:
            _log.warning("revoke_write_wait_timeout", grace_s=grace, restoring=self._restoring,
                         message="a window write or state rebuild still holds the write lock; the revoke goes on "
                                 "without it (the rebuild skips the revoked partitions)")
        else:
            self._write_lock.release()
        while self._inflight or self._background:
            left = grace - (time.monotonic() - started)
            if left <= 0:
                _log.warning("revoke_wait_timeout", in_flight=len(self._inflight), grace_s=grace)
                break
            await asyncio.wait(self._inflight | self._background, timeout=left)
        # 3. Commit what is done, then forget the partitions and their symbols.
        await self.checkpoint.commit(self.consumer, parts)
        self.checkpoint.forget(parts)
        symbols = self.ledger.revoke(parts)
        self._revoking -= parts
        self.scorer.drop(symbols)
        for tp in parts:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        _log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in parts),
                  abandoned_jobs=len(abandoned), seconds=round(time.monotonic() - started, 3))

    # -- lag, health ----------------------------------------------------------------------
    async def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < _LAG_INTERVAL_S:
            return
        self._last_lag = now
        with contextlib.suppress(Exception):
            for tp, lag in (await self.consumer.lag()).items():
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    async def _watch_health(self) -> None:
        """Probe the broker and Redis in the background, so /readyz answers at once from the result,
        and watch for a wedged sampler."""
        while True:
            self._check_sampling()
            await self._probe_once()
            await asyncio.sleep(_HEALTH_INTERVAL_S)

    def sampling_for_s(self) -> float:
        """How long the oldest sampling call still running has run (0: none running)."""
        since = self._sampling_since
        return time.monotonic() - min(since.values()) if since else 0.0

    def _sampling_stalled(self, age: float) -> bool:
        return age > self.settings.sampling.stall_after_s

    def _check_sampling(self) -> None:
        """A sampling call past ``stall_after_s`` will not come back in time, if ever (a hung CUDA
        kernel, a deadlock in a native library), and a thread cannot be interrupted: without this the
        batch slots stayed taken, backpressure paused every partition, the group kept this member's
        heartbeats, and /readyz said ready. Exit non-zero instead, the stuck batch uncommitted: the
        group hands the partitions to a healthy replica, which forecasts the batch again."""
        age = self.sampling_for_s()
        if self._sampling_stalled(age) and self._fatal is None:
            self._fail(SamplingStalled(
                f"a micro-batch has been sampling for {age:.0f} s, over SIGNAL_WORKER_SAMPLING__STALL_AFTER_S="
                f"{self.settings.sampling.stall_after_s:g}: the sampler is taken for wedged (a hung CUDA kernel, "
                "a deadlock); exiting without committing it, so that the group gives this worker's partitions to "
                "a healthy replica"))

    async def _probe_once(self) -> None:
        try:
            await self.producer.probe(timeout_s=_HEALTH_INTERVAL_S)
            self._broker_ok = not self.publisher.failing
        except Exception:
            self._broker_ok = False
        try:
            await asyncio.wait_for(self.store.ping(), timeout=1.0)
            if "redis" not in self._paused_for:
                await asyncio.wait_for(self._check_epoch(), timeout=1.0)
                self._redis_ok = True
        except (StateUnavailable, TimeoutError):
            self._redis_ok = False
        except Exception as exc:  # misconfigured or unexpected: not ready, and say why
            self._redis_ok = False
            _log.warning("redis_probe_failed", error=repr(exc))

    def readiness_detail(self) -> tuple[bool, dict[str, Any]]:
        """Ready: able to make progress — group joined, broker answering and acknowledging, Redis
        answering and taking writes, no rebuild in progress, no sampling call stalled, not stopping."""
        publishing = not self.publisher.stalled()
        sampling_for = self.sampling_for_s()
        sampling_ok = not self._sampling_stalled(sampling_for)
        detail = {
            "group_joined": self._assigned_once,
            "partitions": len(self.ledger.owned()),
            "model_loaded": True,
            "model_version": self.engine.model_version,
            "broker": self._broker_ok,
            "publishing": publishing,
            "redis": self._redis_ok and "redis" not in self._paused_for,
            "restoring": self._restoring or self.epoch.due,
            "stopping": self._stopping.is_set(),
            "clock": not self.clock.suspect,  # False: recent bars all refused as ahead of this clock
            "sampling_for_s": round(sampling_for, 1),  # the oldest call still sampling; 0: none
            "sampling": sampling_ok,  # False: past SIGNAL_WORKER_SAMPLING__STALL_AFTER_S (the worker exits)
        }
        ready = (self._assigned_once and self._broker_ok and publishing and bool(detail["redis"])
                 and not detail["restoring"] and not self._stopping.is_set() and self._fatal is None
                 and not self.clock.suspect and sampling_ok)
        return ready, detail

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        # Redis is asked live (one PING, bounded): a probe says at once what the last tick could not.
        try:
            await asyncio.wait_for(self.store.ping(), timeout=1.0)
        except Exception:
            self._redis_ok = False
        ready, detail = self.readiness_detail()
        self.metrics.set_ready(ready)
        return ready, detail


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_STARTUP", "SignalWorker"]

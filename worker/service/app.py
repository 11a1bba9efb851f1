"""The streaming worker: Kafka candles -> Redis windows -> micro-batched sampling -> forecast topic.

Delivery is at-least-once. A record's offset is committed only once its effect is durable: its
forecast (or dead-letter record) acknowledged by the broker, or, when it triggers nothing, its
window write done. What happens on each failure:

* malformed record: dead-lettered with the reason; the offset moves on; other symbols carry on.
* Redis down: the batch's window writes are retried with backoff while every partition is paused
  (heartbeats continue); nothing past the unwritten records is committed; it resumes by itself.
* broker down: aiokafka reconnects; publishing retries with backoff; commits wait.
* sampling fails (e.g. CUDA OOM after the half-batch retry): the worker exits non-zero without
  committing the batch, so it is redelivered after the restart.
* rebalance: queued jobs of revoked partitions are abandoned (the new owner replays them),
  in-flight batches are finished and committed before the partitions move.
* SIGTERM: stop fetching, finish queued and in-flight batches, flush, commit, exit 0 within
  ``service.shutdown_grace_s``; past it, exit 1 leaving the rest uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from schemas import (
    CandleRejected,
    DeadLetterRecord,
    decode_candle_fields,
    encode_dead_letter,
)
from schemas.headers import dead_letter_headers
from schemas.timeframe import format_duration
from worker.errors import StateUnavailable
from worker.features.candles import CandleSeries
from worker.model.forecaster import Forecast, ForecastRequest
from worker.observability.health import HealthServer
from worker.observability.logging import get_logger
from worker.observability.metrics import Metrics
from worker.service.batcher import MicroBatcher
from worker.service.engine import Engine, EngineResult
from worker.service.jobs import ForecastJob, Offset, Received
from worker.service.messages import forecast_record
from worker.service.offsets import OffsetTracker
from worker.service.scoring import OnlineScorer
from worker.service.triggers import plan_triggers
from worker.settings import Settings
from worker.state.connection import make_redis
from worker.state.windows import WindowStore
from worker.transport.consumer import CandleConsumer
from worker.transport.producer import OutRecord, RecordProducer

_log = get_logger("worker.service")
_COMMIT_INTERVAL_S = 0.2
_LAG_INTERVAL_S = 2.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class SignalWorker:
    def __init__(self, settings: Settings, engine: Engine, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.timeframe = format_duration(engine.timeframe_ms)
        self.worker_id = settings.service.worker_id
        self.batcher: MicroBatcher[ForecastJob] = MicroBatcher(settings.batch.max_size, settings.batch.max_wait_ms)
        self.tracker = OffsetTracker()
        self.scorer = OnlineScorer()
        self._newest_seen: dict[str, int] = {}
        # Per symbol: open times of the jobs queued or sampling, and the newest bar forecast. The
        # watermark may only cover bars below the oldest open job: after a crash the replay must not
        # take an unfinished older bar for a late one.
        self._open_jobs: dict[str, Counter[int]] = {}
        self._forecast_upto: dict[str, int] = {}
        self._symbol_tp: dict[str, TopicPartition] = {}
        self._pending: list[Received] = []
        self._paused_for: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.batch.max_in_flight)
        self._executor = ThreadPoolExecutor(settings.batch.max_in_flight, thread_name_prefix="sampler")
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._assigned_once = False
        self._redis_ok = False
        self._redis_failures = 0
        self._last_commit = 0.0
        self._last_lag = 0.0
        self.forecasts_published = 0
        self._final_candles = self.metrics.candles_in.labels(kind="final")  # per-candle: resolve once
        self._partial_candles = self.metrics.candles_in.labels(kind="partial")
        # Per batch: (wall-clock end, sampling ms), for `signal-worker bench`.
        self.sampling_log: deque[tuple[float, float]] = deque(maxlen=100_000)
        k = settings.kafka
        self.redis = make_redis(settings.redis)
        self.store = WindowStore(self.redis, prefix=settings.redis.key_prefix, length=settings.window.length,
                                 ttl_s=settings.redis.window_ttl_s)
        self.consumer = CandleConsumer(k, on_assigned=self._on_assigned, on_revoked=self._on_revoked,
                                       request_timeout_ms=k.request_timeout_ms, fetch_max_wait_ms=k.fetch_max_wait_ms,
                                       session_timeout_ms=k.session_timeout_ms,
                                       heartbeat_interval_ms=k.heartbeat_interval_ms)
        self.producer = RecordProducer(k, request_timeout_ms=k.request_timeout_ms)
        self.health = HealthServer(settings.service.host, settings.service.metrics_port, self.metrics.registry,
                                   self._readiness)
        if settings.window.length < engine.window_bars:
            raise ValueError(f"SIGNAL_WORKER_WINDOW__LENGTH={settings.window.length} is shorter than the "
                             f"{engine.window_bars} bars the model needs")

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, *, install_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT or :meth:`request_stop`; returns the process exit code."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        m = self.metrics
        m.set_model_info(model_version=self.engine.model_version, scheduler=self.engine.scheduler,
                         steps=self.engine.steps, samples=self.engine.samples, device=self.engine.device,
                         timeframe=self.timeframe)
        await self.health.start()
        await self._connect_redis()
        await self.producer.start()
        await self.consumer.start()
        _log.info("worker_started", worker_id=self.worker_id, input_topic=self.settings.kafka.input_topic,
                  output_topic=self.settings.kafka.output_topic, model_version=self.engine.model_version,
                  scheduler=self.engine.scheduler, steps=self.engine.steps, samples=self.engine.samples,
                  device=self.engine.device, timeframe=self.timeframe, metrics_port=self.health.port)
        sampler = asyncio.create_task(self._sample_loop(), name="sample-loop")
        code = 0
        try:
            await self._consume_loop()
        finally:
            code = await self._shutdown(sampler)
        return code

    async def _connect_redis(self) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.store.load_scripts()
            self._redis_ok = True

    async def _shutdown(self, sampler: asyncio.Task[None]) -> int:
        grace = self.settings.service.shutdown_grace_s
        started = time.monotonic()
        self._pause(self.consumer.assignment(), "shutdown")
        code = 0 if self._fatal is None else 1
        try:
            if self._fatal is None:
                await asyncio.wait_for(self._drain(), timeout=grace)
        except TimeoutError:
            _log.error("drain_timeout", grace_s=grace, queued=len(self.batcher), in_flight=len(self._inflight))
            code = 1
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._commit(force=True), timeout=max(1.0, grace - (time.monotonic() - started)))
        for closer in (self.consumer.stop, self.producer.stop, self.health.stop, self.redis.aclose):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        _log.info("worker_stopped", exit_code=code, forecasts=self.forecasts_published,
                  seconds=round(time.monotonic() - started, 3), fatal=repr(self._fatal) if self._fatal else None)
        return code

    async def _drain(self) -> None:
        """Finish what was fetched: queued jobs and in-flight batches; then flush and commit."""
        while self._pending and self._fatal is None:
            await self._apply_pending()
        while len(self.batcher) and self._fatal is None:
            jobs = self.batcher.take_all()
            for i in range(0, len(jobs), self.settings.batch.max_size):
                await self._slots.acquire()
                self._start_batch(jobs[i : i + self.settings.batch.max_size])
        while self._inflight:
            await asyncio.wait(set(self._inflight))
        await self.producer.flush()
        await self._commit(force=True)

    # -- consuming ------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        k = self.settings.kafka
        poll_ms = max(5, min(100, self.settings.batch.max_wait_ms))
        while not self._stopping.is_set() and self._fatal is None:
            try:
                records = await self.consumer.getmany(timeout_ms=poll_ms, max_records=k.max_poll_records)
            except Exception as exc:  # aiokafka reconnects on its own; count and go on
                self.metrics.broker_errors.inc()
                _log.warning("fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if records:
                await self._ingest(records)
            if self._pending:
                await self._apply_pending()
            self._backpressure()
            await self._commit()
            await self._update_lag()

    async def _ingest(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        k = self.settings.kafka
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            self.tracker.add(tp, rec.offset)
            try:
                candle = decode_candle_fields(rec.value, timeframe=self.timeframe,
                                              max_bytes=k.max_message_bytes, key=rec.key)
            except CandleRejected as err:
                await self._dead_letter(rec, tp, err)
                continue
            if not candle.is_final:
                # In-progress bars are never stored: windows hold closed bars only.
                self._partial_candles.inc()
                self.tracker.done(tp, rec.offset)
                continue
            self._final_candles.inc()
            self._symbol_tp[candle.symbol] = tp
            self._pending.append(Received(candle, tp, rec.offset, int(rec.timestamp)))

    async def _dead_letter(self, rec: ConsumerRecord[bytes, bytes], tp: TopicPartition, err: CandleRejected) -> None:
        record = DeadLetterRecord.from_rejection(
            err, original=bytes(rec.value or b""), original_key=rec.key, topic=rec.topic, partition=rec.partition,
            offset=rec.offset, record_timestamp=rec.timestamp, worker_id=self.worker_id,
        )
        _log.warning("dead_letter", reason=str(err.reason), detail=err.detail, topic=rec.topic,
                     partition=rec.partition, offset=rec.offset)
        fut = await self._send(self.settings.kafka.dead_letter_topic, encode_dead_letter(record), rec.key,
                               dead_letter_headers(record))
        reason = str(err.reason)

        def _acked(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                self.metrics.broker_errors.inc()
                self._fail(RuntimeError(f"dead-letter publish failed for {tp}@{rec.offset}: {f.exception()!r}"))
                return
            self.metrics.dead_letters.labels(reason=reason).inc()
            self.tracker.done(tp, rec.offset)

        fut.add_done_callback(_acked)

    async def _send(self, topic: str, value: bytes, key: bytes | None,
                    headers: list[tuple[str, bytes]]) -> asyncio.Future[Any]:
        delay = 0.1
        while True:
            try:
                return await self.producer.send(topic, value, key=key, headers=headers)
            except Exception as exc:  # buffer full or broker unreachable: back off, keep order
                self.metrics.broker_errors.inc()
                _log.warning("publish_retry", topic=topic, error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _send_many(self, topic: str, records: list[OutRecord]) -> list[asyncio.Future[Any]]:
        delay = 0.1
        while True:
            try:
                return await self.producer.send_many(topic, records)
            except Exception as exc:  # no metadata or no room in the queue: back off, keep order
                # A retry after a partial enqueue duplicates those records (same idempotency keys).
                self.metrics.broker_errors.inc()
                _log.warning("publish_retry", topic=topic, records=len(records), error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _apply_pending(self) -> None:
        while self._pending:
            pending = self._pending
            chunk = self._next_chunk()
            n = len(chunk)  # `chunk` may be `pending` itself
            if not await self._apply(chunk):
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

    async def _apply(self, received: list[Received]) -> bool:
        try:
            snapshots = await self.store.apply([r.candle for r in received])
        except StateUnavailable as exc:
            self._redis_ok = False
            self._redis_failures += 1
            self.metrics.redis_errors.inc()
            delay = min(self.settings.redis.retry_max_backoff_s, 0.05 * 2 ** min(self._redis_failures, 10))
            if "redis" not in self._paused_for:
                _log.error("redis_unavailable", error=str(exc), pending=len(self._pending), retry_in_s=delay)
            self._pause(self.consumer.assignment(), "redis")
            await asyncio.sleep(delay)
            return False
        if "redis" in self._paused_for:
            _log.info("redis_recovered", after_failures=self._redis_failures)
            self._resume("redis")
        self._redis_ok, self._redis_failures = True, 0
        plan = plan_triggers(received, snapshots, self._newest_seen, conflate=self.settings.window.conflate)
        m = self.metrics
        if plan.late:
            m.late.inc(len(plan.late))
            self.tracker.done_many((r.tp, r.offset) for r in plan.late)
        if plan.conflated:
            m.conflated.inc(plan.conflated)
        if self.settings.service.online_scoring:
            scored = [label for snap in snapshots.values() for label, _, _ in self.scorer.observe(snap)]
            for label in scored:
                m.online_scored.labels(horizon=label).inc()
            # The rolling summaries only change when something was scored.
            for label, s in (self.scorer.summary() if scored else {}).items():
                m.online_crps.labels(horizon=label).set(s["crps"])
                for interval in ("50", "80", "90"):
                    m.online_coverage.labels(horizon=label, interval=interval).set(s[f"coverage_{interval}"])
        for job in plan.jobs:
            snap = snapshots[job.symbol]
            end = int(snap.times.searchsorted(job.open_time, side="right"))  # the window up to the job's bar
            job.candles = CandleSeries(snap.times[:end], snap.values[:end])
            open_times = self._open_jobs.get(job.symbol)
            if open_times is None:
                open_times = self._open_jobs[job.symbol] = Counter()
            open_times[job.open_time] += 1
            self.batcher.add(job)
        return True

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

    # -- sampling and publishing ----------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            jobs = await self.batcher.next_batch()
            await self._slots.acquire()
            self._start_batch(jobs)

    def _start_batch(self, jobs: list[ForecastJob]) -> None:
        task = asyncio.create_task(self._process(jobs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _process(self, jobs: list[ForecastJob]) -> None:
        m = self.metrics
        m.batches_in_flight.inc()
        try:
            started = time.perf_counter()
            # Every job got its window when it was planned; indices of the result refer to ``jobs``.
            requests = [ForecastRequest(j.symbol, j.candles) for j in jobs if j.candles is not None]
            assert len(requests) == len(jobs)
            result: EngineResult = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.process, requests)
            sampling_s = time.perf_counter() - started
            m.sampling_seconds.observe(sampling_s)
            self.sampling_log.append((time.time(), sampling_s * 1000))
            m.batch_size.observe(len(jobs))
            await self._publish(jobs, result, sampling_s)
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
            self.tracker.done_many(jobs[i].offsets)
        done_jobs = [j for i, j in enumerate(jobs) if i not in rejected]
        now = _now_ms()
        published: list[ForecastJob] = []
        forecasts: list[tuple[int, Forecast]] = []
        records: list[OutRecord] = []
        for i, (job, fc) in enumerate(zip(done_jobs, result.forecasts, strict=True)):
            try:
                value, headers = forecast_record(fc, timeframe=self.timeframe, timeframe_ms=self.engine.timeframe_ms,
                                                 ingest_ms=job.ingest_ms, publish_ms=now, worker_id=self.worker_id)
            except ValidationError as exc:  # e.g. a NaN from the model: never publish it
                m.skipped.labels(reason="invalid_forecast").inc()
                _log.error("forecast_invalid", symbol=job.symbol, open_time=job.open_time, error=str(exc))
                self.tracker.done_many(job.offsets)
                continue
            published.append(job)
            forecasts.append((i, fc))
            records.append(OutRecord(job.symbol.encode(), value, headers))
        futures = await self._send_many(self.settings.kafka.output_topic, records) if records else []
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            m.broker_errors.inc(len(failed))
            raise RuntimeError(f"{len(failed)} forecast record batches not acknowledged: {failed[0]!r}")
        acked = _now_ms()
        e2e = [acked - j.ingest_ms for j in published]
        for v in e2e:
            m.end_to_end_seconds.observe(v / 1000)
        m.forecasts_out.inc(len(published))
        self.forecasts_published += len(published)
        await self._mark_watermarks(self._release_jobs(jobs, published))
        offsets: list[Offset] = [o for j in published for o in j.offsets]
        self.tracker.done_many(offsets)
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

    def _release_jobs(self, jobs: list[ForecastJob], done_jobs: list[ForecastJob]) -> dict[str, int]:
        """Close a finished batch's jobs; return the watermark each touched symbol may have now."""
        for j in jobs:
            open_times = self._open_jobs.get(j.symbol)
            if open_times is not None:
                open_times[j.open_time] -= 1
                if open_times[j.open_time] <= 0:
                    del open_times[j.open_time]
                if not open_times:
                    del self._open_jobs[j.symbol]
        for j in done_jobs:
            if j.open_time > self._forecast_upto.get(j.symbol, -1):
                self._forecast_upto[j.symbol] = j.open_time
        marks: dict[str, int] = {}
        for symbol in {j.symbol for j in jobs}:
            upto = self._forecast_upto.get(symbol)
            if upto is None:
                continue
            open_times = self._open_jobs.get(symbol)
            if open_times:
                upto = min(upto, min(open_times) - 1)
            marks[symbol] = upto
        return marks

    async def _mark_watermarks(self, marks: dict[str, int]) -> None:
        """The watermark only saves duplicate forecasts after a replay; a few retries are enough."""
        for attempt in range(5):
            try:
                await self.store.mark_forecast(marks)
                return
            except StateUnavailable as exc:
                self.metrics.redis_errors.inc()
                if attempt == 4:
                    _log.warning("watermark_not_saved", error=str(exc), symbols=len(marks))
                    return
                await asyncio.sleep(0.1 * 2**attempt)

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            _log.error("fatal", error=repr(exc), exc_info=exc)
        self._stopping.set()

    # -- commits, rebalances, lag, health -------------------------------------------------
    async def _commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < _COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self.tracker.mark_committed(offsets)
        except Exception as exc:  # a rebalance in progress: the new owner replays from the last commit
            self.metrics.broker_errors.inc()
            _log.warning("commit_failed", error=repr(exc))

    async def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = set(assigned)
        self._assigned_once = True
        if self._paused_for and parts:
            self.consumer.pause(parts)
        _log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in parts))

    async def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        parts = set(revoked)
        if not parts:
            return
        abandoned = self.batcher.remove_if(lambda j: bool(j.partitions & parts))
        self._pending = [r for r in self._pending if r.tp not in parts]
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.settings.service.shutdown_grace_s)
        with contextlib.suppress(Exception):
            offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in parts}
            if offsets:
                await self.consumer.commit(offsets)
        self.tracker.forget(parts)
        symbols = {s for s, tp in self._symbol_tp.items() if tp in parts}
        for s in symbols:
            self._newest_seen.pop(s, None)
            self._symbol_tp.pop(s, None)
            self._open_jobs.pop(s, None)
            self._forecast_upto.pop(s, None)
        self.scorer.drop(symbols)
        for tp in parts:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        _log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in parts),
                  abandoned_jobs=len(abandoned))

    async def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < _LAG_INTERVAL_S:
            return
        self._last_lag = now
        with contextlib.suppress(Exception):
            for tp, lag in (await self.consumer.lag()).items():
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            await asyncio.wait_for(self.store.ping(), timeout=1.0)
            self._redis_ok = True
        except Exception:
            self._redis_ok = False
        detail = {
            "group_joined": self._assigned_once,
            "partitions": len(self.consumer.assignment()),
            "model_loaded": True,
            "model_version": self.engine.model_version,
            "redis": self._redis_ok,
            "stopping": self._stopping.is_set(),
        }
        ready = self._assigned_once and self._redis_ok and not self._stopping.is_set()
        self.metrics.set_ready(ready)
        return ready, detail

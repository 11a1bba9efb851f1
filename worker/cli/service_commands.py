"""CLI handlers for the service and the tools around it: run, replay, tail, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer

from schemas import CandleEvent, decode_forecast, encode_candle
from schemas.headers import candle_headers
from schemas.timeframe import format_duration, parse_duration_ms, parse_horizons
from worker.errors import ConfigError
from worker.features.candles import CandleSeries, iso, load_csv, to_ms
from worker.settings import KafkaSettings, Settings, load_settings
from worker.transport.broker import kafka_client_kwargs
from worker.transport.producer import RecordProducer

SHIPPED_CANDLES = Path(__file__).resolve().parent.parent / "data" / "eurusd_h1_2017_ask.csv"


# -- run ----------------------------------------------------------------------------------
def build_engine(settings: Settings) -> Any:
    import torch

    from worker.model.forecaster import Forecaster
    from worker.service.engine import ModelEngine

    s = settings.sampling
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    forecaster = Forecaster.load(
        s.checkpoint, scheduler=s.scheduler, device=s.device,
        horizons=parse_horizons(s.horizons) if s.horizons else None,
        timeframe=settings.window.timeframe, allow_timeframe_mismatch=s.allow_timeframe_mismatch,
        max_missing_fraction=settings.window.max_missing_fraction,
    )
    return ModelEngine(forecaster, samples=s.samples, steps=s.steps, seed=s.seed, cuda_streams=s.cuda_streams,
                       keep_samples=settings.service.online_scoring)


def make_worker(settings: Settings, engine: Any) -> Any:
    from worker.service.app import SignalWorker

    try:
        return SignalWorker(settings, engine)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def settle_heap() -> None:
    """Call once everything is loaded, before serving.

    The interpreter's cyclic garbage collector rescans every live object on each full collection;
    after start-up that is hundreds of thousands of objects (torch, the model, the clients) that
    will never be garbage, and scanning them took a quarter of the worker's time in the I/O
    benchmark. ``gc.freeze`` moves them out of the collector's sight. A larger first-generation
    threshold (default 700) then lets the short-lived objects of a batch die by reference counting
    before a collection looks at them, and frequent second-generation passes still reclaim the
    cycles that outlived one collection: with rarer ones (50,000/20/20) memory crept up by ~70 MB
    over a 100,000-candle replay; with 10,000/2/5 it stays flat.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 2, 5)


def _run(args: argparse.Namespace) -> int:
    from worker.observability.logging import configure_logging

    settings = load_settings()
    configure_logging(settings.service.log_format, settings.service.log_level)
    engine = build_engine(settings)
    settle_heap()

    async def serve() -> int:
        # aiokafka clients must be created inside the running event loop.
        return int(await make_worker(settings, engine).run())

    return asyncio.run(serve())


# -- replay -------------------------------------------------------------------------------
def candle_events(series: CandleSeries, symbol: str, timeframe: str) -> list[CandleEvent]:
    return [
        CandleEvent(symbol=symbol, timeframe=timeframe, open_time=int(t), open=float(r[0]), high=float(r[1]),
                    low=float(r[2]), close=float(r[3]), volume=float(r[4]), is_final=True)
        for t, r in zip(series.open_time, series.ohlcv, strict=True)
    ]


async def publish_candles(producer: RecordProducer, topic: str, events: Sequence[CandleEvent], *,
                          speed: float | None = None, timeframe_ms: int = 3_600_000,
                          stop: asyncio.Event | None = None) -> int:
    """Publish in order; at ``speed`` x real time (a bar every timeframe/speed seconds), else at once."""
    headers = candle_headers()
    futures = []
    sent = 0
    for ev in events:
        if stop is not None and stop.is_set():
            break
        futures.append(await producer.send(topic, encode_candle(ev), key=ev.symbol.encode(), headers=headers))
        sent += 1
        if speed:
            await asyncio.sleep(timeframe_ms / 1000 / speed)
        if len(futures) >= 5000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    return sent


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    k = load_settings().kafka
    updates: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        updates["bootstrap_servers"] = args.bootstrap
    return k.model_copy(update=updates)


def _replay(args: argparse.Namespace) -> int:
    series = load_csv(args.candles)
    tf_ms = parse_duration_ms(args.timeframe) if args.timeframe else int(np.median(np.diff(series.open_time)))
    timeframe = format_duration(tf_ms)
    if args.limit:
        series = series[: args.limit]
    k = _kafka(args)
    topic = args.topic or k.input_topic

    async def go() -> int:
        async with RecordProducer(k) as producer:
            return await publish_candles(producer, topic, candle_events(series, args.symbol, timeframe),
                                         speed=None if args.max_rate else args.speed, timeframe_ms=tf_ms)

    print(f"replaying {len(series)} {timeframe} candles of {args.symbol} ({iso(int(series.open_time[0]))} .. "
          f"{iso(int(series.open_time[-1]))}) to {topic} at "
          f"{'max rate' if args.max_rate or not args.speed else f'{args.speed:g}x'}", flush=True)
    sent = asyncio.run(go())
    print(json.dumps({"published": sent, "topic": topic, "symbol": args.symbol, "timeframe": timeframe}))
    return 0


# -- tail ---------------------------------------------------------------------------------
def format_forecast_row(payload: bytes) -> str:
    m = decode_forecast(payload)
    parts = [f"{iso(m.open_time)} {m.symbol:<10s} close={m.close:<10.5f}"]
    for h in m.horizons:
        label = format_duration(h.horizon_minutes * 60_000)
        parts.append(f"| {label:>3s} mean={h.mean * 1e4:+6.1f}bp std={h.std * 1e4:5.1f}bp "
                     f"q05..q95={h.price_quantiles['q05']:.5f}..{h.price_quantiles['q95']:.5f} "
                     f"P(up)={h.p_up:.2f}")
    parts.append(f"| {m.latency_ms:6.0f}ms {m.scheduler}/{m.steps}")
    return " ".join(parts)


async def tail_forecasts(k: KafkaSettings, topic: str, *, from_beginning: bool, limit: int | None,
                         stop: asyncio.Event | None = None, out: Callable[[str], None] = print) -> int:
    kwargs = kafka_client_kwargs(k)
    kwargs.update(group_id=None, auto_offset_reset="earliest" if from_beginning else "latest",
                  fetch_max_wait_ms=k.fetch_max_wait_ms)
    consumer = AIOKafkaConsumer(topic, **kwargs)
    await consumer.start()
    shown = 0
    try:
        while (limit is None or shown < limit) and not (stop is not None and stop.is_set()):
            batches = await consumer.getmany(timeout_ms=200)
            for recs in batches.values():
                for rec in recs:
                    if limit is not None and shown >= limit:
                        break
                    out(format_forecast_row(rec.value))
                    shown += 1
    finally:
        await consumer.stop()
    return shown


def _tail(args: argparse.Namespace) -> int:
    k = _kafka(args)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail_forecasts(k, args.topic or k.output_topic, from_beginning=args.from_beginning,
                                   limit=args.limit, out=lambda s: print(s, flush=True)))
    return 0


# -- demo ---------------------------------------------------------------------------------
def simulated_series(base: CandleSeries, n: int, index: int, seed: int = 0) -> CandleSeries:
    """A simulated symbol: real EURUSD bar shapes, resampled (block bootstrap), another price level.
    Open times follow the real calendar so weekends stay weekends."""
    rng = np.random.default_rng(seed + index)
    logc = np.log(base.close)
    ret = np.diff(logc)
    n = min(n, len(base))
    blocks = rng.integers(0, len(ret) - 24, size=n // 24 + 1)
    sim = np.concatenate([ret[b : b + 24] for b in blocks])[:n]
    level = [1.25, 0.85, 1.6, 110.0, 0.65][index % 5]
    close = level * np.exp(np.cumsum(sim))
    prev = np.concatenate([[level], close[:-1]])
    rel = base.ohlcv[:n]
    spread_hi = np.log(rel[:, 1] / np.maximum(rel[:, 0], rel[:, 3]))
    spread_lo = np.log(np.minimum(rel[:, 0], rel[:, 3]) / rel[:, 2])
    high = np.maximum(prev, close) * np.exp(spread_hi)
    low = np.minimum(prev, close) * np.exp(-spread_lo)
    ohlcv = np.stack([prev, high, low, close, rel[:, 4]], axis=1)
    return CandleSeries(base.open_time[:n].copy(), ohlcv)


def _demo(args: argparse.Namespace) -> int:
    from worker.data import fx
    from worker.dev.embedded import EmbeddedBroker, EmbeddedRedis, create_topics
    from worker.dev.replay import calibration_line, demo_candles
    from worker.observability.logging import configure_logging

    configure_logging("console", "warning")
    if not fx.available():
        print(f"[demo] the real FX candles come from the tradetide wheel; install it with: {fx.INSTALL_HINT}",
              file=sys.stderr)
        return 2
    print("[demo] starting an embedded Kafka-compatible broker (Tansu) and an embedded Redis (valkey)...", flush=True)
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        settings = load_settings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap, input_topic="candles", output_topic="forecasts",
                                dead_letter_topic="candles.dlq", consumer_group="signal-worker-demo"),
            redis={"url": redis_server.url, "key_prefix": "demo"},
            window={"timeframe": "5m"},
            # A loaded CPU can have a few batches queued when the demo stops: let them finish.
            service={"metrics_port": 0, "log_format": "console", "log_level": "warning", "shutdown_grace_s": 180},
        )
        engine = build_engine(settings)
        warm = engine.window_bars
        timeframe_ms = 300_000
        symbols = demo_candles(args.start, args.bars, warm_up=warm)
        n = min(len(s) for s in symbols.values())
        for i in range(args.simulated):  # optional extra symbols, marked SIM: resampled EURUSD returns
            symbols[f"SIM{i + 1}"] = simulated_series(symbols["EURUSD"][:n], n, i)
        print(f"[demo] broker {broker.bootstrap}, redis {redis_server.url}", flush=True)
        first = next(iter(symbols.values()))
        print(f"[demo] replaying real 5m candles of {', '.join(s for s in symbols if not s.startswith('SIM'))} "
              f"(tradetide wheel){' and simulated SIM symbols' if args.simulated else ''}, "
              f"{iso(int(first.open_time[0]))} .. {iso(int(first.open_time[n - 1]))}: the first {warm} bars "
              f"per pair at once (history), then one bar every {timeframe_ms / 1000 / args.speed:.2f} s "
              f"({args.speed:g}x real time). Model {engine.model_version}, {engine.scheduler} {engine.steps} steps "
              f"x {engine.samples} samples on {engine.device}. Forecasts 15m / 1h / 4h; every "
              f"{args.calibration_every:g} s the live calibration (rolling coverage of the 50/80/90 % intervals and "
              "CRPS, as the online scorer computes them once each horizon has realised). Ctrl-C stops.", flush=True)

        async def main() -> None:
            await create_topics(broker.bootstrap, {"candles": 4, "forecasts": 4, "candles.dlq": 1})
            worker = make_worker(settings, engine)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal as _signal

            for sig in (_signal.SIGINT, _signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            worker_task = asyncio.create_task(worker.run(install_signals=False))
            tail_task = asyncio.create_task(tail_forecasts(settings.kafka, "forecasts", from_beginning=True,
                                                           limit=None, stop=stop,
                                                           out=lambda s: print(s, flush=True)))

            async def replay() -> None:
                async with RecordProducer(settings.kafka) as producer:
                    events = {s: candle_events(series, s, "5m") for s, series in symbols.items()}
                    await publish_candles(producer, "candles", [e for s in events for e in events[s][:warm]])
                    for i in range(warm, n):
                        if stop.is_set():
                            return
                        await publish_candles(producer, "candles", [events[s][i] for s in events])
                        await asyncio.sleep(timeframe_ms / 1000 / args.speed)

            async def calibration() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=args.calibration_every)
                    print(calibration_line(worker.scorer.summary()), flush=True)

            replay_task = asyncio.create_task(replay())
            calibration_task = asyncio.create_task(calibration())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.duration)
            stop.set()
            replay_task.cancel()
            await calibration_task
            worker.request_stop()
            code = await worker_task
            await tail_task
            skipped = {s.labels["reason"]: int(s.value) for m in worker.metrics.skipped.collect()
                       for s in m.samples if s.name.endswith("_total") and s.value}
            if skipped:
                print(f"[demo] bars not forecast, by reason: {skipped}", flush=True)
            print(f"[demo] stopped {'cleanly' if code == 0 else 'with errors'}: {worker.forecasts_published} "
                  f"forecasts published, exit code {code}", flush=True)

        asyncio.run(main())
    return 0


# -- bench --------------------------------------------------------------------------------
def _rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bench_worker(overrides: dict[str, Any], io_only: bool, stats_path: str) -> None:
    """The benchmarked worker, in a process of its own as when deployed, so that the benchmark's
    own producer and consumer do not share its interpreter. Stops on SIGTERM; writes its per-batch
    sampling times to ``stats_path``."""
    from worker.observability.logging import configure_logging

    configure_logging("json", os.environ.get("BENCH_LOG_LEVEL", "error"))
    settings = load_settings(**overrides)
    engine = _bench_engine() if io_only else build_engine(settings)

    async def serve() -> int:
        worker = make_worker(settings, engine)
        code = int(await worker.run())
        Path(stats_path).write_text(json.dumps({"exit_code": code, "sampling": list(worker.sampling_log)}))
        return code

    settle_heap()
    sys.exit(asyncio.run(serve()))


_BENCH_TIMEFRAME_MS = 3_600_000  # the shipped candles are hourly
# With a 5-minute model: real EURUSD 5-minute bars from the training period, from a Monday on, so
# the warm-up window and the benchmarked bars are one trading stretch without a weekend gap.
_BENCH_5M_FROM = "2023-06-05T00:00:00Z"


def _bench_base(io_only: bool) -> tuple[CandleSeries, str]:
    """The real bars the simulated symbols are resampled from, and their timeframe: the model's
    (the default checkpoint's, or SIGNAL_WORKER_SAMPLING__CHECKPOINT's), hourly for the I/O path."""
    if not io_only:
        from worker.model.checkpoint import load_checkpoint

        timeframe_ms = load_checkpoint(load_settings().sampling.checkpoint).timeframe_ms
        if timeframe_ms == 300_000:
            from worker.data import fx

            return fx.load_pair("EURUSD", timeframe_ms, start_ms=to_ms(_BENCH_5M_FROM), end_ms=fx.TRAIN_END), "5m"
        if timeframe_ms != _BENCH_TIMEFRAME_MS:
            raise ConfigError(f"bench: no benchmark candles for a {timeframe_ms} ms checkpoint (5m or 1h)")
    return load_csv(SHIPPED_CANDLES), "1h"


def _bench_engine() -> Any:
    from worker.service.engine import TrivialEngine

    tf_ms = _BENCH_TIMEFRAME_MS
    return TrivialEngine(timeframe_ms=tf_ms, horizons_ms=[tf_ms, 4 * tf_ms])


def _bench(args: argparse.Namespace) -> int:
    import multiprocessing
    import signal
    import tempfile

    from worker.dev.embedded import EmbeddedBroker, EmbeddedRedis, create_topics
    from worker.evaluation.report import machine

    base, timeframe = _bench_base(args.io_only)
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, Any] = dict(
            kafka={"bootstrap_servers": broker.bootstrap, "consumer_group": "bench"},
            redis={"url": redis_server.url, "key_prefix": "bench"},
            window={"timeframe": timeframe, "conflate": False, "length": 256},
            # I/O path: big batches and more of them in flight (the trivial engine costs ~nothing);
            # with the model: one batch per bar holds every symbol, as in production.
            batch={"max_size": 1024, "max_wait_ms": 5, "max_in_flight": 4} if args.io_only
            else {"max_size": max(64, args.symbols), "max_wait_ms": 5},
            service={"metrics_port": 0, "online_scoring": not args.io_only},
        )
        settings = load_settings(**overrides)
        if args.io_only:
            engine_name = "trivial"
            warm = _bench_engine().window_bars
        else:  # loaded here only to name it; the worker process loads its own
            engine = build_engine(settings)
            engine_name = (f"{engine.model_version} {engine.scheduler}/{engine.steps}x{engine.samples} "
                           f"on {engine.device}")
            warm = engine.window_bars
            del engine
        n_bars = warm + args.bars
        series = [simulated_series(base, n_bars, i, seed=7) for i in range(args.symbols)]
        events = [candle_events(s, f"B{i:04d}", timeframe) for i, s in enumerate(series)]
        stats_path = os.path.join(tmp, "worker-stats.json")

        async def main() -> dict[str, Any]:
            await create_topics(broker.bootstrap, {"candles": 8, "forecasts": 8, "candles.dlq": 1})
            got: list[float] = []  # bench-side receive time of each forecast
            kw = kafka_client_kwargs(settings.kafka)
            kw.update(group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=10)
            out = AIOKafkaConsumer("forecasts", **kw)
            await out.start()
            result: dict[str, Any] = {}
            if args.io_only:
                # Throughput: the whole backlog is on the topic before the worker starts, in time
                # order across symbols, as a feed (or a worker's restart backlog) delivers it.
                async with RecordProducer(settings.kafka) as producer:
                    await publish_candles(producer, "candles", [ev[i] for i in range(n_bars) for ev in events])
            proc = multiprocessing.get_context("spawn").Process(
                target=_bench_worker, args=(overrides, args.io_only, stats_path), name="bench-worker")
            proc.start()
            assert proc.pid is not None
            rss: list[float] = []
            try:
                async with RecordProducer(settings.kafka) as producer:
                    if args.io_only:
                        expected = args.symbols * (n_bars - warm + 1)  # every bar from the warm-th on
                        await _wait_count(out, 1, got, proc=proc)
                        rss.append(_rss_mb(proc.pid))
                        t0, cpu0 = got[0], _cpu_s(proc.pid)
                        await _wait_count(out, expected - len(got), got, proc=proc, rss=rss, every=10_000)
                        cpu = _cpu_s(proc.pid) - cpu0
                        elapsed = max(got[-1] - t0, 1e-3)
                        result["throughput_candles_per_s"] = round((len(got) - 1) / elapsed, 1)
                        # Near 1.0: the worker's one interpreter is the bottleneck, not the broker.
                        result["worker_cpu_fraction"] = round(cpu / elapsed, 2)
                        result["candles"] = args.symbols * n_bars
                        result["forecasts"] = len(got)
                        result["seconds"] = round(elapsed, 2)
                    else:
                        # Warm-up history, then wait until the worker has caught up.
                        await publish_candles(producer, "candles", [e for ev in events for e in ev[:warm]])
                        await _wait_count(out, args.symbols, got, proc=proc)
                        rss.append(_rss_mb(proc.pid))
                        live_from = time.time()  # the warm-up backlog's batches are not the live path
                        # Latency: one bar for all symbols at a time, as a live feed does.
                        lat: list[float] = []
                        for i in range(warm, n_bars):
                            got.clear()
                            sent = time.time()
                            await publish_candles(producer, "candles", [ev[i] for ev in events])
                            await _wait_count(out, args.symbols, got, proc=proc)
                            lat.extend((t - sent) * 1000 for t in got)
                        rss.append(_rss_mb(proc.pid))
                        result["e2e_ms_p50"] = round(float(np.percentile(lat, 50)), 1)
                        result["e2e_ms_p99"] = round(float(np.percentile(lat, 99)), 1)
                        result["bars"] = args.bars
                        result["_live_from"] = live_from
            finally:
                await out.stop()
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
                await asyncio.get_running_loop().run_in_executor(None, proc.join, 120)
            stats = json.loads(Path(stats_path).read_text()) if os.path.exists(stats_path) else {}
            result["worker_exit_code"] = stats.get("exit_code", proc.exitcode)
            if not args.io_only and stats:
                live_from = result.pop("_live_from")
                samp = [ms for end, ms in stats["sampling"] if end >= live_from]
                result["sampling_ms_median"] = round(statistics.median(samp), 1)
                result["overhead_fraction_median"] = round(1 - statistics.median(samp) / result["e2e_ms_p50"], 4)
            result["rss_mb"] = [round(v, 1) for v in rss]
            return result

        res = asyncio.run(main())
    doc = {"command": "signal-worker " + " ".join(sys.argv[1:]),
           "symbols": args.symbols, "bars": args.bars, "io_only": args.io_only, "engine": engine_name,
           "worker": "own process", **res, "machine": machine()}
    print(json.dumps(doc))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(doc) + "\n")
    return 0 if res.get("worker_exit_code") == 0 else 1


async def _wait_count(consumer: AIOKafkaConsumer, n: int, got: list[float], *, proc: Any,
                      rss: list[float] | None = None, every: int = 0, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    start = len(got)
    while len(got) - start < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {len(got) - start} of {n} forecasts after {timeout_s}s")
        if not proc.is_alive():
            raise RuntimeError(f"bench: the worker exited with code {proc.exitcode}")
        batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
        now = time.time()
        for recs in batches.values():
            for _rec in recs:
                got.append(now)
                if rss is not None and every and (len(got) - start) % every == 0:
                    rss.append(_rss_mb(proc.pid))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "replay": _replay,
    "tail": _tail,
    "demo": _demo,
    "bench": _bench,
}



"""CLI handlers for the service and the tools around it: run, replay, tail, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas import CandleEvent, decode_forecast, encode_candle
from schemas.headers import candle_headers
from schemas.timeframe import format_duration, parse_duration_ms, parse_horizons
from worker.errors import ConfigError
from worker.features.candles import CandleSeries, iso, load_csv
from worker.settings import KafkaSettings, Settings, load_settings
from worker.transport.producer import RecordProducer
from worker.transport.reader import PartitionReader

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
        max_missing_fraction=settings.window.max_missing_fraction, cuda_graphs=s.cuda_graphs,
        weekend_close=s.weekend_close,
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

    workers: list[Any] = []

    async def serve() -> int:
        # aiokafka clients must be created inside the running event loop.
        workers.append(make_worker(settings, engine))
        return int(await workers[0].run())

    code = asyncio.run(serve())
    if workers and workers[0].sampler_threads_left:
        # A wedged sampling thread (SamplingStalled) cannot be stopped, and the interpreter's exit
        # joins every executor thread: a normal exit would hang for good instead of letting the
        # orchestrator restart the pod. Everything else is closed and committed by now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


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
    shown = 0
    async with PartitionReader(k, auto_offset_reset="earliest" if from_beginning else "latest") as reader:
        reader.follow(topic)
        while (limit is None or shown < limit) and not (stop is not None and stop.is_set()):
            for rec in await reader.getmany(timeout_ms=200):
                if limit is not None and shown >= limit:
                    break
                out(format_forecast_row(rec.value))
                shown += 1
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
def _bench(args: argparse.Namespace) -> int:
    from worker.dev.bench_worker import bench  # the harness is dev-only; the command stays here

    return bench(args)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "replay": _replay,
    "tail": _tail,
    "demo": _demo,
    "bench": _bench,
}



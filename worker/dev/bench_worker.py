"""The ``signal-worker bench`` harness (dev-only): M symbols x N bars through an embedded broker and
Redis, the worker in a process of its own as when deployed; throughput (``--io-only``, trivial
engine) or end-to-end latency per bar with the model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.cli.service_commands import (
    SHIPPED_CANDLES,
    build_engine,
    candle_events,
    make_worker,
    publish_candles,
    settle_heap,
    simulated_series,
)
from worker.errors import ConfigError
from worker.features.candles import CandleSeries, load_csv, to_ms
from worker.settings import load_settings
from worker.transport.producer import RecordProducer
from worker.transport.reader import PartitionReader


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


def bench(args: argparse.Namespace) -> int:
    """``signal-worker bench``: M symbols x N bars through the real (embedded) broker and Redis."""
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
            out = PartitionReader(settings.kafka, auto_offset_reset="earliest", fetch_max_wait_ms=10)
            await out.start()
            out.follow("forecasts")
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
                if proc.is_alive():  # it ignored SIGTERM for two minutes: the benchmark must still end
                    proc.kill()
                    proc.join()
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


async def _wait_count(consumer: PartitionReader, n: int, got: list[float], *, proc: Any,
                      rss: list[float] | None = None, every: int = 0, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    start = len(got)
    while len(got) - start < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {len(got) - start} of {n} forecasts after {timeout_s}s")
        if not proc.is_alive():
            raise RuntimeError(f"bench: the worker exited with code {proc.exitcode}")
        records = await consumer.getmany(timeout_ms=100, max_records=10_000)
        now = time.time()
        for _rec in records:
            got.append(now)
            if rss is not None and every and (len(got) - start) % every == 0:
                rss.append(_rss_mb(proc.pid))

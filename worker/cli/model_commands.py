"""CLI handlers for the forecasting core: train, backtest, evaluate, compare-schedulers, bench-model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from schemas.timeframe import format_duration, parse_horizons
from worker.features.candles import CandleSeries, fingerprint, load_csv, to_ms
from worker.model.forecaster import Forecaster, ForecastRequest

SHIPPED_CANDLES = Path(__file__).resolve().parent.parent / "data" / "eurusd_h1_2017_ask.csv"


def _forecaster(args: argparse.Namespace) -> Forecaster:
    if args.threads:
        torch.set_num_threads(args.threads)
    return Forecaster.load(args.checkpoint, scheduler=args.scheduler, device=args.device)


def _train(args: argparse.Namespace) -> int:
    from worker.model.training import TrainConfig, train

    series = load_csv(args.candles)
    cfg = TrainConfig(timeframe=args.timeframe, horizons=args.horizons, val_start=args.val_start, seed=args.seed,
                      threads=args.threads, **({"epochs": args.epochs} if args.epochs else {}))
    manifest = train(series, cfg, args.out, source=Path(args.candles).name, sha256=fingerprint(args.candles),
                     progress=not args.no_progress)
    print(json.dumps({"checkpoint": args.out, "model_version": manifest.model_version,
                      "val_loss": manifest.validation_metrics["val_loss"],
                      "best_epoch": manifest.training["best_epoch"], "minutes": manifest.training["minutes"]}))
    return 0


def _backtest(args: argparse.Namespace) -> int:
    from worker.evaluation.backtest import origin_range, run_backtest, write_forecasts_csv

    fc = _forecaster(args)
    series = load_csv(args.candles)
    horizons = parse_horizons(args.horizons) if args.horizons else None
    if horizons:
        fc = Forecaster(fc.checkpoint, scheduler=fc.scheduler, device=fc.device, horizons=horizons,
                        timeframe_ms=fc.timeframe_ms)
    origins = origin_range(series, to_ms(args.start) if args.start else None, to_ms(args.end) if args.end else None)
    result = run_backtest(fc, series, origins, symbol=args.symbol, num_samples=args.samples, num_steps=args.steps,
                          seed=args.seed, progress=True)
    rows = write_forecasts_csv(args.out, series, result)
    print(json.dumps({"out": args.out, "rows": rows, "bars_forecast": len(result.forecasts),
                      "bars_skipped": result.skipped, "horizons": [format_duration(h) for h in fc.horizons_ms]}))
    return 0


def _eval_origins(fc: Forecaster, series: CandleSeries, start: str | None, end: str | None) -> np.ndarray:
    from worker.evaluation.backtest import origin_range

    start_ms = to_ms(start) if start else to_ms(fc.checkpoint.manifest.data.validation_period[0])
    return origin_range(series, start_ms, to_ms(end) if end else None)


def _evaluate(args: argparse.Namespace) -> int:
    from worker.evaluation.report import evaluate

    fc = _forecaster(args)
    series = load_csv(args.candles)
    report = evaluate(fc, series, _eval_origins(fc, series, args.start, args.end), num_samples=args.samples,
                      num_steps=args.steps, seed=args.seed, out_dir=args.out)
    for label, entry in report["horizons"].items():
        m, e = entry["model"], entry["ewma_normal"]
        print(f"{label:>4s} n={entry['n']:5d} CRPS model={m['crps']:.3e} ewma={e['crps']:.3e} "
              f"garch_t={entry['garch_t']['crps']:.3e} ratio={entry['targets']['crps_vs_ewma']:.4f} "
              f"fair_ratio={entry['targets']['crps_fair_vs_ewma']:.4f} "
              f"cov50/80/90={m['coverage']['50']:.3f}/{m['coverage']['80']:.3f}/{m['coverage']['90']:.3f}")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from worker.evaluation.plots import compare_plot
    from worker.evaluation.report import compare_schedulers, machine

    fc = _forecaster(args)
    series = load_csv(args.candles or SHIPPED_CANDLES)
    origins = _eval_origins(fc, series, args.start, None)
    if args.origins and len(origins) > args.origins:
        origins = origins[np.linspace(0, len(origins) - 1, args.origins).astype(int)]
    rows = compare_schedulers(
        fc, series, origins, schedulers=args.schedulers.split(","),
        steps=[int(s) for s in args.step_counts.split(",")], num_samples=args.samples, seed=args.seed,
        repeats=args.repeats, out_dir=args.out,
    )
    out = Path(args.out)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "machine.json").write_text(json.dumps({**machine(), "origins": len(origins)}, indent=2) + "\n")
    compare_plot(rows, out / "compare.png", title=f"Schedulers on {len(origins)} validation bars")
    print(f"\n{'scheduler':18s} {'steps':>5s} {'nfe':>5s} {'wall_ms':>9s} {'crps':>11s} {'vs ref':>8s} {'energy':>9s}")
    for r in rows:
        print(f"{r['scheduler']:18s} {r['steps']:5d} {r['nfe']:5d} {r['wall_ms']:9.2f} {r['crps']:11.4e} "
              f"{100 * r['crps_vs_reference']:+7.2f}% {r['energy_to_reference']:9.2e}")
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from worker.dev import bench_model as bm
    from worker.evaluation.report import machine
    from worker.features.transform import ContextBatch

    fc = _forecaster(args)
    if not bm.fused_scheduler(fc.scheduler):
        raise SystemExit(f"bench-model compares the fused sampler with diffusers; --scheduler {fc.scheduler} has none")
    series = load_csv(SHIPPED_CANDLES)
    window = fc.window_bars
    rows: list[dict[str, object]] = []  # whole sample calls, one per symbol count
    components: list[dict[str, object]] = []  # network, sampler (and CUDA graph) rows

    def emit(row: dict[str, object]) -> None:
        (rows if row["component"] == "sample" else components).append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs_ms")}), flush=True)

    def contexts(n: int) -> ContextBatch:
        # n different symbols, each with its own recent window (different bars of the real series);
        # candidates the features refuse (a gappy window) are skipped, so exactly n are sampled.
        ends = np.linspace(window, len(series) - 1, 3 * n).astype(int)
        cands = fc.prepare([ForecastRequest(f"SYM{j}", series[e + 1 - window : e + 1]) for j, e in enumerate(ends)])
        batch = fc.prepare(list(cands.requests[:n]))
        if batch.contexts is None:
            raise SystemExit(f"none of the {n} windows of {SHIPPED_CANDLES.name} can be forecast")
        return batch.contexts

    net_rows = args.network_symbols * args.samples
    emit(bm.bench_network(fc.checkpoint.model, net_rows, window - 1, args.repeats, fc.device,
                          f"checkpoint {fc.model_version}"))
    if args.path_bars:
        model = bm.random_network(args.path_bars).to(fc.device)
        emit(bm.bench_network(model, net_rows, window - 1, args.repeats, fc.device,
                              f"random, {args.path_bars}-bar path"))
    if fc.device.type == "cuda":
        emit(bm.bench_graph(fc.checkpoint.model, fc.checkpoint.schedule, args.network_symbols, args.samples,
                            args.steps, args.repeats, fc.device, f"checkpoint {fc.model_version}"))
        if args.path_bars:
            emit(bm.bench_graph(model, fc.checkpoint.schedule, args.network_symbols, args.samples, args.steps,
                                args.repeats, fc.device, f"random, {args.path_bars}-bar path"))
    horizon = fc.checkpoint.network.horizon
    emit(bm.bench_sampler(fc.checkpoint.schedule, args.network_symbols, args.samples, horizon, args.steps,
                          args.repeats, fc.device))
    with torch.inference_mode():
        for n in (int(s) for s in args.symbols.split(",")):
            ctx = contexts(n)
            emit(bm.bench_sample(fc, ctx, list(range(len(ctx.origin_time))), args.samples, args.steps, args.repeats))
    doc = {"machine": machine(), "device": str(fc.device), "scheduler": fc.scheduler, "results": rows,
           "components": components}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "backtest": _backtest,
    "evaluate": _evaluate,
    "compare-schedulers": _compare,
    "bench-model": _bench_model,
}

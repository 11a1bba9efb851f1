"""Backtest throughput, today's code vs the new one, side by side (docs/benchmarks.md).

    python -m worker.dev.bench_backtest --stride 397 --repeats 3 --full --out docs/results/bench-backtest.json

* **Subset, side by side**: the five pairs' January-2024 validation month, every ``stride``-th bar
  of each pair (a fixed, documented subset, because today's code needs minutes per hundred
  forecasts on a shared 2-core machine). Rounds interleave *today's code* — the backtest as it was
  before the speed work: origins in chunks of 64, torch's intra-op threads, the diffusers
  DPM-Solver++ scheduler and the reference network (``denoise_reference``, FFT S4D kernels:
  ``bench_model.reference_forecaster``) — with the *new* backtest (fused sampler, folded network,
  default chunks, one lane per core; and, for what the lanes add, the same on one lane).
  Medians of forecasts/s, their ratio, and the largest
  difference between the two paths' forecast statistics.
* **Full month** (``--full``): every bar of the month, new path only, one run: forecasts/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.data import fx
from worker.dev.bench_model import reference_forecaster
from worker.evaluation.backtest import BacktestResult, run_backtest
from worker.evaluation.report import machine
from worker.features.candles import CandleSeries
from worker.model.forecaster import Forecast, Forecaster

TODAY_CHUNK = 64  # the backtest's batch size before the speed work


def month_origins(series: CandleSeries) -> np.ndarray:
    lo = int(np.searchsorted(series.open_time, fx.VALIDATION_START))
    hi = int(np.searchsorted(series.open_time, fx.RESERVED_FROM))
    return np.arange(lo, hi)


def _stats(f: Forecast) -> list[float]:
    return [v for h in f.horizons for v in (h.mean, h.std, *h.quantiles, h.p_up)]


def _all(fc: Forecaster, data: dict[str, CandleSeries], origins: dict[str, np.ndarray], samples: int, steps: int,
         **kw: Any) -> tuple[float, int, list[BacktestResult]]:
    results = [run_backtest(fc, data[s], origins[s], symbol=s, num_samples=samples, num_steps=steps, **kw)
               for s in data]
    wall = sum(r.wall_s for r in results)
    return wall, sum(len(r.forecasts) for r in results), results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the default model (fx-5m)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--stride", type=int, default=397, help="subset for the side-by-side rounds: every k-th bar")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds (today's, new) on the subset; 0: no subset")
    ap.add_argument("--full", action="store_true", help="also the whole month through the new path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    fc = Forecaster.load(args.checkpoint, device="cpu")
    ref = reference_forecaster(fc)
    data = fx.load_pairs(fx.PAIRS, fc.timeframe_ms)
    full = {s: month_origins(series) for s, series in data.items()}
    subset = {s: o[:: args.stride] for s, o in full.items()}
    threads = torch.get_num_threads()
    runs: dict[str, list[float]] = {"today": [], "new": [], "new_one_lane": []}
    diff = 0.0
    n_sub = 0
    load: list[float] = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            load.append(os.getloadavg()[0])
            w_old, n_old, r_old = _all(ref, data, subset, args.samples, args.steps, chunk_origins=TODAY_CHUNK,
                                       workers=1)
            w_new, n_new, r_new = _all(fc, data, subset, args.samples, args.steps)
            w_one, _, _ = _all(fc, data, subset, args.samples, args.steps, workers=1)
            runs["new_one_lane"].append(n_new / w_one)
            assert n_old == n_new
            n_sub = n_new
            runs["today"].append(n_old / w_old)
            runs["new"].append(n_new / w_new)
            for a, b in zip(r_old, r_new, strict=True):
                for fa, fb in zip(a.forecasts, b.forecasts, strict=True):
                    diff = max(diff, float(np.max(np.abs(np.subtract(_stats(fa), _stats(fb))))))
            print(json.dumps({"round": len(runs["new"]), "forecasts": n_sub, "today_per_s": round(runs["today"][-1], 2),
                              "new_per_s": round(runs["new"][-1], 2),
                              "new_one_lane_per_s": round(runs["new_one_lane"][-1], 2), "load1": load[-1]}), flush=True)
        doc: dict[str, Any] = {"machine": machine(), "model_version": fc.model_version, "samples": args.samples,
                               "steps": args.steps, "torch_threads": threads}
        if args.repeats:
            today, new = statistics.median(runs["today"]), statistics.median(runs["new"])
            one = statistics.median(runs["new_one_lane"])
            doc["subset"] = {
                "stride": args.stride, "forecasts": n_sub, "repeats": args.repeats,
                "today": {"path": "diffusers dpmpp + denoise_reference, chunks of 64, torch threads",
                          "forecasts_per_s": round(today, 3), "runs": [round(v, 3) for v in runs["today"]]},
                "new": {"path": "fused dpmpp + folded network, default chunks, one lane per core",
                        "forecasts_per_s": round(new, 3), "runs": [round(v, 3) for v in runs["new"]]},
                "new_one_lane": {"path": "fused dpmpp + folded network, default chunks, one lane, torch threads",
                                 "forecasts_per_s": round(one, 3), "runs": [round(v, 3) for v in runs["new_one_lane"]]},
                "ratio": round(new / today, 2), "ratio_one_lane": round(one / today, 2),
                "max_abs_diff_stats": float(f"{diff:.3g}"), "load1": load,
            }
            print(json.dumps(doc["subset"]), flush=True)
        if args.full:  # pair by pair, each line printed (and the JSON rewritten) as it completes
            doc["full_month"] = {"pairs": {}}
            for sym, series in data.items():
                before = os.getloadavg()[0]
                r = run_backtest(fc, series, full[sym], symbol=sym, num_samples=args.samples, num_steps=args.steps,
                                 progress=True)
                doc["full_month"]["pairs"][sym] = {
                    "forecasts": len(r.forecasts), "wall_s": round(r.wall_s, 1),
                    "forecasts_per_s": round(r.forecasts_per_s, 2), "chunk_origins": r.chunk_origins,
                    "workers": r.workers, "skipped": r.skipped, "load1": [before, os.getloadavg()[0]]}
                pairs = doc["full_month"]["pairs"]
                n, wall = sum(v["forecasts"] for v in pairs.values()), sum(v["wall_s"] for v in pairs.values())
                doc["full_month"].update({"forecasts": n, "wall_s": round(wall, 1),
                                          "forecasts_per_s": round(n / wall, 2), "complete": len(pairs) == len(data)})
                print(json.dumps({sym: pairs[sym]}), flush=True)
                _write(args.out, doc)
    _write(args.out, doc)
    return 0


def _write(out: str | None, doc: dict[str, Any]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

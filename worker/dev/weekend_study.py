"""What a forecast across the weekend close was worth: the measurement behind ``weekend_close``
(docs/quality.md, "Forecasts across the weekend close").

    python -m worker.dev.weekend_study --out docs/results/weekend_close.json

On the five pairs' validation month (January 2024), every origin of the last 4 hours before a
weekend close (Friday 13:00–17:00 New York), forecast by the default checkpoint *as if the rule were
off* (``weekend_close=False``: the shipped model's behaviour before it) and scored against what
happened — the horizon counted in bars of the stream, so the realised return runs over the weekend
into Sunday's bars. Each horizon is scored separately on the origins from which it crosses the close
and on those from which it does not; the second group is the yardstick of the same hours. Reports
the 50/90 % interval coverage and the ratio of the realised RMS return to the forecast's mean std.
There are only four weekends per pair in the month (20 weekend gaps): read the numbers as orders of
magnitude, not as calibration; ``--period training`` scores the ~21 weekends of the training months
the same way (no training path crossed a weekend). Nothing reads a bar from 2024-02-01 on
(``fx.load_pairs`` stops there).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from schemas.timeframe import format_duration
from worker.data import fx
from worker.evaluation.backtest import realised_returns, run_backtest
from worker.features.seasonal import bars_before_close, market_clock, market_hour
from worker.model.forecaster import Forecaster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="name or directory (default: the default checkpoint)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--period", choices=("validation", "training"), default="validation",
                   help="January 2024 (default), or the training months (their weekend paths were never "
                        "trained on: training drops every path with a gap)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    fc = Forecaster.load(args.checkpoint, device="cpu", weekend_close=False)
    bars = fc.horizon_bars()
    horizon = max(bars)
    started = time.perf_counter()
    pooled: dict[str, dict[str, list[np.ndarray]]] = {}
    weekends = 0
    lo, hi = (fx.VALIDATION_START, fx.RESERVED_FROM) if args.period == "validation" else (0, fx.TRAIN_END)
    for pair, series in fx.load_pairs(end_ms=hi).items():
        t = series.open_time
        clock, hour = market_clock(t, fc.timeframe_ms), market_hour(t)
        # Session weekday 4 runs Thursday 17:00 -> Friday 17:00 New York: its hours 13-16 are Friday's.
        friday = (clock.weekday == 4) & (hour >= 13) & (hour < 17) & (t >= lo)
        idx = np.flatnonzero(friday)
        idx = idx[(idx >= fc.window_bars) & (idx + horizon < len(series))]  # history before, the path after
        weekends += len(np.unique(t[idx] // 86_400_000))
        bt = run_backtest(fc, series, idx, symbol=pair, num_samples=args.samples, num_steps=args.steps, seed=0,
                          keep_samples=True)
        assert bt.samples is not None
        y = realised_returns(series, bt.origins, bars)
        before = bars_before_close(t[bt.origins], fc.timeframe_ms, horizon)
        for k, b in enumerate(bars):
            crosses = before < b
            q = np.quantile(bt.samples[:, :, k], [0.05, 0.25, 0.75, 0.95], axis=1).T  # (N, 4)
            std = bt.samples[:, :, k].std(axis=1)
            for group, mask in (("crosses the close", crosses), ("ends before the close", ~crosses)):
                slot = pooled.setdefault(f"{format_duration(fc.horizons_ms[k])}|{group}", {})
                for name, value in (("y", y[mask, k]), ("q", q[mask]), ("std", std[mask])):
                    slot.setdefault(name, []).append(value)
    rows: list[dict[str, Any]] = []
    for key, parts in pooled.items():
        label, group = key.split("|")
        y, q, std = (np.concatenate(parts[n]) for n in ("y", "q", "std"))
        ok = np.isfinite(y)
        y, q, std = y[ok], q[ok], std[ok]
        if not len(y):
            continue
        rows.append({
            "horizon": label, "origins": group, "n": len(y),
            "coverage_50": float(np.mean((q[:, 1] <= y) & (y <= q[:, 2]))),
            "coverage_90": float(np.mean((q[:, 0] <= y) & (y <= q[:, 3]))),
            "realised_rms_over_forecast_std": float(np.sqrt(np.mean(y ** 2)) / np.mean(std)),
        })
    report = {
        "command": "python -m worker.dev.weekend_study" + (" " + " ".join(argv) if argv else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "model_version": fc.model_version, "samples": args.samples, "steps": args.steps,
        "period": ("2024-01" if args.period == "validation" else "2023-08..2023-12 (training months)")
        + ", Fridays 13:00-17:00 New York", "pair_weekends": weekends,
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

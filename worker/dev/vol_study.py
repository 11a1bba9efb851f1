"""What two more volatility inputs would be worth to the 5-minute model, measured before building
them in (docs/quality.md, "Why not 3 % better").

    python -m worker.dev.vol_study --out out/vol-study.json

The default checkpoint samples its seasonal range-EWMA forecast plus what the network learned, so
the most an input can add shows as a sharper *exact-Normal* seasonal forecast (no sampling, no
network). On every origin of the five pairs' validation month whose 4-hour path has no gap, this
scores, pooled, per horizon, pinball against the seasonal EWMA (Andersen–Bollerslev, the issue's
yardstick) with a 90 % day-block bootstrap interval, and 90 % coverage:

* ``range``: the checkpoint's own seasonal range EWMA (per-season profile, its λ, lookback, bias);
* ``cross-pair w``: the same, with each pair's volatility *surprise* — log(fast EWMA / slow EWMA
  level) — shrunk toward the surprise of all pairs at that bar by weight ``w``: the five pairs share
  the US dollar, so one pair's few noisy bars are evidence about all of them;
* ``weekday``: the profile multiplied by a weekday × New York hour factor fitted on training bars
  (e.g. Friday's 08:30 payrolls, the quiet Friday evening), redistributing each hour across weekdays;
* both together.

Everything is fitted on training bars or is an EWMA of past bars; nothing reads a bar from
2024-02-01 on (``fx.load_pairs`` stops there).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from worker.features.candles import CandleSeries
from worker.features.seasonal import (
    SeasonalProfile,
    adjacent,
    deseasonalised_range,
    finite_ewma,
    market_clock,
    market_hour,
    market_time_ms,
    vol_returns,
)

SLOW_LOOKBACK = 288 * 3  # bars: three trading days
SLOW_LAMBDA = 0.999  # the slow level's decay (a half-life of ~2.4 days of bars)
CROSS_PAIR_WEIGHTS = (0.25, 0.5, 0.75)
MIN_BARS_PER_CELL = 200  # a weekday × hour cell keeps factor 1 with fewer training bars (pooled)
_FLOOR = 1e-12


def market_surprise(surprise: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per symbol, at each of its bars: the mean surprise of all symbols that have a finite one at
    the same open time (the symbol's own included). ``surprise``: symbol -> (open_time, surprise)."""
    times = np.unique(np.concatenate([t for t, _ in surprise.values()]))
    total, count = np.zeros(len(times)), np.zeros(len(times))
    for t, s in surprise.values():
        at, ok = np.searchsorted(times, t), np.isfinite(s)
        np.add.at(total, at[ok], s[ok])
        np.add.at(count, at[ok], 1.0)
    mean = np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
    return {sym: mean[np.searchsorted(times, t)] for sym, (t, _) in surprise.items()}


def cross_pair_variance(fast: np.ndarray, slow: np.ndarray, market: np.ndarray, weight: float) -> np.ndarray:
    """``slow · exp((1 − w) · log(fast / slow) + w · market)``: the pair's own surprise shrunk toward
    the market's; ``w = 0`` is the pair's own EWMA."""
    own = np.log(np.maximum(fast, _FLOOR) / np.maximum(slow, _FLOOR))
    out: np.ndarray = np.maximum(slow, _FLOOR) * np.exp((1.0 - weight) * own + weight * market)
    return out


def weekday_hour_factors(series: Mapping[str, CandleSeries], profile: SeasonalProfile, end_ms: int) -> np.ndarray:
    """(7, 24) factors, weekday of the trading day × New York hour, from bars before ``end_ms``: the
    mean deseasonalised |return| of the cell over that of its hour on all weekdays (each pair
    divided by its own mean first), so each hour's factors average 1 over its bars; cells with
    fewer than ``MIN_BARS_PER_CELL`` bars keep 1."""
    tf = profile.timeframe_ms
    total, count = np.zeros((7, 24)), np.zeros((7, 24))
    for s in series.values():
        u = np.abs(vol_returns(s, tf) / profile.scale(s.open_time))
        keep = (s.open_time < end_ms) & adjacent(s.open_time, tf) & np.isfinite(u)
        if not keep.any():
            continue
        day, hour = market_clock(s.open_time, tf).weekday, market_hour(s.open_time)
        np.add.at(total, (day[keep], hour[keep]), u[keep] / u[keep].mean())
        np.add.at(count, (day[keep], hour[keep]), 1.0)
    hour_mean = total.sum(axis=0) / np.maximum(count.sum(axis=0), 1.0)
    cell = np.where(count >= MIN_BARS_PER_CELL, total / np.maximum(count, 1.0), hour_mean[None, :])
    out: np.ndarray = cell / np.where(hour_mean > 0, hour_mean, 1.0)[None, :]
    return out


def run(out_path: str | None) -> dict[str, Any]:
    from schemas.timeframe import format_duration
    from worker.data import fx
    from worker.evaluation.backtest import realised_returns
    from worker.evaluation.report import (
        SEASONAL_EWMA_LAMBDA,
        SEASONAL_EWMA_LOOKBACK,
        day_block_ratio,
        machine,
        row_pinball,
        seasonal_baselines,
    )
    from worker.features.transform import path_is_contiguous
    from worker.model.forecaster import Forecaster
    from worker.scoring.baselines import BaselineForecast, seasonal_ewma_normal
    from worker.scoring.rules import QUANTILE_LEVELS, coverage

    fc = Forecaster.load()
    spec = fc.checkpoint.spec
    if spec.profile is None or spec.vol_estimator != "range":
        raise SystemExit("vol_study needs a range-scaled checkpoint with a profile (the default fx-5m)")
    profile, bars, tf = spec.profile, fc.horizon_bars(), spec.timeframe_ms
    horizon, steps = max(bars), tf * np.arange(1, max(bars) + 1)
    data = fx.load_pairs()
    factors = weekday_hour_factors(data, profile, fx.TRAIN_END)

    def wd(times: np.ndarray) -> np.ndarray:
        factor: np.ndarray = factors[market_clock(times, tf).weekday, market_hour(times)]
        return factor

    x = {sym: deseasonalised_range(s, profile.scale(s.open_time), spec.range_bias) for sym, s in data.items()}
    xw = {sym: x[sym] / wd(s.open_time) ** 2 for sym, s in data.items()}

    def ewmas(src: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        fast = {k: np.maximum(finite_ewma(v, spec.vol_lookback, spec.vol_lambda), _FLOOR) for k, v in src.items()}
        slow = {k: np.maximum(finite_ewma(v, SLOW_LOOKBACK, SLOW_LAMBDA), _FLOOR) for k, v in src.items()}
        market = market_surprise({k: (data[k].open_time, np.log(fast[k] / slow[k])) for k in src})
        return fast, slow, market

    fast, slow, market = ewmas(x)
    fast_w, slow_w, market_w = ewmas(xw)
    rows: dict[str, tuple[dict[str, BaselineForecast], np.ndarray, np.ndarray]] = {}
    for sym, s in data.items():
        idx = np.arange(int(np.searchsorted(s.open_time, fx.VALIDATION_START)),
                        int(np.searchsorted(s.open_time, fx.RESERVED_FROM)))
        o = idx[path_is_contiguous(s, idx, horizon, tf)]
        garch_end = max(int(np.searchsorted(s.open_time, fx.VALIDATION_START)) - 1, 250)
        base = seasonal_baselines(s, o, bars, profile, SEASONAL_EWMA_LOOKBACK, SEASONAL_EWMA_LAMBDA, garch_end,
                                  range_ewma=(spec.vol_lookback, spec.vol_lambda, spec.range_bias))
        future = (s.open_time[o][:, None] + steps[None, :]).ravel()
        mult = profile.scale(future).reshape(len(o), -1)
        mult_w = mult * wd(future).reshape(len(o), -1)
        fcs = {"seasonal EWMA (A-B)": base["seasonal_ewma"], "range": base["seasonal_range_ewma"]}
        for w in CROSS_PAIR_WEIGHTS:
            fcs[f"cross-pair w={w}"] = seasonal_ewma_normal(
                cross_pair_variance(fast[sym][o], slow[sym][o], market[sym][o], w), mult, bars)
        fcs["weekday"] = seasonal_ewma_normal(fast_w[sym][o], mult_w, bars)
        fcs["weekday + cross-pair w=0.5"] = seasonal_ewma_normal(
            cross_pair_variance(fast_w[sym][o], slow_w[sym][o], market_w[sym][o], 0.5), mult_w, bars)
        day = market_time_ms(s.open_time[o]) // 86_400_000
        rows[sym] = (fcs, realised_returns(s, o, bars), day)

    names = list(next(iter(rows.values()))[0])
    table: dict[str, Any] = {}
    for k, b in enumerate(bars):
        quantiles: dict[str, list[np.ndarray]] = {n: [] for n in names}
        ys, days = [], []
        for fcs, y, day in rows.values():
            ok = np.isfinite(y[:, k])
            for f in fcs.values():
                ok &= f.valid[:, k]
            ys.append(y[ok, k])
            days.append(day[ok])
            for n, f in fcs.items():
                quantiles[n].append(f.select(np.flatnonzero(ok)).quantiles(QUANTILE_LEVELS)[:, k])
        yk, d = np.concatenate(ys), np.concatenate(days)
        q = {n: np.concatenate(v) for n, v in quantiles.items()}
        base_loss = row_pinball(q[names[0]], yk)
        label = format_duration(b * tf)
        table[label] = {"n": len(d), **{n: {"pinball_ratio": day_block_ratio(row_pinball(q[n], yk), base_loss, d),
                                            "coverage90": coverage(q[n][:, 0], q[n][:, -1], yk)}
                                        for n in names[1:]}}
    report = {"machine": machine(), "model_version": fc.model_version, "period": "2024-01 (validation)",
              "slow_ewma": {"lookback": SLOW_LOOKBACK, "lambda": SLOW_LAMBDA}, "horizons": table}
    for label, entry in table.items():
        print(f"{label} (n={entry['n']}): pinball / seasonal EWMA [90 % CI], 90 % coverage")
        for n in names[1:]:
            r = entry[n]["pinball_ratio"]
            print(f"  {n:28s} {r['ratio']:.4f} [{r['ci90'][0]:.4f}, {r['ci90'][1]:.4f}]  {entry[n]['coverage90']:.3f}")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.dev.vol_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the report as JSON here")
    run(p.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

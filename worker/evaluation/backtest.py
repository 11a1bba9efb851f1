"""Backtest: forecasts for every bar of a candle file, through the live worker's batched path
(``Forecaster.prepare`` + ``Forecaster.run``; each origin sees only candles up to itself)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worker.features.candles import CandleSeries, iso
from worker.model.forecaster import Forecast, Forecaster, ForecastRequest
from worker.model.summary import QUANTILE_KEYS

CSV_COLUMNS = ("time", "horizon_minutes", "close", "mean", "std", *QUANTILE_KEYS, "p_up")


@dataclass(frozen=True)
class BacktestResult:
    origins: np.ndarray  # (N,) indices into the series of the bars that were forecast
    forecasts: list[Forecast]
    samples: np.ndarray | None  # (N, S, K) cumulative log returns, when kept
    skipped: dict[str, int]  # reason -> bars not forecast


def origin_range(series: CandleSeries, start_ms: int | None, end_ms: int | None) -> np.ndarray:
    lo = 0 if start_ms is None else int(np.searchsorted(series.open_time, start_ms))
    hi = len(series) if end_ms is None else int(np.searchsorted(series.open_time, end_ms))
    return np.arange(lo, hi)


def run_backtest(
    forecaster: Forecaster,
    series: CandleSeries,
    origins: Sequence[int] | np.ndarray,
    *,
    symbol: str = "SERIES",
    num_samples: int = 64,
    num_steps: int = 10,
    seed: int = 0,
    horizons: Sequence[int] | None = None,
    batch_size: int = 64,
    keep_samples: bool = False,
    progress: bool = False,
) -> BacktestResult:
    window = forecaster.window_bars
    done_idx: list[int] = []
    forecasts: list[Forecast] = []
    chunks: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    origins = np.asarray(origins, dtype=np.int64)
    for start in tqdm(range(0, len(origins), batch_size), desc="backtest", unit="batch", disable=not progress):
        idx = origins[start : start + batch_size]
        requests = [ForecastRequest(symbol, series[max(0, i + 1 - window) : i + 1]) for i in idx]
        batch = forecaster.prepare(requests)
        for err in batch.rejected.values():
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
        kept = [int(i) for j, i in enumerate(idx) if j not in batch.rejected]
        out, samples = forecaster.run_with_samples(
            batch, num_samples=num_samples, num_steps=num_steps, seed=seed, horizons=horizons,
            keep_samples=keep_samples,
        )
        done_idx.extend(kept)
        forecasts.extend(out)
        if samples is not None:
            chunks.append(samples)
    return BacktestResult(
        origins=np.asarray(done_idx, dtype=np.int64),
        forecasts=forecasts,
        samples=np.concatenate(chunks) if chunks else None,
        skipped=skipped,
    )


def write_forecasts_csv(path: str | Path, series: CandleSeries, result: BacktestResult) -> int:
    """One row per forecast-origin bar and horizon; returns the number of rows."""
    rows = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # `--out out/forecasts.csv` on a fresh clone
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for f in result.forecasts:
            for h in f.horizons:
                writer.writerow([
                    iso(f.open_time), h.horizon_minutes, repr(f.close), f"{h.mean:.8g}", f"{h.std:.8g}",
                    *(f"{q:.8g}" for q in h.quantiles), f"{h.p_up:.6g}",
                ])
                rows += 1
    return rows


def realised_returns(series: CandleSeries, origins: np.ndarray, bars: Sequence[int]) -> np.ndarray:
    """(N, K) log return from each origin's close h bars of the stream ahead; NaN past the end."""
    logc = np.log(series.close)
    out = np.full((len(origins), len(bars)), np.nan)
    for k, b in enumerate(bars):
        ok = origins + b < len(series)
        out[ok, k] = logc[origins[ok] + b] - logc[origins[ok]]
    return out

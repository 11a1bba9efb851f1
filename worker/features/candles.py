"""Candle series as plain arrays, and CSV loading for both accepted formats."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.timeframe import format_duration

COLUMNS = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class CandleSeries:
    """Closed candles of one symbol, sorted by ``open_time`` (ms since the epoch, UTC)."""

    open_time: np.ndarray  # int64 (n,)
    ohlcv: np.ndarray  # float64 (n, 5)

    def __post_init__(self) -> None:
        if self.open_time.ndim != 1 or self.ohlcv.shape != (len(self.open_time), 5):
            raise ValueError(f"shape mismatch: open_time {self.open_time.shape}, ohlcv {self.ohlcv.shape}")

    def __len__(self) -> int:
        return len(self.open_time)

    @property
    def close(self) -> np.ndarray:
        return self.ohlcv[:, 3]

    def upto(self, open_time: int) -> CandleSeries:
        """The candles with ``open_time <= open_time`` (drops bars newer than a forecast origin)."""
        end = int(np.searchsorted(self.open_time, open_time, side="right"))
        return self[:end]

    def __getitem__(self, index: slice) -> CandleSeries:
        return CandleSeries(self.open_time[index], self.ohlcv[index])

    def defect(self, timeframe_ms: int | None = None) -> str | None:
        """What makes these candles unusable as model input, or None: prices that are not finite
        and positive, a high under the open, close or low (or a low over them), a volume that is
        negative or not finite, open times that do not strictly increase; with ``timeframe_ms``, an
        open time off that timeframe's grid (the record contract's alignment rule, which also
        catches bars of a finer timeframe). The live intake refuses such candles by the record
        contract; this is the same guard for candles given directly (the Python API, a CSV for the
        backtest), where they once became a forecast from a zero or infinite price, one from a
        window in the wrong order, or — one-minute bars given to the 5-minute model — a forecast
        that looked normal."""
        t, v = self.open_time, self.ohlcv
        o, h, low, c, vol = v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4]
        checks = (
            (~(np.isfinite(v[:, :4]) & (v[:, :4] > 0)).all(axis=1), "a price that is not finite and positive"),
            ((h < np.maximum(o, c)) | (low > np.minimum(o, c)) | (h < low), "high/low inconsistent with open/close"),
            (~np.isfinite(vol) | (vol < 0), "a volume that is negative or not finite"),
        )
        for bad, what in checks:
            if bad.any():
                i = int(np.argmax(bad))
                fields = ", ".join(f"{name} {float(x)!r}" for name, x in zip(COLUMNS, v[i], strict=True))
                return f"bar {iso(int(t[i]))} has {what} ({fields})"
        order = np.diff(t) <= 0
        if order.any():
            i = int(np.argmax(order))
            return f"open times do not strictly increase: {iso(int(t[i]))} then {iso(int(t[i + 1]))}"
        if timeframe_ms:
            off = t % timeframe_ms
            if off.any():
                i = int(np.argmax(off != 0))
                return (f"bar {iso(int(t[i]))} does not open on the {format_duration(timeframe_ms)} grid (off by "
                        f"{int(off[i])} ms; bars open at multiples of the timeframe since 1970-01-01 UTC, as "
                        f"the record contract requires): these are not {format_duration(timeframe_ms)} bars")
        return None

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float]]) -> CandleSeries:
        """Rows of ``(open_time, open, high, low, close, volume)``."""
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
        order = np.argsort(arr[:, 0], kind="stable")
        arr = arr[order]
        return cls(arr[:, 0].astype(np.int64), np.ascontiguousarray(arr[:, 1:]))


def _parse_time(text: str) -> int:
    text = text.strip()
    if len(text) >= 19 and text[2] == "." and text[5] == ".":  # dd.mm.yyyy HH:MM:SS(.fff), the shared file
        stamp = dt.datetime.strptime(text[:19], "%d.%m.%Y %H:%M:%S").replace(tzinfo=dt.UTC)
    else:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp() * 1000)


def load_csv(path: str | Path) -> CandleSeries:
    """Read ``time,open,high,low,close,volume`` (ISO-8601 UTC) or the shared ``Time,Open,...`` file."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader)]
        try:
            idx = [header.index(c) for c in ("time", *COLUMNS)]
        except ValueError:
            raise ValueError(f"{path}: header must contain time,open,high,low,close,volume; got {header}") from None
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            try:
                stamp, values = _parse_time(rec[idx[0]]), [float(rec[i]) for i in idx[1:]]
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            if not all(math.isfinite(v) and v > 0 for v in values[:4]):
                raise ValueError(f"{path}:{lineno}: prices must be finite and positive, got {values[:4]}")
            if not (math.isfinite(values[4]) and values[4] >= 0):
                raise ValueError(f"{path}:{lineno}: volume must be finite and >= 0, got {values[4]}")
            rows.append([stamp, *values])
    series = CandleSeries.from_rows(rows)
    if len(np.unique(series.open_time)) != len(series):
        raise ValueError(f"{path}: duplicate timestamps")
    return series


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_ms(text: str) -> int:
    return _parse_time(text)


def fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

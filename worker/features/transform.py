"""The one feature function used by training, backtest and the live worker.

Every feature at bar ``t`` is a function of bars ``t - vol_lookback .. t`` only (finite memory), so
computing features over a whole year or over a 256-bar Redis window gives identical values for the
bars both cover. That is what removes train/serve skew: nobody re-implements the features, and the
window the worker keeps only has to be ``context_bars + vol_lookback`` long.

Bars are counted in stream (trading) time. Gaps are never filled: a bar after a gap gets a real
return from the previous real close, plus an explicit count of the bars missing before it. FX
weekend closures are not missing bars.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.errors import InsufficientHistory
from worker.features.candles import CandleSeries

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
WEEKEND_CLOSURE_MS = 48 * 3_600_000
# 1970-01-01 was a Thursday; shift so that day 0 of the week is Monday.
_EPOCH_WEEKDAY = 3

BAR_FEATURES = (
    "ret",  # log close / previous close, in units of the origin's volatility
    "open_gap",  # log open / previous close
    "high_rel",  # log high / open
    "low_rel",  # log low / open
    "log_vol",  # log of the EWMA volatility estimate at this bar
    "ret_z",  # return / volatility estimate of the previous bar
    "missing",  # log1p(bars missing before this one, weekends excepted)
)
TIME_FEATURES = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")
_SCALED_BY_ORIGIN_VOL = slice(0, 4)
_VOL_FLOOR = 1e-6


@dataclass(frozen=True)
class FeatureSpec:
    timeframe_ms: int
    context_bars: int = 64
    vol_lookback: int = 64
    vol_lambda: float = 0.94
    max_missing_fraction: float = 0.1

    @property
    def window_bars(self) -> int:
        """Bars of history one forecast needs."""
        return self.context_bars + self.vol_lookback + 1


@dataclass(frozen=True)
class Normalization:
    """Standardisation statistics fitted on the training period; stored in the checkpoint."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float


def time_features(open_time: np.ndarray) -> np.ndarray:
    """Time-of-day and day-of-week on the unit circle, (n, 4) float32."""
    t = open_time.astype(np.int64)
    tod = 2 * np.pi * (t % DAY_MS) / DAY_MS
    dow = 2 * np.pi * (((t // DAY_MS) + _EPOCH_WEEKDAY) % 7) / 7
    return np.stack([np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)], axis=1).astype(np.float32)


def missing_bars(open_time: np.ndarray, timeframe_ms: int) -> np.ndarray:
    """Bars missing before each bar (0 for the first). A gap spanning a whole Saturday is a weekend
    and its 48 h closure does not count as missing."""
    out = np.zeros(len(open_time), dtype=np.int64)
    if len(open_time) < 2:
        return out
    delta = np.diff(open_time)
    gap = delta // timeframe_ms - 1
    # Saturday 00:00 UTC of the week containing the gap's start: weekday index 5.
    start = open_time[:-1]
    day = (start // DAY_MS + _EPOCH_WEEKDAY) % 7
    saturday = (start // DAY_MS + (5 - day) % 7) * DAY_MS
    weekend = (saturday >= start) & (saturday + DAY_MS <= open_time[1:])
    gap = np.where(weekend, gap - WEEKEND_CLOSURE_MS // timeframe_ms, gap)
    out[1:] = np.maximum(gap, 0)
    return out


def _ewma_vol(ret: np.ndarray, lookback: int, lam: float) -> np.ndarray:
    """Finite-memory EWMA volatility: bar t uses returns t-lookback+1..t only. NaN before that."""
    n = len(ret)
    out = np.full(n, np.nan)
    if n < lookback:
        return out
    weights = lam ** np.arange(lookback)[::-1]
    weights /= weights.sum()
    sq = np.lib.stride_tricks.sliding_window_view(ret**2, lookback)
    out[lookback - 1 :] = np.sqrt(sq @ weights)
    return np.maximum(out, _VOL_FLOOR)


def compute_features(series: CandleSeries, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-bar features (n, len(BAR_FEATURES)) and volatility (n,). Rows without enough history are NaN."""
    o, h, low, c = (series.ohlcv[:, i] for i in range(4))
    n = len(series)
    prev_c = np.empty(n)
    prev_c[0] = np.nan
    prev_c[1:] = c[:-1]
    ret = np.log(c / prev_c)
    ret[0] = np.nan
    vol = _ewma_vol(np.nan_to_num(ret[1:], nan=0.0), spec.vol_lookback, spec.vol_lambda)
    vol = np.concatenate([[np.nan], vol])
    prev_vol = np.concatenate([[np.nan], vol[:-1]])
    feats = np.stack(
        [
            ret,
            np.log(o / prev_c),
            np.log(h / o),
            np.log(low / o),
            np.log(vol),
            ret / prev_vol,
            np.log1p(missing_bars(series.open_time, spec.timeframe_ms)),
        ],
        axis=1,
    )
    return feats, vol


@dataclass(frozen=True)
class ContextBatch:
    """Model inputs for a set of forecast origins (all float32)."""

    bar_features: np.ndarray  # (B, L, F) normalised
    context_time: np.ndarray  # (B, L, 4)
    future_time: np.ndarray  # (B, H, 4), nominal bar times origin + k * timeframe
    origin_vol: np.ndarray  # (B,) float64, volatility at the origin (return units)
    origin_close: np.ndarray  # (B,) float64
    origin_time: np.ndarray  # (B,) int64


def origin_ok(series: CandleSeries, index: int, spec: FeatureSpec) -> str | None:
    """Why the bar at ``index`` cannot be a forecast origin, or None if it can."""
    if index + 1 < spec.window_bars:
        return "insufficient_history"
    window = series.open_time[index + 1 - spec.window_bars : index + 1]
    missing = int(missing_bars(window, spec.timeframe_ms)[1:].sum())
    if missing > spec.max_missing_fraction * spec.window_bars:
        return "too_many_missing_bars"
    return None


def build_contexts(
    series: CandleSeries,
    origins: np.ndarray,
    spec: FeatureSpec,
    norm: Normalization,
    horizon: int,
    features: tuple[np.ndarray, np.ndarray] | None = None,
) -> ContextBatch:
    """Contexts for the given origin indices. ``features`` may be passed to reuse one computation."""
    feats, vol = features if features is not None else compute_features(series, spec)
    length = spec.context_bars
    idx = origins[:, None] + np.arange(1 - length, 1)[None, :]
    if (idx < 0).any():
        raise InsufficientHistory("insufficient_history", f"need {spec.window_bars} bars")
    x = feats[idx].copy()  # (B, L, F)
    ovol = vol[origins]
    if not np.isfinite(x).all() or not np.isfinite(ovol).all():
        raise InsufficientHistory("insufficient_history", f"need {spec.window_bars} bars of valid history")
    x[:, :, _SCALED_BY_ORIGIN_VOL] /= ovol[:, None, None]
    x = (x - norm.feature_mean) / norm.feature_std
    otime = series.open_time[origins]
    future = otime[:, None] + spec.timeframe_ms * np.arange(1, horizon + 1)[None, :]
    return ContextBatch(
        bar_features=x.astype(np.float32),
        context_time=time_features(series.open_time[idx].ravel()).reshape(len(origins), length, 4),
        future_time=time_features(future.ravel()).reshape(len(origins), horizon, 4),
        origin_vol=ovol.astype(np.float64),
        origin_close=series.close[origins].astype(np.float64),
        origin_time=otime.astype(np.int64),
    )


def future_targets(series: CandleSeries, origins: np.ndarray, horizon: int, vol: np.ndarray) -> np.ndarray:
    """Next ``horizon`` log returns after each origin, in units of the origin's volatility (B, H)."""
    logc = np.log(series.close)
    idx = origins[:, None] + np.arange(0, horizon + 1)[None, :]
    path = np.diff(logc[idx], axis=1)
    return path / vol[origins][:, None]


def fit_normalization(
    series: CandleSeries, origins: np.ndarray, spec: FeatureSpec, horizon: int
) -> Normalization:
    """Statistics of the features as the model sees them (origin-vol scaled), on training origins only."""
    feats, vol = compute_features(series, spec)
    ident = Normalization(np.zeros(len(BAR_FEATURES)), np.ones(len(BAR_FEATURES)), 0.0, 1.0)
    ctx = build_contexts(series, origins, spec, ident, horizon, (feats, vol))
    flat = ctx.bar_features.reshape(-1, len(BAR_FEATURES)).astype(np.float64)
    std = flat.std(axis=0)
    std[std < 1e-8] = 1.0  # a constant feature (no gaps in the training data) must not blow up
    target = future_targets(series, origins, horizon, vol)
    return Normalization(flat.mean(axis=0), std, float(target.mean()), float(target.std()))

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from worker.errors import InsufficientHistory
from worker.features.candles import CandleSeries
from worker.features.seasonal import (
    VOL_ESTIMATORS,
    SeasonalProfile,
    deseasonalised_variance,
    market_time_features,
    vol_returns,
)

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
# The 5-minute feature set: everything in units of the *seasonal* volatility forecast (the
# deseasonalised EWMA of the previous bar times this bar's intraday multiplier, see
# features/seasonal.py), so a model that outputs N(0, 1) per future bar is the seasonal-EWMA
# baseline and training learns only what that baseline misses.
SEASONAL_BAR_FEATURES = (
    "ret_z",  # one-bar return (open-to-close after a gap) / seasonal vol forecast
    "range_z",  # log high / low / seasonal vol forecast (a sharper volatility signal than |ret|)
    "gap_z",  # log open / previous close / seasonal vol forecast (the weekend or holiday gap)
    "log_vol_rel",  # log deseasonalised EWMA vol relative to the origin's
    "missing",  # log1p(bars missing before this one, weekends excepted)
    "stale",  # 1 when high == low (no price change within the bar, typical late evening)
    "log_season",  # log intraday multiplier of this bar's slot
)
SEASONAL_TIME_FEATURES = ("tod_sin", "tod_cos", "dow_sin", "dow_cos", "log_season")  # New York clock
FEATURE_SETS = {"ohlc_ewma": BAR_FEATURES, "seasonal": SEASONAL_BAR_FEATURES}
TIME_FEATURE_SETS = {"ohlc_ewma": TIME_FEATURES, "seasonal": SEASONAL_TIME_FEATURES}
_Z_CLIP = 20.0  # event bars: large but bounded inputs and targets
_SCALED_BY_ORIGIN_VOL = slice(0, 4)
_VOL_FLOOR = 1e-6


@dataclass(frozen=True)
class FeatureSpec:
    timeframe_ms: int
    context_bars: int = 64
    vol_lookback: int = 64
    vol_lambda: float = 0.94
    max_missing_fraction: float = 0.1
    feature_set: str = "ohlc_ewma"  # "ohlc_ewma" (format-1 checkpoints) or "seasonal"
    profile: SeasonalProfile | None = None  # required by "seasonal"
    vol_estimator: str = "returns"  # "seasonal" only: "returns" or "range" (features/seasonal.py)
    range_bias: float = 1.0  # "range": Parkinson -> return variance, fitted on training data

    def __post_init__(self) -> None:
        if self.vol_estimator not in VOL_ESTIMATORS:
            raise ValueError(f"unknown volatility estimator {self.vol_estimator!r}; choose one of "
                             f"{list(VOL_ESTIMATORS)}")
        if self.vol_estimator != "returns" and self.feature_set != "seasonal":
            raise ValueError("only the seasonal feature set has a choice of volatility estimator")
        if not (np.isfinite(self.range_bias) and self.range_bias > 0):
            raise ValueError(f"range_bias must be finite and positive, got {self.range_bias}")
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"unknown feature set {self.feature_set!r}; choose one of {sorted(FEATURE_SETS)}")
        if self.feature_set == "seasonal" and (self.profile is None or self.profile.timeframe_ms != self.timeframe_ms):
            raise ValueError("the seasonal feature set needs a profile fitted for this timeframe")

    @property
    def bar_feature_names(self) -> tuple[str, ...]:
        return FEATURE_SETS[self.feature_set]

    @property
    def time_feature_names(self) -> tuple[str, ...]:
        return TIME_FEATURE_SETS[self.feature_set]

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
    """Per-bar features (n, len(spec.bar_feature_names)) and volatility (n,). Rows without enough
    history are NaN. For the seasonal set the volatility is the deseasonalised EWMA vol."""
    if spec.feature_set == "seasonal":
        return _seasonal_features(series, spec)
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


def _seasonal_features(series: CandleSeries, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    assert spec.profile is not None
    o, h, low, c = (series.ohlcv[:, i] for i in range(4))
    s, var = deseasonalised_variance(series, spec.profile, spec.vol_lookback, spec.vol_lambda,
                                     estimator=spec.vol_estimator, range_bias=spec.range_bias)
    vol = np.sqrt(var)
    prev_vol = np.concatenate([[np.nan], vol[:-1]])
    scale = prev_vol * s  # the seasonal forecast of this bar's volatility, made at the bar before
    prev_c = np.concatenate([[np.nan], c[:-1]])
    feats = np.stack(
        [
            np.clip(vol_returns(series, spec.timeframe_ms) / scale, -_Z_CLIP, _Z_CLIP),
            np.clip(np.log(h / low) / scale, 0.0, _Z_CLIP),
            np.clip(np.log(o / prev_c) / scale, -_Z_CLIP, _Z_CLIP),
            np.log(vol),
            np.log1p(missing_bars(series.open_time, spec.timeframe_ms)).astype(np.float64),
            (h == low).astype(np.float64),
            np.log(s),
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
    # (B, H) float64: model output units -> log-return units per future bar: the origin's vol for
    # every bar (ohlc_ewma), origin vol x each future bar's multiplier (seasonal). Always set, so
    # every field slices and concatenates alike (the engine's half-batch retry slices them all).
    future_scale: np.ndarray | None = None


def origin_ok(series: CandleSeries, index: int, spec: FeatureSpec) -> str | None:
    """Why the bar at ``index`` cannot be a forecast origin, or None if it can."""
    if index + 1 < spec.window_bars:
        return "insufficient_history"
    window = series.open_time[index + 1 - spec.window_bars : index + 1]
    missing = int(missing_bars(window, spec.timeframe_ms)[1:].sum())
    if missing > spec.max_missing_fraction * spec.window_bars:
        return "too_many_missing_bars"
    return None


def missing_spans(open_time: np.ndarray, timeframe_ms: int) -> list[tuple[int, int, int]]:
    """(first missing bar time, last missing bar time, count) of each gap that counts as missing."""
    miss = missing_bars(open_time, timeframe_ms)
    spans = []
    for i in np.flatnonzero(miss):
        n = int(miss[i])
        last = int(open_time[i]) - timeframe_ms
        spans.append((last - (n - 1) * timeframe_ms, last, n))
    return spans


def latest_valid_origin(series: CandleSeries, spec: FeatureSpec, before: int | None = None,
                        usable: Callable[[int], bool] | None = None) -> int | None:
    """Index of the newest bar (before index ``before``) that can be a forecast origin, or None.
    ``usable``: the caller's own condition on an index besides the window's (the forecaster's: a
    horizon is left before the weekend close)."""
    end = len(series) if before is None else before
    for i in range(end - 1, spec.window_bars - 2, -1):
        if origin_ok(series, i, spec) is None and (usable is None or usable(i)):
            return i
    return None


def explain_origin(series: CandleSeries, index: int, spec: FeatureSpec, symbol: str,
                   usable: Callable[[int], bool] | None = None) -> str:
    """Why bar ``index`` cannot be an origin, naming the missing bars and an origin that works
    (one that also passes ``usable``, see :func:`latest_valid_origin`)."""
    from worker.features.candles import iso

    why = origin_ok(series, index, spec)
    if why == "insufficient_history":
        return (f"{symbol}: {index + 1} bars up to {iso(int(series.open_time[index]))}, need {spec.window_bars} "
                f"(context {spec.context_bars} + volatility lookback {spec.vol_lookback} + 1)")
    window = series.open_time[index + 1 - spec.window_bars : index + 1]
    spans = missing_spans(window, spec.timeframe_ms)
    total = sum(n for _, _, n in spans)
    shown = ", ".join(f"{iso(a)}..{iso(b)} ({n} bars)" if n > 1 else f"{iso(a)} (1 bar)" for a, b, n in spans[:5])
    more = f" and {len(spans) - 5} more gaps" if len(spans) > 5 else ""
    good = latest_valid_origin(series, spec, before=index, usable=usable)
    hint = (f"the newest earlier origin that works is {iso(int(series.open_time[good]))}: forecast from "
            f'candles.upto(to_ms("{iso(int(series.open_time[good]))}")) (to_ms from worker.features.candles)'
            if good is not None else "no earlier origin in these candles works")
    return (f"{symbol}: the {spec.window_bars}-bar window ending {iso(int(series.open_time[index]))} misses "
            f"{total} bars (at most {spec.max_missing_fraction:.0%} = "
            f"{int(spec.max_missing_fraction * spec.window_bars)} allowed; weekends do not count): {shown}{more}; "
            f"{hint}")


def build_contexts(
    series: CandleSeries,
    origins: np.ndarray,
    spec: FeatureSpec,
    norm: Normalization,
    horizon: int,
    features: tuple[np.ndarray, np.ndarray] | None = None,
) -> ContextBatch:
    """Contexts for the given origin indices. ``features`` may be passed to reuse one computation."""
    if spec.feature_set == "seasonal":
        return _seasonal_contexts(series, origins, spec, norm, horizon, features)
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
        future_scale=np.repeat(ovol.astype(np.float64)[:, None], horizon, axis=1),
    )


def _seasonal_contexts(series: CandleSeries, origins: np.ndarray, spec: FeatureSpec, norm: Normalization,
                       horizon: int, features: tuple[np.ndarray, np.ndarray] | None) -> ContextBatch:
    assert spec.profile is not None
    feats, vol = features if features is not None else compute_features(series, spec)
    length = spec.context_bars
    idx = origins[:, None] + np.arange(1 - length, 1)[None, :]
    if (idx < 0).any():
        raise InsufficientHistory("insufficient_history", f"need {spec.window_bars} bars")
    x = feats[idx].copy()
    ovol = vol[origins]
    if not np.isfinite(x).all() or not np.isfinite(ovol).all():
        raise InsufficientHistory("insufficient_history", f"need {spec.window_bars} bars of valid history")
    x[:, :, 3] -= np.log(ovol)[:, None]
    x = (x - norm.feature_mean) / norm.feature_std
    otime = series.open_time[origins]
    future = (otime[:, None] + spec.timeframe_ms * np.arange(1, horizon + 1)[None, :]).ravel()
    b = len(origins)
    ctx_t = series.open_time[idx].ravel()
    ctime = np.concatenate([market_time_features(ctx_t, spec.timeframe_ms),
                            np.log(spec.profile.scale(ctx_t))[:, None].astype(np.float32)], axis=1)
    fscale = spec.profile.scale(future)
    ftime = np.concatenate([market_time_features(future, spec.timeframe_ms),
                            np.log(fscale)[:, None].astype(np.float32)], axis=1)
    return ContextBatch(
        bar_features=x.astype(np.float32),
        context_time=ctime.reshape(b, length, -1),
        future_time=ftime.reshape(b, horizon, -1),
        origin_vol=ovol.astype(np.float64),
        origin_close=series.close[origins].astype(np.float64),
        origin_time=otime.astype(np.int64),
        future_scale=(ovol[:, None] * fscale.reshape(b, horizon)).astype(np.float64),
    )


def future_targets(series: CandleSeries, origins: np.ndarray, horizon: int, vol: np.ndarray,
                   spec: FeatureSpec | None = None) -> np.ndarray:
    """Next ``horizon`` log returns after each origin (B, H), in units of the origin's volatility
    (format 1) or of the seasonal forecast of each future bar (``spec.feature_set == "seasonal"``)."""
    logc = np.log(series.close)
    idx = origins[:, None] + np.arange(0, horizon + 1)[None, :]
    path = np.diff(logc[idx], axis=1)
    if spec is not None and spec.feature_set == "seasonal":
        assert spec.profile is not None
        s = spec.profile.scale(series.open_time[idx[:, 1:]].ravel()).reshape(path.shape)
        return np.clip(path / (vol[origins][:, None] * s), -_Z_CLIP, _Z_CLIP)
    return path / vol[origins][:, None]


def path_is_contiguous(series: CandleSeries, origins: np.ndarray, horizon: int, timeframe_ms: int) -> np.ndarray:
    """True where the ``horizon`` bars after an origin follow each other without any gap (no
    weekend, holiday close or outage inside the path): the origins training and scoring use."""
    t = series.open_time
    ok = origins + horizon < len(t)
    safe = np.where(ok, origins, 0)
    span = t[np.minimum(safe + horizon, len(t) - 1)] - t[safe]
    return ok & (span == horizon * timeframe_ms)


def fit_normalization(
    series: CandleSeries, origins: np.ndarray, spec: FeatureSpec, horizon: int
) -> Normalization:
    """Statistics of the features as the model sees them (origin-vol scaled), on training origins only."""
    feats, vol = compute_features(series, spec)
    n_feat = len(spec.bar_feature_names)
    ident = Normalization(np.zeros(n_feat), np.ones(n_feat), 0.0, 1.0)
    ctx = build_contexts(series, origins, spec, ident, horizon, (feats, vol))
    flat = ctx.bar_features.reshape(-1, n_feat).astype(np.float64)
    std = flat.std(axis=0)
    std[std < 1e-8] = 1.0  # a constant feature (no gaps in the training data) must not blow up
    if spec.feature_set == "seasonal":
        # Targets stay in seasonal-forecast units (mean 0, std 1 by construction): the untrained
        # v-prediction network (zero output) then samples N(0, 1) per bar, the baseline itself.
        return Normalization(flat.mean(axis=0), std, 0.0, 1.0)
    target = future_targets(series, origins, horizon, vol)
    return Normalization(flat.mean(axis=0), std, float(target.mean()), float(target.std()))

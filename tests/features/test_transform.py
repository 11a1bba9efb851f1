"""The one feature function: no look-ahead, finite memory (no train/serve skew), explicit gaps."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from worker.errors import InsufficientHistory
from worker.features.candles import CandleSeries
from worker.features.transform import (
    BAR_FEATURES,
    FeatureSpec,
    Normalization,
    build_contexts,
    compute_features,
    fit_normalization,
    future_targets,
    missing_bars,
    origin_ok,
    time_features,
)

HOUR_MS = 3_600_000
SPEC = FeatureSpec(timeframe_ms=HOUR_MS)  # 64 context bars + 64 vol lookback + 1 = 129 bars
HORIZON = 4
RET, OPEN_GAP, MISSING = BAR_FEATURES.index("ret"), BAR_FEATURES.index("open_gap"), BAR_FEATURES.index("missing")


def _ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)


def fx_open_times(start: str, weeks: int, timeframe_ms: int = HOUR_MS) -> np.ndarray:
    """Bar open times of FX weeks: trading from Sunday 22:00 to Friday 22:00 UTC, nothing between."""
    t0 = _ms(start)
    assert dt.datetime.fromtimestamp(t0 / 1000, tz=dt.UTC).weekday() == 6, "start on a Sunday"
    week_ms, session_ms = 7 * 86_400_000, 5 * 86_400_000
    return np.concatenate(
        [t0 + w * week_ms + np.arange(0, session_ms, timeframe_ms) for w in range(weeks)]
    ).astype(np.int64)


def synthetic(open_time: np.ndarray, seed: int = 0) -> CandleSeries:
    """A random walk with consistent OHLC on the given bar times."""
    rng = np.random.default_rng(seed)
    n = len(open_time)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    open_ = np.concatenate([[1.1], close[:-1]]) * np.exp(rng.normal(0, 1e-4, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 5e-4, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 5e-4, n)))
    return CandleSeries(open_time.astype(np.int64), np.stack([open_, high, low, close, rng.uniform(1, 2, n)], 1))


@pytest.fixture(scope="module")
def norm(eurusd: CandleSeries) -> Normalization:
    origins = np.arange(SPEC.window_bars - 1, 3000, 7)
    origins = np.array([i for i in origins if origin_ok(eurusd, i, SPEC) is None])
    return fit_normalization(eurusd, origins, SPEC, HORIZON)


def _perturb_after(series: CandleSeries, k: int, seed: int) -> CandleSeries:
    """Same bars up to k; everything after k changed: prices rescaled per bar, and a 5-bar hole."""
    rng = np.random.default_rng(seed)
    ohlcv = series.ohlcv.copy()
    ohlcv[k + 1 :, :4] *= np.exp(rng.normal(0, 0.01, (len(series) - k - 1, 1)))
    ohlcv[k + 1 :, 4] *= 3.0
    times = series.open_time.copy()
    times[k + 1 :] += 5 * HOUR_MS
    return CandleSeries(times, ohlcv)


# -- no look-ahead ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [200, 1000, 4321])
def test_no_look_ahead_changing_future_candles_leaves_past_features_unchanged(eurusd: CandleSeries, k: int) -> None:
    feats, vol = compute_features(eurusd, SPEC)
    changed = _perturb_after(eurusd, k, seed=k)
    feats2, vol2 = compute_features(changed, SPEC)
    assert not np.allclose(feats[k + 1 :, RET], feats2[k + 1 :, RET])  # the future did change
    np.testing.assert_array_equal(feats2[: k + 1], feats[: k + 1])
    np.testing.assert_array_equal(vol2[: k + 1], vol[: k + 1])
    # Dropping the future altogether is the same thing.
    feats3, vol3 = compute_features(eurusd[: k + 1], SPEC)
    np.testing.assert_array_equal(feats3, feats[: k + 1])
    np.testing.assert_array_equal(vol3, vol[: k + 1])


def test_no_look_ahead_in_contexts(eurusd: CandleSeries, norm: Normalization) -> None:
    k = 2500
    origins = np.array([k - 300, k - 17, k])
    a = build_contexts(eurusd, origins, SPEC, norm, HORIZON)
    b = build_contexts(_perturb_after(eurusd, k, seed=1), origins, SPEC, norm, HORIZON)
    for name in ("bar_features", "context_time", "future_time", "origin_vol", "origin_close", "origin_time"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_normalization_uses_training_origins_only(eurusd: CandleSeries) -> None:
    origins = np.arange(SPEC.window_bars - 1, 1500)
    a = fit_normalization(eurusd, origins, SPEC, HORIZON)
    # Targets of the last origin reach origins[-1] + HORIZON; anything after it is unseen.
    b = fit_normalization(_perturb_after(eurusd, int(origins[-1]) + HORIZON, seed=3), origins, SPEC, HORIZON)
    np.testing.assert_array_equal(a.feature_mean, b.feature_mean)
    np.testing.assert_array_equal(a.feature_std, b.feature_std)
    assert (a.target_mean, a.target_std) == (b.target_mean, b.target_std)


# -- finite memory: no train/serve skew ------------------------------------------------------------


# 128: the first possible origin; -1: the last bar of the year (its window holds the Christmas hole, which
# build_contexts does not judge: that is origin_ok's job).
@pytest.mark.parametrize("origin", [128, 129, 2000, 5000, -1])
def test_window_of_exactly_window_bars_equals_whole_year(
    eurusd: CandleSeries, norm: Normalization, origin: int
) -> None:
    origin = origin % len(eurusd)
    w = SPEC.window_bars
    window = eurusd[origin + 1 - w : origin + 1]
    assert len(window) == w
    full_feats, full_vol = compute_features(eurusd, SPEC)
    win_feats, win_vol = compute_features(window, SPEC)
    ctx_rows = slice(w - SPEC.context_bars, w)
    np.testing.assert_allclose(
        win_feats[ctx_rows], full_feats[origin + 1 - SPEC.context_bars : origin + 1], rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(win_vol[-1], full_vol[origin], rtol=1e-12)

    full = build_contexts(eurusd, np.array([origin]), SPEC, norm, HORIZON)
    served = build_contexts(window, np.array([w - 1]), SPEC, norm, HORIZON)
    np.testing.assert_allclose(served.bar_features, full.bar_features, rtol=1e-6, atol=1e-7)  # float32
    np.testing.assert_array_equal(served.context_time, full.context_time)
    np.testing.assert_array_equal(served.future_time, full.future_time)
    np.testing.assert_allclose(served.origin_vol, full.origin_vol, rtol=1e-12)
    assert served.origin_close[0] == full.origin_close[0] and served.origin_time[0] == full.origin_time[0]


def test_one_bar_less_than_window_bars_is_not_enough(eurusd: CandleSeries, norm: Normalization) -> None:
    w = SPEC.window_bars
    short = eurusd[3000 - (w - 1) : 3000]
    assert origin_ok(short, len(short) - 1, SPEC) == "insufficient_history"
    with pytest.raises(InsufficientHistory) as info:
        build_contexts(short, np.array([len(short) - 1]), SPEC, norm, HORIZON)
    assert info.value.reason == "insufficient_history"


def test_features_have_no_nan_once_history_suffices(eurusd: CandleSeries) -> None:
    feats, vol = compute_features(eurusd, SPEC)
    assert np.isfinite(feats[SPEC.vol_lookback + 1 :]).all()
    assert np.isnan(feats[: SPEC.vol_lookback + 1, BAR_FEATURES.index("ret_z")]).all()
    assert (vol[SPEC.vol_lookback :] > 0).all()


# -- gaps are explicit ------------------------------------------------------------------------------


@pytest.mark.parametrize("timeframe_ms", [5 * 60_000, HOUR_MS, 4 * HOUR_MS])
def test_weekend_closure_is_not_missing(timeframe_ms: int) -> None:
    times = fx_open_times("2024-01-07T22:00:00", weeks=3, timeframe_ms=timeframe_ms)
    gaps = np.diff(times)
    assert (gaps > timeframe_ms).sum() == 2  # two weekends
    np.testing.assert_array_equal(missing_bars(times, timeframe_ms), 0)


def test_daily_bars_weekend_is_not_missing() -> None:
    day = 86_400_000
    # Mon..Fri daily bars (00:00 UTC) for 3 weeks.
    times = np.array([_ms("2024-01-08T00:00:00") + (w * 7 + d) * day for w in range(3) for d in range(5)])
    np.testing.assert_array_equal(missing_bars(times, day), 0)


def test_real_year_gaps(eurusd: CandleSeries) -> None:
    """2017: all weekends are closures (0 missing, one hour around the DST changes aside); the only real
    hole is Christmas Day, 2017-12-25 07:00 -> 22:00 (14 missing hourly bars)."""
    missing = missing_bars(eurusd.open_time, HOUR_MS)
    weekends = np.diff(eurusd.open_time) >= 48 * HOUR_MS
    assert weekends.sum() >= 50
    assert missing[1:][weekends].max() <= 1
    i = int(np.argmax(missing))
    assert missing[i] == 14 and eurusd.open_time[i] == _ms("2017-12-25T22:00:00")
    assert missing.sum() == 14 + missing[1:][weekends].sum()


def test_mid_week_hole_counts_its_missing_bars_and_fabricates_no_return() -> None:
    times = fx_open_times("2024-01-07T22:00:00", weeks=2)
    hole_start = _ms("2024-01-10T10:00:00")  # Wednesday 10:00..14:00 missing (5 bars)
    keep = (times < hole_start) | (times >= hole_start + 5 * HOUR_MS)
    series = synthetic(times[keep])
    after = int(np.searchsorted(series.open_time, hole_start))
    assert series.open_time[after] == hole_start + 5 * HOUR_MS

    missing = missing_bars(series.open_time, HOUR_MS)
    assert missing[after] == 5
    assert missing.sum() == 5

    feats, _ = compute_features(series, SPEC)
    assert len(feats) == len(series)  # no rows invented for the hole
    c, o = series.close, series.ohlcv[:, 0]
    assert feats[after, RET] == pytest.approx(np.log(c[after] / c[after - 1]), rel=1e-12)
    assert feats[after, OPEN_GAP] == pytest.approx(np.log(o[after] / c[after - 1]), rel=1e-12)
    assert feats[after, MISSING] == pytest.approx(np.log1p(5))
    assert (feats[1:, MISSING][np.arange(1, len(series)) != after] == 0).all()


def _series_with_holes(n_missing: int) -> tuple[CandleSeries, int]:
    """A series whose last window_bars-bar window contains ``n_missing`` missing bars in one-bar holes."""
    times = fx_open_times("2024-01-07T22:00:00", weeks=3)
    origin = len(times) - 1
    # Remove single bars inside the last window (keeping the window's bar count at window_bars).
    keep = np.ones(len(times), bool)
    drop = origin - 3 * np.arange(1, n_missing + 1)
    keep[drop] = False
    series = synthetic(times[keep])
    return series, len(series) - 1


def test_window_with_too_many_missing_bars_is_refused(norm: Normalization) -> None:
    limit = SPEC.max_missing_fraction * SPEC.window_bars  # 12.9
    ok_series, ok_origin = _series_with_holes(int(limit))
    assert int(missing_bars(ok_series.open_time[-SPEC.window_bars :], HOUR_MS)[1:].sum()) == 12
    assert origin_ok(ok_series, ok_origin, SPEC) is None
    bad_series, bad_origin = _series_with_holes(int(limit) + 1)
    assert origin_ok(bad_series, bad_origin, SPEC) == "too_many_missing_bars"


def test_real_christmas_hole_refuses_origins_right_after_it(eurusd: CandleSeries) -> None:
    after = int(np.searchsorted(eurusd.open_time, _ms("2017-12-25T22:00:00")))
    assert origin_ok(eurusd, after - 1, SPEC) is None
    assert origin_ok(eurusd, after, SPEC) == "too_many_missing_bars"
    # Once the hole has left the window (window_bars bars later), origins are accepted again.
    assert origin_ok(eurusd, after + SPEC.window_bars - 1, SPEC) is None


@pytest.mark.parametrize("index", [0, 5, SPEC.window_bars - 2])
def test_too_short_history_is_insufficient(eurusd: CandleSeries, index: int) -> None:
    assert origin_ok(eurusd, index, SPEC) == "insufficient_history"


def test_exactly_window_bars_of_history_is_enough(eurusd: CandleSeries) -> None:
    assert origin_ok(eurusd, SPEC.window_bars - 1, SPEC) is None


# -- smaller pieces ---------------------------------------------------------------------------------


def test_time_features_known_values() -> None:
    t = np.array([_ms("2024-01-08T00:00:00"), _ms("2024-01-08T06:00:00"), _ms("2024-01-10T12:00:00")])
    tf = time_features(t)  # Monday 00:00, Monday 06:00, Wednesday 12:00
    np.testing.assert_allclose(tf[0], [0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(tf[1, :2], [1, 0], atol=1e-7)
    np.testing.assert_allclose(tf[2], [0, -1, np.sin(4 * np.pi / 7), np.cos(4 * np.pi / 7)], atol=1e-6)


def test_future_targets_are_real_log_returns_in_origin_vol_units(eurusd: CandleSeries) -> None:
    _, vol = compute_features(eurusd, SPEC)
    origins = np.array([500, 501, 3000])
    y = future_targets(eurusd, origins, HORIZON, vol)
    for row, o in zip(y, origins, strict=True):
        expect = np.log(eurusd.close[o + 1 : o + 1 + HORIZON] / eurusd.close[o : o + HORIZON]) / vol[o]
        np.testing.assert_allclose(row, expect, rtol=1e-9)


def test_contexts_are_scaled_by_origin_vol_and_normalised(eurusd: CandleSeries, norm: Normalization) -> None:
    feats, vol = compute_features(eurusd, SPEC)
    o = 4000
    ctx = build_contexts(eurusd, np.array([o]), SPEC, norm, HORIZON)
    raw = feats[o + 1 - SPEC.context_bars : o + 1].copy()
    raw[:, :4] /= vol[o]
    np.testing.assert_allclose(ctx.bar_features[0], (raw - norm.feature_mean) / norm.feature_std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ctx.future_time[0], time_features(eurusd.open_time[o] + HOUR_MS * np.arange(1, 5)))
    assert ctx.bar_features.dtype == np.float32 and ctx.bar_features.shape == (1, SPEC.context_bars, len(BAR_FEATURES))

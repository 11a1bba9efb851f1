"""Market-clock seasonality: DST, the week open, weekend and holiday gaps, stale bars, the profile,
and the seasonal feature set's train/serve identity."""

from __future__ import annotations

import numpy as np
import pytest

from worker.data import fx
from worker.features.candles import CandleSeries, to_ms
from worker.features.seasonal import (
    SeasonalProfile,
    bars_before_close,
    deseasonalised_variance,
    fit_profile,
    fit_range_bias,
    market_clock,
    market_closed,
    range_variance,
    vol_returns,
)
from worker.features.transform import (
    SEASONAL_BAR_FEATURES,
    FeatureSpec,
    build_contexts,
    compute_features,
    fit_normalization,
    missing_bars,
    path_is_contiguous,
)
from worker.scoring.baselines import seasonal_ewma_normal

TF = 300_000


def _series(start: str, n: int, seed: int = 0, *, skip: tuple[int, int] | None = None) -> CandleSeries:
    """``n`` 5-minute bars of a random walk from ``start``; ``skip=(i, k)`` jumps the clock by k bars
    before bar i (a gap)."""
    rng = np.random.default_rng(seed)
    t = to_ms(start) + TF * np.arange(n)
    if skip is not None:
        t[skip[0]:] += TF * skip[1]
    c = 1.1 * np.exp(np.cumsum(rng.normal(0, 3e-4, n)))
    o = np.r_[c[0], c[:-1]]
    hi = np.maximum(o, c) * (1 + rng.uniform(0, 2e-4, n))
    lo = np.minimum(o, c) * (1 - rng.uniform(0, 2e-4, n))
    return CandleSeries(t.astype(np.int64), np.stack([o, hi, lo, c, np.ones(n)], axis=1))


def test_the_market_clock_follows_new_york_through_the_dst_change() -> None:
    summer = to_ms("2023-10-27T13:30:00Z")  # 09:30 EDT
    winter = to_ms("2023-11-06T14:30:00Z")  # 09:30 EST: one hour later in UTC, same New York slot
    clock = market_clock(np.array([summer, winter, winter - 3_600_000]), TF)
    assert clock.slot[0] == clock.slot[1] == (16 * 60 + 30) // 5  # 16.5 h after the 17:00 roll
    assert clock.slot[2] != clock.slot[1]  # the UTC-same time is another slot in winter


def test_the_week_opens_sunday_1700_new_york_with_its_own_factor() -> None:
    sunday_open = to_ms("2023-11-05T22:00:00Z")  # 17:00 EST
    clock = market_clock(np.array([sunday_open, sunday_open + 30 * 60_000, sunday_open + 90 * 60_000]), TF)
    assert clock.weekday.tolist() == [0, 0, 0] and clock.slot[0] == 0
    assert clock.week_open.tolist() == [True, True, False]
    prof = SeasonalProfile(TF, tuple([1.0] * 288), 2.0)
    assert prof.scale(np.array([sunday_open, sunday_open + 90 * 60_000])).tolist() == [2.0, 1.0]


def test_the_weekend_gap_bar_is_not_one_bar_of_volatility() -> None:
    s = _series("2023-11-03T20:00:00Z", 40, skip=(12, 576))  # Friday 16:00 NY ... Sunday open
    jump = s.ohlcv.copy()
    jump[12:, :4] *= 1.01  # a 1 % weekend gap
    gapped = CandleSeries(s.open_time, jump)
    r = vol_returns(gapped, TF)
    assert r[12] == pytest.approx(np.log(jump[12, 3] / jump[12, 0]))  # open-to-close, not the gap
    assert missing_bars(gapped.open_time, TF)[12] == 0  # a weekend is not missing data
    assert not path_is_contiguous(gapped, np.array([5]), 12, TF)[0]  # no training path across it
    assert path_is_contiguous(gapped, np.array([13]), 12, TF)[0]


def test_a_holiday_close_counts_as_missing_and_breaks_paths() -> None:
    s = _series("2023-12-25T06:00:00Z", 30, skip=(10, 168))  # Christmas: no quotes for 14 hours
    assert missing_bars(s.open_time, TF)[10] == 168
    assert not path_is_contiguous(s, np.array([8]), 3, TF)[0]


def _spec(series: list[CandleSeries], estimator: str = "returns") -> FeatureSpec:
    profile = fit_profile(series, TF)
    bias = fit_range_bias(series, profile) if estimator == "range" else 1.0
    return FeatureSpec(TF, context_bars=32, vol_lookback=32, vol_lambda=0.96, feature_set="seasonal",
                       profile=profile, vol_estimator=estimator, range_bias=bias)


def test_stale_bars_are_flagged() -> None:
    s = _series("2024-01-02T00:00:00Z", 100)
    x = s.ohlcv.copy()
    x[50, :4] = x[49, 3]  # no price change at all in bar 50
    stale = CandleSeries(s.open_time, x)
    feats, _ = compute_features(stale, _spec([s]))
    col = SEASONAL_BAR_FEATURES.index("stale")
    assert feats[50, col] == 1.0 and feats[49, col] == 0.0


def test_the_profile_is_unit_rms_and_pools_pairs_by_shape() -> None:
    a = _series("2024-01-02T00:00:00Z", 2000, seed=1)
    b = CandleSeries(a.open_time, a.ohlcv * np.array([150, 150, 150, 150, 1]))  # same shape, other price
    p1, p2 = fit_profile([a], TF), fit_profile([a, b], TF)
    assert len(p1.slots) == 288 and np.sqrt(np.mean(np.square(p1.slots))) == pytest.approx(1.0)
    np.testing.assert_allclose(p1.slots, p2.slots, rtol=1e-9)  # prices do not matter


@pytest.mark.parametrize("estimator", ["returns", "range"])
def test_seasonal_contexts_from_a_redis_sized_window_equal_those_from_the_whole_year(estimator: str) -> None:
    s = _series("2024-01-02T00:00:00Z", 600, seed=3)
    spec = _spec([s], estimator)
    origins = np.arange(spec.window_bars, 560, 37)
    norm = fit_normalization(s, origins, spec, 12)
    full = build_contexts(s, origins[-1:], spec, norm, 12)
    w = spec.window_bars
    window = s[int(origins[-1]) + 1 - w : int(origins[-1]) + 1]
    served = build_contexts(window, np.array([w - 1]), spec, norm, 12)
    for name in ("bar_features", "context_time", "future_time", "origin_vol", "future_scale"):
        np.testing.assert_allclose(getattr(full, name), getattr(served, name), rtol=1e-6, atol=1e-7)
    assert norm.target_mean == 0.0 and norm.target_std == 1.0  # targets stay in seasonal-forecast units


def test_seasonal_ewma_variance_is_ewma_times_the_summed_squared_profile() -> None:
    v = np.array([4e-8, 9e-8])
    m = np.array([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    f = seasonal_ewma_normal(v, m, [1, 3])
    np.testing.assert_allclose(f.scale, np.sqrt([[4e-8, 4e-8 * 5.25], [9e-8, 9e-8 * 3]]))
    s = _series("2024-01-02T00:00:00Z", 200, seed=4)
    flat = SeasonalProfile.flat(TF)
    scale, var = deseasonalised_variance(s, flat, 32, 0.96)
    assert (scale == 1.0).all() and np.isnan(var[:32]).all() and np.isfinite(var[33:]).all()


@pytest.mark.skipif(not fx.available(), reason=f"tradetide not installed ({fx.INSTALL_HINT})")
def test_the_real_profile_has_the_sessions() -> None:
    train = [s[: int(np.searchsorted(s.open_time, fx.TRAIN_END))] for s in fx.load_pairs().values()]
    prof = fit_profile(train, TF)
    slots = np.asarray(prof.slots)
    assert slots.max() / slots.min() > 3  # the busiest slot is several times the quietest
    # New York's 08:30 releases: 15.5 h after the 17:00 roll is busier than 02:00 New York (9 h).
    assert slots[(15 * 60 + 30) // 5] > 2 * slots[9 * 12]
    assert prof.week_open_factor > 0


def _tokyo_walk(start: str, end: str, seed: int = 0) -> CandleSeries:
    """5-minute bars whose volatility is four times higher during 00:00-01:00 UTC every day: a session
    on a clock without DST, like Tokyo's, seen from New York."""
    rng = np.random.default_rng(seed)
    t = np.arange(to_ms(start), to_ms(end), TF, dtype=np.int64)
    busy = (t % 86_400_000) < 3_600_000
    r = rng.normal(0, 1e-4, len(t)) * np.where(busy, 4.0, 1.0)
    c = np.exp(np.cumsum(r))
    o = np.r_[c[0], c[:-1]]
    return CandleSeries(t, np.stack([o, np.maximum(o, c), np.minimum(o, c), c, np.ones(len(t))], axis=1))


def test_a_session_on_another_clock_gets_one_profile_per_new_york_season() -> None:
    s = _tokyo_walk("2023-09-04T00:00:00Z", "2023-12-30T00:00:00Z")
    pooled, seasonal = fit_profile([s], TF), fit_profile([s], TF, by_offset=True)
    assert pooled.by_offset == () and seasonal.pooled().slots == pooled.slots
    seasons = dict(seasonal.by_offset)
    assert sorted(seasons) == [-300, -240]
    # 00:00 UTC is 20:00 EDT (slot 36 from the 17:00 roll) and 19:00 EST (slot 24).
    edt, est = np.asarray(seasons[-240]).reshape(24, 12).mean(1), np.asarray(seasons[-300]).reshape(24, 12).mean(1)
    assert edt[3] > 2.5 * edt[2] and est[2] > 2.5 * est[3]
    one_clock = np.asarray(pooled.slots).reshape(24, 12).mean(1)
    assert 1.5 < one_clock[2] / one_clock[0] < est[2] / est[0]  # one clock smears the session over two hours
    # Served: a bar takes its own season's slots, on either side of New York's clock change.
    summer, winter = to_ms("2023-10-02T00:30:00Z"), to_ms("2023-11-13T00:30:00Z")
    got = seasonal.scale(np.array([summer, winter]))
    np.testing.assert_allclose(got, [seasons[-240][3 * 12 + 6], seasons[-300][2 * 12 + 6]])


def test_a_season_with_too_few_bars_keeps_the_pooled_profile() -> None:
    s = _tokyo_walk("2023-10-23T00:00:00Z", "2023-12-30T00:00:00Z")  # one week of summer time
    seasonal = fit_profile([s], TF, by_offset=True)
    assert [m for m, _ in seasonal.by_offset] == [-300]
    summer = to_ms("2023-10-24T12:00:00Z")
    slot = market_clock(np.array([summer]), TF).slot[0]
    assert seasonal.scale(np.array([summer]))[0] == seasonal.slots[slot]


def test_a_seasonal_profile_must_have_a_full_day_per_season() -> None:
    flat = (1.0,) * 288
    with pytest.raises(ValueError, match="UTC-240min needs 288"):
        SeasonalProfile(TF, flat, 1.0, ((-240, (1.0,) * 287),))
    with pytest.raises(ValueError, match="twice"):
        SeasonalProfile(TF, flat, 1.0, ((-240, flat), (-240, flat)))


@pytest.mark.skipif(not fx.available(), reason=f"tradetide not installed ({fx.INSTALL_HINT})")
def test_on_real_bars_tokyo_opens_an_hour_earlier_on_the_new_york_clock_in_winter() -> None:
    train = [s[: int(np.searchsorted(s.open_time, fx.TRAIN_END))] for s in fx.load_pairs().values()]
    seasons = dict(fit_profile(train, TF, by_offset=True).by_offset)
    hour = {m: np.asarray(v).reshape(24, 12).mean(1) for m, v in seasons.items()}
    # New York 19:00-20:00 is 00:00-01:00 UTC in winter (Tokyo 09:00, its open) but 23:00 UTC in summer.
    assert hour[-300][2] > 1.4 * hour[-240][2]


def _range_walk(n: int, seed: int = 0) -> CandleSeries:
    """Bars whose Parkinson estimate is exactly twice the squared return (high/low span the move)."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0, 3e-4, n)
    c = 1.1 * np.exp(np.cumsum(r))
    o = np.r_[c[0], c[:-1]]
    width = np.sqrt(2 * 4 * np.log(2)) * np.abs(r)  # ln(high / low): Parkinson = 2 r^2
    lo = np.minimum(o, c) * np.exp(-(width - np.abs(r)) / 2)
    hi = lo * np.exp(width)
    t = to_ms("2024-01-02T00:00:00Z") + TF * np.arange(n)
    return CandleSeries(t.astype(np.int64), np.stack([o, hi, lo, c, np.ones(n)], axis=1))


def test_the_range_variance_is_parkinson_and_its_bias_makes_it_a_return_variance() -> None:
    s = _range_walk(3000)
    np.testing.assert_allclose(range_variance(s), np.log(s.ohlcv[:, 1] / s.ohlcv[:, 2]) ** 2 / (4 * np.log(2)))
    flat = SeasonalProfile.flat(TF)
    assert fit_range_bias([s], flat) == pytest.approx(0.5, rel=1e-6)  # Parkinson = 2 r^2 by construction
    scaled = CandleSeries(s.open_time, s.ohlcv * np.array([150, 150, 150, 150, 1]))
    assert fit_range_bias([s, scaled], flat) == pytest.approx(0.5, rel=1e-6)  # prices do not matter
    _, v_ret = deseasonalised_variance(s, flat, 32, 0.92)
    _, v_rng = deseasonalised_variance(s, flat, 32, 0.92, estimator="range", range_bias=0.5)
    np.testing.assert_allclose(v_rng[40:], v_ret[40:], rtol=1e-9)  # bias-corrected range == returns here


def test_the_range_estimator_is_only_for_the_seasonal_set_and_must_be_known() -> None:
    prof = SeasonalProfile.flat(TF)
    with pytest.raises(ValueError, match="unknown volatility estimator"):
        FeatureSpec(TF, feature_set="seasonal", profile=prof, vol_estimator="garman_klass")
    with pytest.raises(ValueError, match="only the seasonal feature set"):
        FeatureSpec(TF, vol_estimator="range")
    with pytest.raises(ValueError, match="range_bias"):
        FeatureSpec(TF, feature_set="seasonal", profile=prof, vol_estimator="range", range_bias=float("nan"))


@pytest.mark.skipif(not fx.available(), reason=f"tradetide not installed ({fx.INSTALL_HINT})")
def test_on_real_bars_the_range_ewma_is_a_sharper_volatility_forecast_than_the_returns_ewma() -> None:
    """The reason fx-5m scales by it: on the training months, the next bar's squared deseasonalised
    return is predicted with a lower QLIKE loss by the range EWMA than by the returns EWMA."""
    train = [s[: int(np.searchsorted(s.open_time, fx.TRAIN_END))] for s in fx.load_pairs(("EURUSD", "USDJPY")).values()]
    prof = fit_profile(train, TF)
    bias = fit_range_bias(train, prof)
    assert 0.9 < bias < 1.3  # quotes every minute: the range misses a little of the path
    for s in train:
        scale, v_ret = deseasonalised_variance(s, prof, 96, 0.96)
        _, v_rng = deseasonalised_variance(s, prof, 96, 0.92, estimator="range", range_bias=bias)
        u2 = (vol_returns(s, TF) / scale) ** 2
        ok = np.isfinite(v_ret[:-1]) & np.isfinite(u2[1:]) & (u2[1:] > 0)
        qlike = {name: float(np.mean(u2[1:][ok] / v[:-1][ok] + np.log(v[:-1][ok]))) for name, v in
                 (("returns", v_ret), ("range", v_rng))}
        assert qlike["range"] < qlike["returns"]


# -- the weekend close ----------------------------------------------------------------------------


@pytest.mark.parametrize(("last_open", "first_closed", "reopen"), [
    ("2024-01-05 21:55", "2024-01-05 22:00", "2024-01-07 22:00"),  # winter: 17:00 EST = 22:00 UTC, 48 h
    ("2023-07-07 20:55", "2023-07-07 21:00", "2023-07-09 21:00"),  # summer: 17:00 EDT = 21:00 UTC, 48 h
    ("2023-11-03 20:55", "2023-11-03 21:00", "2023-11-05 22:00"),  # New York falls back: 49 h
    ("2024-03-08 21:55", "2024-03-08 22:00", "2024-03-10 21:00"),  # New York springs forward: 47 h
])
def test_the_weekend_closure_is_friday_to_sunday_17_00_new_york(last_open: str, first_closed: str,
                                                                 reopen: str) -> None:
    times = np.array([to_ms(last_open), to_ms(first_closed), to_ms(reopen) - 300_000, to_ms(reopen)])
    assert market_closed(times).tolist() == [False, True, True, False]


def test_no_real_bar_of_the_five_pairs_or_the_hourly_file_falls_in_the_closure(eurusd: CandleSeries) -> None:
    """The calendar the forecaster refuses to cross is the one the data keeps."""
    assert not market_closed(eurusd.open_time).any()
    if fx.available():
        for pair in fx.PAIRS:
            assert not market_closed(fx.load_pair(pair, end_ms=to_ms("2024-01-01")).open_time).any(), pair


def test_bars_before_close_counts_the_future_bars_still_in_the_week() -> None:
    five = 300_000
    friday_last = to_ms("2024-01-05 21:55")
    origins = np.array([friday_last, friday_last - five, friday_last - 12 * five, friday_last - 47 * five,
                        friday_last - 48 * five, to_ms("2024-01-07 22:00")])
    assert bars_before_close(origins, five, 48).tolist() == [0, 1, 12, 47, 48, 48]

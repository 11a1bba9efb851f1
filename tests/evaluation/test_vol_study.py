"""The volatility study's pieces (worker/dev/vol_study.py): the market-wide surprise, the cross-pair
shrinkage and the weekday × hour factors, on series built so the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from worker.dev.vol_study import cross_pair_variance, market_surprise, weekday_hour_factors
from worker.features.candles import CandleSeries, to_ms
from worker.features.seasonal import SeasonalProfile, market_clock, market_time_ms

TF = 300_000


def test_market_surprise_is_the_mean_of_the_pairs_that_have_the_bar() -> None:
    a = (np.array([0, 1, 2, 3]), np.array([1.0, 2.0, np.nan, 4.0]))
    b = (np.array([1, 2, 3, 5]), np.array([0.0, 3.0, 2.0, -1.0]))
    m = market_surprise({"A": a, "B": b})
    np.testing.assert_allclose(m["A"], [1.0, 1.0, 3.0, 3.0])  # bar 2: A's NaN is left out
    np.testing.assert_allclose(m["B"], [1.0, 3.0, 3.0, -1.0])  # bar 5: B alone


def test_cross_pair_variance_shrinks_the_own_surprise_toward_the_market() -> None:
    fast, slow = np.array([1.0, 4.0, 2.0]), np.array([1.0, 2.0, 2.0])
    own = np.log(fast / slow)
    np.testing.assert_allclose(cross_pair_variance(fast, slow, np.zeros(3), 0.0), fast)  # w = 0: its own EWMA
    np.testing.assert_allclose(cross_pair_variance(fast, slow, own, 0.5), fast)  # the market agrees: unchanged
    # a calm pair (fast = slow) while the market runs at twice its level: halfway in logs
    calm = cross_pair_variance(np.array([2.0]), np.array([2.0]), np.array([np.log(2.0)]), 0.5)
    np.testing.assert_allclose(calm, [2.0 * np.sqrt(2.0)])


def _series(start: str, days: int, loud: tuple[int, int], factor: float, seed: int) -> CandleSeries:
    """Weekday 5-minute bars (trading days Monday..Friday) with i.i.d. returns; bars of trading
    weekday ``loud[0]`` at New York hour ``loud[1]`` move ``factor`` times as much."""
    t = to_ms(start) + TF * np.arange(days * 288, dtype=np.int64)
    t = t[market_clock(t, TF).weekday < 5]
    hour = ((market_time_ms(t) % 86_400_000) // 3_600_000 + 17) % 24
    scale = np.where((market_clock(t, TF).weekday == loud[0]) & (hour == loud[1]), factor, 1.0)
    r = np.random.default_rng(seed).standard_normal(len(t)) * 1e-4 * scale
    close = 1.1 * np.exp(np.cumsum(r))
    opens = np.concatenate([[1.1], close[:-1]])
    ohlcv = np.stack([opens, np.maximum(opens, close), np.minimum(opens, close), close, np.ones(len(t))], axis=1)
    return CandleSeries(t, ohlcv)


def test_weekday_hour_factors_find_the_loud_cell_and_average_one_per_hour() -> None:
    """Friday 08:00–09:00 New York moves 3x in every pair: its factor is about 3 / 1.4 (1.4: that
    hour's mean over the five weekdays), the other weekdays' 08:00 about 1 / 1.4, every other cell
    about 1; bars from ``end_ms`` on are not read (a loud cell there is ignored)."""
    pairs = ("A", "B", "C", "D")
    start, end = "2023-08-06T21:00:00Z", "2023-10-29T21:00:00Z"  # 12 weeks, from a Sunday 17:00 New York
    train = {p: _series(start, 84, (4, 8), 3.0, seed) for seed, p in enumerate(pairs)}
    later = {p: _series(end, 14, (1, 3), 10.0, 10 + seed) for seed, p in enumerate(pairs)}
    joined = {p: CandleSeries(np.concatenate([s.open_time, later[p].open_time]),
                              np.concatenate([s.ohlcv, later[p].ohlcv])) for p, s in train.items()}
    f = weekday_hour_factors(joined, SeasonalProfile.flat(TF), to_ms(end))
    assert f[4, 8] == pytest.approx(3.0 / 1.4, rel=0.1)
    assert f[:4, 8].mean() == pytest.approx(1.0 / 1.4, rel=0.05)
    rest = np.delete(f[:5], 8, axis=1)
    assert rest.mean() == pytest.approx(1.0, abs=0.02) and rest.min() > 0.8 and rest.max() < 1.2
    assert 0.8 < f[1, 3] < 1.2  # the later loud cell is past end_ms
    assert np.all(f[5:] == 1.0)  # no bars in those trading days: factor 1

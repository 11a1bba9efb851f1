"""Baselines: recursions vs explicit loops / arch, no look-ahead, distribution methods; plots."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from worker.scoring.baselines import (
    BaselineForecast,
    ewma_normal,
    garch_t,
    log_returns_from_closes,
    realised_cum_returns,
    rolling_normal,
)
from worker.scoring.rules import (
    QUANTILE_LEVELS,
    crps_normal,
    crps_samples,
    interval_coverages,
    pit_histogram,
)

HORIZONS = (1, 4, 12)


def simulate_garch_t(n: int, seed: int, omega=0.05, alpha=0.08, beta=0.9, nu=6.0, unit=1e-4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty(n)
    s2 = omega / (1 - alpha - beta)
    z = rng.standard_t(nu, size=n) * np.sqrt((nu - 2) / nu)
    for t in range(n):
        x[t] = np.sqrt(s2) * z[t]
        s2 = omega + alpha * x[t] ** 2 + beta * s2
    return x * unit


@pytest.fixture(scope="module")
def returns() -> np.ndarray:
    return simulate_garch_t(2400, seed=0)


def perturb_future(r: np.ndarray, t0: int, seed: int = 99) -> np.ndarray:
    """Same history up to and including r[t0]; a wildly different future."""
    out = r.copy()
    rng = np.random.default_rng(seed)
    out[t0 + 1 :] = rng.standard_normal(r.size - t0 - 1) * r.std() * rng.uniform(0.2, 5.0)
    return out


def assert_rows_identical(a: BaselineForecast, b: BaselineForecast, upto: int) -> None:
    np.testing.assert_array_equal(a.mean[: upto + 1], b.mean[: upto + 1])
    np.testing.assert_array_equal(a.scale[: upto + 1], b.scale[: upto + 1])
    if a.df is not None:
        assert b.df is not None
        np.testing.assert_array_equal(a.df[: upto + 1], b.df[: upto + 1])


# ----------------------------------------------------------------------------- targets


def test_realised_cum_returns_alignment() -> None:
    closes = np.array([1.0, 1.1, 1.05, 1.2, 1.3, 1.25])
    r = log_returns_from_closes(closes)  # r[t] = log(c[t+1]/c[t]), T = 5
    y = realised_cum_returns(r, [1, 2])
    assert y.shape == (5, 2)
    for t in range(5):
        for j, h in enumerate([1, 2]):
            if t + h <= 4:
                assert y[t, j] == pytest.approx(np.log(closes[t + 1 + h] / closes[t + 1]))
            else:
                assert np.isnan(y[t, j])


# -------------------------------------------------------------------------------- EWMA


def test_ewma_matches_explicit_recursion(returns: np.ndarray) -> None:
    r = returns[:300]
    f = ewma_normal(r, HORIZONS, lam=0.94)
    v = np.full(r.size, np.nan)
    v[19] = np.mean(r[:20] ** 2)
    for t in range(20, r.size):
        v[t] = 0.94 * v[t - 1] + 0.06 * r[t] ** 2
    assert np.all(np.isnan(f.mean[:19])) and np.all(np.isnan(f.scale[:19]))
    for j, h in enumerate(HORIZONS):
        np.testing.assert_allclose(f.scale[19:, j], np.sqrt(v[19:] * h), rtol=1e-12)
    np.testing.assert_array_equal(f.mean[19:], 0.0)
    assert f.dist == "normal" and f.name == "ewma_normal"
    np.testing.assert_array_equal(f.std, f.scale)


def test_ewma_no_lookahead(returns: np.ndarray) -> None:
    t0 = 777
    a = ewma_normal(returns, HORIZONS)
    b = ewma_normal(perturb_future(returns, t0), HORIZONS)
    assert_rows_identical(a, b, t0)
    assert not np.allclose(a.scale[t0 + 5 :], b.scale[t0 + 5 :])  # the perturbation is visible later


# ----------------------------------------------------------------------------- rolling


@pytest.mark.parametrize("demean", [False, True])
def test_rolling_matches_loop_and_no_lookahead(returns: np.ndarray, demean: bool) -> None:
    r = returns[:400]
    window = 50
    f = rolling_normal(r, HORIZONS, window=window, demean=demean)
    assert np.all(np.isnan(f.scale[: window - 1]))
    for t in (window - 1, 123, 399):
        w = r[t - window + 1 : t + 1]
        for j, h in enumerate(HORIZONS):
            if demean:
                assert f.mean[t, j] == pytest.approx(h * w.mean(), rel=1e-10)
                assert f.scale[t, j] == pytest.approx(np.sqrt(h * w.var(ddof=1)), rel=1e-10)
            else:
                assert f.mean[t, j] == 0.0
                assert f.scale[t, j] == pytest.approx(np.sqrt(h * np.mean(w**2)), rel=1e-10)
    t0 = 200
    assert_rows_identical(
        f, rolling_normal(perturb_future(r, t0), HORIZONS, window=window, demean=demean), t0
    )


# ------------------------------------------------------------------------------- GARCH


def test_garch_matches_arch_filter_and_forecast(returns: np.ndarray) -> None:
    from arch import arch_model

    r = returns[:1600]
    train_end = 1000
    f = garch_t(r, HORIZONS, train_end_index=train_end)
    (fit,) = f.info["fits"]
    c = f.info["scale"]
    assert c == 1e4  # std ~1e-4 -> scaled std in [1, 10)
    assert np.all(np.isnan(f.scale[: train_end - 1])) and np.all(np.isfinite(f.scale[train_end - 1 :]))

    # parameters = a direct arch fit on the training sample only
    res = arch_model(c * r[:train_end], vol="GARCH", p=1, q=1, dist="t", mean="Zero", rescale=False).fit(
        disp="off"
    )
    np.testing.assert_allclose(
        [fit["omega_scaled"], fit["alpha"], fit["beta"], fit["nu"]], res.params.to_numpy(), rtol=1e-10
    )
    # one-step variance after observing r[t] == arch's sigma^2_{t+1} (fixed params, full series)
    fixed = arch_model(c * r, vol="GARCH", p=1, q=1, dist="t", mean="Zero", rescale=False).fix(res.params)
    nu = fit["nu"]
    j1 = f.horizon_index(1)
    ours_1 = (f.scale[:, j1] ** 2) * nu / (nu - 2) * c * c
    np.testing.assert_allclose(
        ours_1[train_end - 1 : -1], fixed.conditional_volatility[train_end:] ** 2, rtol=1e-9
    )
    # h-step variance == sum of arch's analytic multi-step variance forecasts
    fc = fixed.forecast(horizon=max(HORIZONS), start=train_end - 1, reindex=False).variance.to_numpy()
    for j, h in enumerate(HORIZONS):
        np.testing.assert_allclose((f.std[train_end - 1 :, j] * c) ** 2, fc[:, :h].sum(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(f.df[train_end - 1 :], nu)


def test_garch_refits_no_lookahead(returns: np.ndarray) -> None:
    kw = {"train_end_index": 800, "refit_every": 500}
    a = garch_t(returns, HORIZONS, **kw)
    assert [fit["fit_end"] for fit in a.info["fits"]] == [800, 1300, 1800, 2300]
    assert a.info["fits"][1]["rows"] == [1299, 1799]
    for t0 in (1000, 1299, 2000):  # inside a block / first row of a refit block / later block
        b = garch_t(perturb_future(returns, t0), HORIZONS, **kw)
        assert_rows_identical(a, b, t0)
        assert not np.allclose(a.scale[t0 + 10 :], b.scale[t0 + 10 :])
    # the nu of each block is the nu of its fit
    assert a.df is not None
    assert a.df[1299, 0] == a.info["fits"][1]["nu"] and a.df[1298, 0] == a.info["fits"][0]["nu"]


def test_garch_is_reasonably_calibrated_on_garch_data(returns: np.ndarray) -> None:
    f = garch_t(returns, HORIZONS, train_end_index=1000)
    y = realised_cum_returns(returns, HORIZONS)
    # h = 1 only: longer horizons overlap, so ~1400 origins hold too few independent targets
    ok = f.valid[:, 0] & np.isfinite(y[:, 0])
    cov = interval_coverages(f.quantiles()[ok, 0], QUANTILE_LEVELS, y[ok, 0])
    assert cov["90"] == pytest.approx(0.9, abs=0.03)
    assert cov["80"] == pytest.approx(0.8, abs=0.04)
    assert cov["50"] == pytest.approx(0.5, abs=0.05)
    # GARCH beats the constant-ish rolling baseline on GARCH data at h=1 (CRPS, same origins)
    g = rolling_normal(returns, HORIZONS, window=500)
    ok = f.valid[:, 0] & g.valid[:, 0] & np.isfinite(y[:, 0])
    assert f.crps(y)[ok, 0].mean() < g.crps(y)[ok, 0].mean()


def test_garch_argument_validation(returns: np.ndarray) -> None:
    with pytest.raises(ValueError):
        garch_t(returns[:300], [1], train_end_index=100)
    with pytest.raises(ValueError):
        garch_t(returns, [0])
    bad = returns.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError):
        ewma_normal(bad, [1])


# ------------------------------------------------------------------- BaselineForecast API


def test_forecast_distribution_methods(returns: np.ndarray) -> None:
    f = garch_t(returns, HORIZONS, train_end_index=1500)
    rows = np.arange(1600, 1640)
    sub = f.select(rows)
    np.testing.assert_array_equal(sub.origin_index, rows)
    assert sub.shape == (40, 3)
    assert sub.df is not None
    q = sub.quantiles(QUANTILE_LEVELS)
    assert q.shape == (40, 3, len(QUANTILE_LEVELS))
    np.testing.assert_allclose(
        q, stats.t.ppf(QUANTILE_LEVELS, sub.df[..., None], sub.mean[..., None], sub.scale[..., None])
    )
    assert np.all(np.diff(q, axis=-1) > 0)
    np.testing.assert_allclose(sub.cdf(q[..., 2]), QUANTILE_LEVELS[2], rtol=1e-9)
    y = realised_cum_returns(returns, HORIZONS)[rows]
    np.testing.assert_allclose(sub.log_score(y), -stats.t.logpdf(y, sub.df, sub.mean, sub.scale), rtol=1e-10)
    # closed-form t CRPS agrees with the exact empirical CRPS of many draws
    draws = sub.sample(40_000, rng=1)
    assert draws.shape == (40, 3, 40_000)
    np.testing.assert_allclose(crps_samples(draws[:5], y[:5], fair=True), sub.crps(y)[:5], rtol=3e-2)
    np.testing.assert_allclose(draws[:, 1].std(axis=-1), sub.std[:, 1], rtol=3e-2)
    # NaN rows propagate through everything
    early = f.select([10])
    assert not early.valid.any()
    assert np.all(np.isnan(early.quantiles())) and np.all(np.isnan(early.crps(np.zeros((1, 3)))))


def test_normal_forecast_methods(returns: np.ndarray) -> None:
    f = ewma_normal(returns, HORIZONS).select(slice(100, 120))
    y = realised_cum_returns(returns, HORIZONS)[100:120]
    np.testing.assert_allclose(f.crps(y), crps_normal(0.0, f.scale, y))
    np.testing.assert_allclose(f.cdf(y), stats.norm.cdf(y, 0.0, f.scale))
    np.testing.assert_allclose(f.quantiles([0.5])[..., 0], 0.0, atol=1e-18)
    with pytest.raises(ValueError):
        f.horizon_index(7)


# ------------------------------------------------------------------------------- plots


def _assert_png(path, min_bytes: int = 15_000) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes


def test_plots_write_pngs(tmp_path, returns: np.ndarray) -> None:
    from worker.evaluation.plots import calibration_plot, compare_plot, fan_chart

    r = returns[:1400]
    closes = 1.1 * np.exp(np.concatenate([[0.0], np.cumsum(r)]))  # closes[t+1] is row t's origin
    h = 12
    f = garch_t(r, [h], train_end_index=1000)
    rows = np.arange(1100, 1300)
    times = np.datetime64("2024-01-01T00:00") + np.timedelta64(5, "m") * (rows + 1)
    origin_close = closes[rows + 1]
    q_price = origin_close[:, None] * np.exp(f.quantiles()[rows, 0])
    realised = closes[rows + 1 + h]
    fan = tmp_path / "fan.png"
    fan_chart(
        times,
        origin_close,
        q_price,
        realised,
        fan,
        horizon=np.timedelta64(5 * h, "m"),
        horizon_label="1h (12 bars)",
    )
    _assert_png(fan)

    y = realised_cum_returns(r, [h])
    ok = f.valid[:, 0] & np.isfinite(y[:, 0])
    e = ewma_normal(r, [h])
    pits = {
        "garch_t": pit_histogram(f.cdf(y)[ok, 0]),
        "ewma_normal": pit_histogram(e.cdf(y)[ok, 0]),
    }
    covs = {
        "garch_t": interval_coverages(f.quantiles()[ok, 0], QUANTILE_LEVELS, y[ok, 0]),
        "ewma_normal": interval_coverages(e.quantiles()[ok, 0], QUANTILE_LEVELS, y[ok, 0]),
    }
    cal = tmp_path / "sub" / "calibration.png"
    calibration_plot(pits, covs, cal)
    _assert_png(cal)

    rows_cmp = [
        {"scheduler": s, "steps": n, "nfe": n * k, "wall_ms": 0.9 * n * k, "crps": 1e-3 * (1 + 2 / n)}
        for s, k in (("ddim", 1), ("dpmpp_2m", 1), ("heun", 2))
        for n in (5, 10, 20, 50)
    ]
    rows_cmp.append(
        {
            "scheduler": "ddpm-1000",
            "steps": 1000,
            "nfe": 1000,
            "wall_ms": 900.0,
            "crps": 1e-3,
            "reference": True,
        }
    )
    cmp_path = tmp_path / "compare.png"
    compare_plot(rows_cmp, cmp_path, reference={"crps": 1.2e-3, "label": "garch_t"})
    _assert_png(cmp_path)

    with pytest.raises(ValueError):
        fan_chart(times, origin_close, q_price, realised, tmp_path / "x.png")  # no target shift

"""Numerical checks of worker.scoring.rules against brute force and closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import integrate, stats

from worker.scoring.rules import (
    QUANTILE_LEVELS,
    calibration_summary,
    coverage,
    crps_normal,
    crps_samples,
    crps_student_t,
    energy_distance,
    interval_coverages,
    pinball,
    pinball_loss,
    pit_from_cdf,
    pit_from_samples,
    pit_histogram,
    summarise,
    wasserstein_1,
)


def crps_bruteforce(x: np.ndarray, y: np.ndarray, fair: bool = False) -> np.ndarray:
    """O(S^2) energy form: mean|x - y| - 1/2 mean_{i,j}|x_i - x_j|."""
    s = x.shape[-1]
    t1 = np.abs(x - y[:, None]).mean(axis=1)
    pair = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2))
    return t1 - 0.5 * pair / (s * (s - 1) if fair else s * s)


def crps_integral(cdf, y: float, lo: float, hi: float) -> float:
    """CRPS = int (F(z) - 1{z >= y})^2 dz by quadrature (independent of the closed forms)."""
    left, _ = integrate.quad(lambda z: cdf(z) ** 2, lo, y, limit=200)
    right, _ = integrate.quad(lambda z: (1.0 - cdf(z)) ** 2, y, hi, limit=200)
    return left + right


# ---------------------------------------------------------------------------------- CRPS


def test_crps_samples_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(40, 57))
    x[:5, :10] = 0.25  # ties
    y = rng.normal(size=40)
    y[0] = 0.25  # y tied with samples
    np.testing.assert_allclose(crps_samples(x, y), crps_bruteforce(x, y), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        crps_samples(x, y, fair=True), crps_bruteforce(x, y, fair=True), rtol=1e-12, atol=1e-13
    )


def test_crps_samples_edge_cases() -> None:
    # one sample: CRPS = |x - y|
    np.testing.assert_allclose(crps_samples(np.array([[1.0], [-2.0]]), np.array([0.5, 1.0])), [0.5, 3.0])
    # point mass at y scores 0
    assert crps_samples(np.full((1, 10), 3.0), np.array([3.0]))[0] == pytest.approx(0.0, abs=1e-15)
    # NaN propagates row-wise only
    x = np.random.default_rng(1).normal(size=(3, 20))
    x[1, 4] = np.nan
    out = crps_samples(x, np.zeros(3))
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
    # leading dims (..., S) with y (...)
    xb = np.random.default_rng(2).normal(size=(2, 3, 15))
    yb = np.zeros((2, 3))
    np.testing.assert_allclose(
        crps_samples(xb, yb), crps_bruteforce(xb.reshape(6, 15), yb.ravel()).reshape(2, 3), rtol=1e-12
    )
    with pytest.raises(ValueError):
        crps_samples(np.zeros((3, 5)), np.zeros(4))


def test_crps_samples_is_translation_stable_at_price_scale() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 400)) * 1e-4
    y = rng.normal(size=5) * 1e-4
    np.testing.assert_allclose(crps_samples(x + 1.1, y + 1.1), crps_samples(x, y), rtol=1e-6)


def test_crps_samples_converges_to_normal_closed_form() -> None:
    rng = np.random.default_rng(4)
    mu, sigma = np.array([0.0, 1.0, -0.5, 0.002]), np.array([1.0, 0.5, 2.0, 0.001])
    y = np.array([0.3, 2.5, -0.5, 0.0])
    x = mu[:, None] + sigma[:, None] * rng.standard_normal((4, 200_000))
    np.testing.assert_allclose(crps_samples(x, y, fair=True), crps_normal(mu, sigma, y), rtol=1e-2)


@pytest.mark.parametrize("y", [-3.0, -0.4, 0.0, 1.7])
def test_crps_normal_matches_integral(y: float) -> None:
    mu, sigma = 0.2, 0.8
    expected = crps_integral(lambda z: stats.norm.cdf(z, mu, sigma), y, -20, 20)
    assert crps_normal(mu, sigma, y) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(("nu", "y"), [(2.5, 0.3), (4.0, -2.0), (8.0, 5.0), (30.0, 0.0)])
def test_crps_student_t_matches_integral(nu: float, y: float) -> None:
    mu, scale = -0.1, 0.7
    expected = crps_integral(lambda z: stats.t.cdf(z, nu, mu, scale), y, -np.inf, np.inf)
    assert crps_student_t(mu, scale, nu, y) == pytest.approx(expected, rel=1e-6)


def test_crps_student_t_matches_sampling_and_normal_limit() -> None:
    rng = np.random.default_rng(5)
    nu = np.array([3.0, 5.0, 10.0])
    mu, scale = np.array([0.0, 0.5, -1.0]), np.array([1.0, 0.3, 2.0])
    y = np.array([0.5, 0.0, 2.0])
    x = mu[:, None] + scale[:, None] * rng.standard_t(nu[:, None], size=(3, 200_000))
    np.testing.assert_allclose(crps_samples(x, y, fair=True), crps_student_t(mu, scale, nu, y), rtol=2e-2)
    # nu -> inf recovers the Normal
    np.testing.assert_allclose(crps_student_t(mu, scale, 1e7, y), crps_normal(mu, scale, y), rtol=1e-5)
    # nu <= 1: no first moment, CRPS undefined
    assert np.isnan(crps_student_t(0.0, 1.0, 1.0, 0.0))


# ---------------------------------------------------------------------- quantile scores


def test_pinball_hand_computed() -> None:
    q = np.array([[0.0, 1.0], [2.0, 2.0]])
    y = np.array([1.0, 0.0])
    levels = [0.1, 0.9]
    # row0: u = 1-0 = 1 -> 0.1 ; u = 0 -> 0 ; row1: u = -2 -> 0.9*2 = 1.8 ; u = -2 -> 0.1*2 = 0.2
    np.testing.assert_allclose(pinball_loss(q, levels, y), [[0.1, 0.0], [1.8, 0.2]])
    per_level, mean = pinball(q, levels, y)
    np.testing.assert_allclose(per_level, [0.95, 0.1])
    assert mean == pytest.approx(0.525)


def test_pinball_dense_grid_recovers_crps() -> None:
    """CRPS = 2 * int_0^1 pinball_tau d tau."""
    levels = (np.arange(2000) + 0.5) / 2000
    mu, sigma = np.array([0.0, 1.0]), np.array([1.0, 0.5])
    y = np.array([0.7, -0.2])
    q = stats.norm.ppf(levels[None, :], mu[:, None], sigma[:, None])
    loss = pinball_loss(q, levels, y)
    np.testing.assert_allclose(2 * loss.mean(axis=1), crps_normal(mu, sigma, y), rtol=1e-3)


def test_coverage_and_interval_coverages() -> None:
    assert coverage([0, 0, 0, 0], [1, 1, 1, 1], [0.5, 1.0, 1.5, -0.1]) == pytest.approx(0.5)
    rng = np.random.default_rng(6)
    n = 20_000
    y = rng.standard_normal(n)
    q = np.tile(stats.norm.ppf(QUANTILE_LEVELS), (n, 1))
    cov = interval_coverages(q, QUANTILE_LEVELS, y)
    assert set(cov) == {"50", "80", "90"}
    assert cov["50"] == pytest.approx(0.5, abs=0.015)
    assert cov["80"] == pytest.approx(0.8, abs=0.015)
    assert cov["90"] == pytest.approx(0.9, abs=0.015)
    with pytest.raises(ValueError):
        interval_coverages(q[:, :3], QUANTILE_LEVELS[:3], y)


# ------------------------------------------------------------------------------------ PIT


def test_pit_from_samples_uniform_when_calibrated_even_for_small_s() -> None:
    rng = np.random.default_rng(7)
    n, s = 20_000, 4
    x = rng.standard_normal((n, s))
    y = rng.standard_normal(n)
    u = pit_from_samples(x, y, rng=8)
    assert np.all((u > 0) & (u < 1))
    summ = calibration_summary(u)
    assert summ["ks_pvalue"] is not None and summ["ks_pvalue"] > 1e-3
    assert summ["var"] == pytest.approx(1 / 12, abs=0.003)


def test_pit_from_samples_ranks_ties_and_nan() -> None:
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    y = np.array([0.0, 10.0, 5.0])
    u = pit_from_samples(np.repeat(x, 2000, axis=0), np.repeat(y, 2000), rng=0).reshape(3, 2000)
    assert np.all(u[0] < 0.25)  # below all: rank 0 -> (0 + V)/4
    assert np.all(u[1] > 0.75)  # above all: rank 3 -> (3 + V)/4
    # fully tied: rank uniform on {0..3} -> overall uniform on (0, 1)
    assert stats.kstest(u[2], "uniform").pvalue > 1e-3
    assert np.isnan(pit_from_samples(np.array([[np.nan, 1.0]]), np.array([0.0]))[0])


def test_pit_histogram_and_calibration_summary() -> None:
    u = np.array([0.05, 0.15, 0.15, 0.95, 1.0, 0.0, np.nan])
    counts = pit_histogram(u, bins=10)
    assert counts.shape == (10,) and counts.sum() == 6
    assert counts[0] == 2 and counts[1] == 2 and counts[9] == 2
    np.testing.assert_array_equal(pit_from_cdf([-0.1, 0.3, 1.2, np.nan])[:3], [0.0, 0.3, 1.0])
    # over-confident forecaster (too narrow) -> U-shaped PIT: var > 1/12, large KS
    rng = np.random.default_rng(9)
    y = rng.standard_normal(5000)
    over = calibration_summary(stats.norm.cdf(y / 0.5))
    assert over["var"] is not None and over["var"] > 0.1
    assert over["ks"] is not None and over["ks"] > 0.1
    assert calibration_summary(np.array([np.nan]))["n"] == 0


# ----------------------------------------------------------------------------- distances


def test_energy_distance_matches_bruteforce_and_scipy() -> None:
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=80), rng.normal(0.5, 2.0, size=53)
    ab = np.abs(a[:, None] - b[None, :]).mean()
    aa = np.abs(a[:, None] - a[None, :]).mean()
    bb = np.abs(b[:, None] - b[None, :]).mean()
    d = float(energy_distance(a, b))
    assert d == pytest.approx(2 * ab - aa - bb, rel=1e-10)
    assert np.sqrt(d) == pytest.approx(stats.energy_distance(a, b), rel=1e-8)
    assert float(energy_distance(a, a)) == pytest.approx(0.0, abs=1e-12)
    # point mass: D(F, delta_y) = 2 CRPS(F, y)
    assert float(energy_distance(a, np.array([0.3]))) == pytest.approx(
        2 * crps_samples(a[None, :], np.array([0.3]))[0], rel=1e-10
    )
    # batched over origins
    xa, xb = rng.normal(size=(4, 30)), rng.normal(size=(4, 20))
    batched = energy_distance(xa, xb)
    assert batched.shape == (4,)
    np.testing.assert_allclose(batched, [float(energy_distance(xa[i], xb[i])) for i in range(4)], rtol=1e-10)
    assert wasserstein_1(a, a + 0.25) == pytest.approx(0.25)


# ------------------------------------------------------------------------------- summary


def test_summarise_from_samples_is_json_ready() -> None:
    rng = np.random.default_rng(11)
    n, s = 500, 200
    x = rng.standard_normal((n, s))
    y = rng.standard_normal(n)
    y[3] = np.nan
    out = summarise(y, samples=x, rng=0)
    json.dumps(out, allow_nan=False)
    assert out["n"] == n - 1 and out["n_dropped"] == 1
    keep = np.isfinite(y)
    assert out["crps"] == pytest.approx(float(crps_samples(x[keep], y[keep]).mean()))
    assert list(out["pinball"]) == ["q05", "q10", "q25", "q50", "q75", "q90", "q95", "mean"]
    q = np.quantile(x[keep], QUANTILE_LEVELS, axis=1).T
    per_level, mean = pinball(q, QUANTILE_LEVELS, y[keep])
    assert out["pinball"]["q25"] == pytest.approx(per_level[2])
    assert out["pinball"]["mean"] == pytest.approx(mean)
    assert set(out["coverage"]) == {"50", "80", "90"}
    assert abs(out["coverage"]["90"] - 0.9) < 0.05
    assert sum(out["pit_histogram"]) == n - 1 and len(out["pit_histogram"]) == 10
    assert out["calibration"]["n"] == n - 1


def test_summarise_from_quantiles_with_closed_form_crps_and_pit() -> None:
    rng = np.random.default_rng(12)
    n = 300
    y = rng.standard_normal(n)
    q = np.tile(stats.norm.ppf(QUANTILE_LEVELS), (n, 1))
    out = summarise(y, quantiles=q, crps=crps_normal(0.0, 1.0, y), pit=stats.norm.cdf(y))
    json.dumps(out, allow_nan=False)
    assert out["crps"] == pytest.approx(float(crps_normal(0.0, 1.0, y).mean()))
    assert sum(out["pit_histogram"]) == n
    only_q = summarise(y, quantiles=q)
    assert only_q["crps"] is None and only_q["pit_histogram"] is None
    empty = summarise(np.array([np.nan]), quantiles=np.zeros((1, len(QUANTILE_LEVELS))))
    json.dumps(empty, allow_nan=False)
    assert empty["n"] == 0 and empty["pinball"]["mean"] is None
    with pytest.raises(ValueError):
        summarise(y)

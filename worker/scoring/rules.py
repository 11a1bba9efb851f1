"""Proper scoring rules and calibration diagnostics for probabilistic return forecasts.

Everything here is pure numpy/scipy and vectorised over forecast origins. The forecast
target is the h-bar-ahead log return ``r = log(close_{t+h} / close_t)``; one *row* is one
forecast origin (one target value ``y[i]``).

Shape conventions
-----------------
* ``samples``   : ``(N, S)`` -- S Monte-Carlo draws of the forecast distribution per origin
  (any leading shape ``(..., S)`` is accepted where noted; the last axis is the sample axis).
* ``quantiles`` : ``(N, Q)`` -- forecast quantiles at ``levels`` (Q increasing levels in (0, 1)).
* ``y``         : ``(N,)``   -- realised target per origin.

NaN policy: the elementwise scores propagate NaN (a row with a NaN input scores NaN). The
aggregating helpers (:func:`pit_histogram`, :func:`calibration_summary`, :func:`summarise`)
drop non-finite rows and report how many rows were used.

Formulas
--------
* CRPS (Gneiting & Raftery 2007, energy form): ``CRPS(F, y) = E|X - y| - 1/2 E|X - X'|``,
  X, X' iid ~ F. Lower is better; same units as ``y``.
* Pinball (quantile) loss at level tau for quantile q: ``rho_tau(y - q)`` with
  ``rho_tau(u) = max(tau * u, (tau - 1) * u)``. Note ``CRPS = 2 * int_0^1 rho_tau(y - F^{-1}(tau)) dtau``.
* PIT: ``u = F(y)``; for a calibrated forecaster u ~ Uniform(0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

from schemas.forecast import QUANTILE_LEVELS as _CONTRACT_LEVELS

FloatArray = NDArray[np.float64]

#: Quantile levels used throughout the worker: the forecast contract's (schemas.forecast), one source.
QUANTILE_LEVELS: tuple[float, ...] = tuple(_CONTRACT_LEVELS)

#: Central intervals reported by :func:`interval_coverages`: name -> (lower level, upper level).
CENTRAL_INTERVALS: dict[str, tuple[float, float]] = {
    "50": (0.25, 0.75),
    "80": (0.10, 0.90),
    "90": (0.05, 0.95),
}

_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _as_float(a: ArrayLike) -> FloatArray:
    return np.asarray(a, dtype=np.float64)


def _check_samples_y(samples: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = _as_float(samples)
    yy = _as_float(y)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"samples must have a non-empty last (sample) axis, got shape {x.shape}")
    if x.shape[:-1] != yy.shape:
        raise ValueError(
            f"samples shape {x.shape} does not match y shape {yy.shape} (expected y.shape + (S,))"
        )
    return x, yy


def _sorted_pair_weights(s: int) -> FloatArray:
    """Weights ``w_i = 2i - S - 1`` (i = 1..S) such that ``sum_{i,j} |x_i - x_j| = 2 sum_i w_i x_(i)``."""
    return 2.0 * np.arange(1, s + 1, dtype=np.float64) - s - 1.0


def _mean_abs_pairwise_sorted(xs: FloatArray) -> FloatArray:
    """``E|X - X'|`` (V-statistic, i = j pairs included) of the rows of an already sorted array.

    ``(1/S^2) sum_{i,j} |x_i - x_j| = (2/S^2) sum_i (2i - S - 1) x_(i)``  -- O(S) after sorting.
    """
    s = xs.shape[-1]
    return 2.0 * (xs @ _sorted_pair_weights(s)) / float(s * s)


# --------------------------------------------------------------------------------------- CRPS


def crps_samples(samples: ArrayLike, y: ArrayLike, *, fair: bool = False) -> FloatArray:
    """Exact CRPS of the empirical distribution of ``samples`` at ``y``.

    ``CRPS = (1/S) sum_i |x_i - y| - (1/(2 S^2)) sum_{i,j} |x_i - x_j|``
    with the pair term evaluated in O(S log S) per row through the order statistics:
    ``sum_{i,j} |x_i - x_j| = 2 sum_i (2i - S - 1) x_(i)``.

    Args:
        samples: ``(N, S)`` (or ``(..., S)``) forecast draws.
        y: ``(N,)`` (or ``(...)``) realisations.
        fair: if True, use the unbiased ("fair", Ferro 2014) pair term ``1/(2 S (S-1))`` instead of
            ``1/(2 S^2)``, i.e. the CRPS the underlying distribution is expected to get. Requires S >= 2.

    Returns:
        ``(N,)`` CRPS per row (NaN where the row contains NaN).
    """
    x, yy = _check_samples_y(samples, y)
    s = x.shape[-1]
    if fair and s < 2:
        raise ValueError("fair CRPS needs at least 2 samples")
    d = x - yy[..., None]  # CRPS is translation invariant; centring on y limits cancellation
    term1 = np.mean(np.abs(d), axis=-1)
    xs = np.sort(d, axis=-1)  # NaNs sort last; they still poison the dot product -> NaN
    pair_sum = 2.0 * (xs @ _sorted_pair_weights(s))  # sum_{i,j} |x_i - x_j|
    denom = float(s * (s - 1)) if fair else float(s * s)
    out: FloatArray = term1 - 0.5 * pair_sum / denom
    return out


def crps_normal(mu: ArrayLike, sigma: ArrayLike, y: ArrayLike) -> FloatArray:
    """Closed-form CRPS of ``N(mu, sigma^2)`` at ``y`` (broadcasting).

    ``CRPS = sigma * [ z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi) ]``, ``z = (y - mu) / sigma``.
    """
    m, s, yy = _as_float(mu), _as_float(sigma), _as_float(y)
    z = (yy - m) / s
    out: FloatArray = s * (z * (2.0 * special.ndtr(z) - 1.0) + 2.0 * stats.norm.pdf(z) - _INV_SQRT_PI)
    return out


def crps_student_t(mu: ArrayLike, scale: ArrayLike, nu: ArrayLike, y: ArrayLike) -> FloatArray:
    """Closed-form CRPS of the location-scale Student-t ``mu + scale * T_nu`` at ``y`` (nu > 1).

    With ``z = (y - mu) / scale`` and ``F_nu``, ``f_nu`` the standard t cdf/pdf
    (Gneiting & Raftery 2007; Jordan, Krueger & Lerch 2019, scoringRules)::

        CRPS = scale * [ z (2 F_nu(z) - 1)
                         + 2 f_nu(z) (nu + z^2) / (nu - 1)
                         - 2 sqrt(nu) B(1/2, nu - 1/2) / ((nu - 1) B(1/2, nu/2)^2) ]

    The CRPS is infinite for ``nu <= 1`` (no first moment); NaN is returned there.
    """
    m, s, n, yy = _as_float(mu), _as_float(scale), _as_float(nu), _as_float(y)
    z = (yy - m) / s
    with np.errstate(invalid="ignore", divide="ignore"):
        n_ok = np.where(n > 1.0, n, np.nan)
        # B(1/2, nu-1/2) / B(1/2, nu/2)^2 via log-beta for numerical stability at large nu
        log_ratio = special.betaln(0.5, n_ok - 0.5) - 2.0 * special.betaln(0.5, n_ok / 2.0)
        const = 2.0 * np.sqrt(n_ok) * np.exp(log_ratio) / (n_ok - 1.0)
        out: FloatArray = s * (
            z * (2.0 * stats.t.cdf(z, n_ok) - 1.0)
            + 2.0 * stats.t.pdf(z, n_ok) * (n_ok + z * z) / (n_ok - 1.0)
            - const
        )
    return out


# ------------------------------------------------------------------------- quantile scores


def _check_quantiles(
    quantiles: ArrayLike, levels: Sequence[float], y: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    q = _as_float(quantiles)
    lv = _as_float(levels)
    yy = _as_float(y)
    if lv.ndim != 1 or lv.size == 0:
        raise ValueError("levels must be a non-empty 1-D sequence")
    if np.any((lv <= 0.0) | (lv >= 1.0)):
        raise ValueError("levels must lie strictly inside (0, 1)")
    if q.shape != (*yy.shape, lv.size):
        raise ValueError(f"quantiles shape {q.shape} must be y.shape + (Q,) = {(*yy.shape, lv.size)}")
    return q, lv, yy


def pinball_loss(quantiles: ArrayLike, levels: Sequence[float], y: ArrayLike) -> FloatArray:
    """Elementwise pinball loss ``rho_tau(y - q)`` -> same shape as ``quantiles`` (``(N, Q)``)."""
    q, lv, yy = _check_quantiles(quantiles, levels, y)
    u = yy[..., None] - q
    out: FloatArray = np.maximum(lv * u, (lv - 1.0) * u)
    return out


def pinball(quantiles: ArrayLike, levels: Sequence[float], y: ArrayLike) -> tuple[FloatArray, float]:
    """Mean pinball loss per level and averaged over levels.

    Args:
        quantiles: ``(N, Q)`` forecast quantiles at ``levels``.
        levels: ``Q`` quantile levels in (0, 1).
        y: ``(N,)`` realisations.

    Returns:
        ``(per_level, mean)``: ``per_level`` is ``(Q,)`` = mean over the N rows of
        ``rho_tau(y - q_tau)``; ``mean`` is its average over the Q levels. NaN rows propagate.
    """
    loss = pinball_loss(quantiles, levels, y)
    per_level: FloatArray = loss.reshape(-1, loss.shape[-1]).mean(axis=0)
    return per_level, float(per_level.mean())


def coverage(lower: ArrayLike, upper: ArrayLike, y: ArrayLike) -> float:
    """Fraction of rows with ``lower <= y <= upper`` (NaN rows count as misses)."""
    lo, hi, yy = _as_float(lower), _as_float(upper), _as_float(y)
    if not (lo.shape == hi.shape == yy.shape):
        raise ValueError(f"shape mismatch: lower {lo.shape}, upper {hi.shape}, y {yy.shape}")
    if yy.size == 0:
        return float("nan")
    return float(np.mean((lo <= yy) & (yy <= hi)))


def _level_index(levels: FloatArray, level: float) -> int:
    hits = np.flatnonzero(np.isclose(levels, level, rtol=0.0, atol=1e-9))
    if hits.size == 0:
        raise ValueError(f"quantile level {level} not among levels {levels.tolist()}")
    return int(hits[0])


def interval_coverages(quantiles: ArrayLike, levels: Sequence[float], y: ArrayLike) -> dict[str, float]:
    """Empirical coverage of the central 50/80/90% intervals.

    Uses q25-q75 ("50"), q10-q90 ("80") and q05-q95 ("90"); all six levels must be present.
    Returns ``{"50": c50, "80": c80, "90": c90}`` with fractions in [0, 1].
    """
    q, lv, yy = _check_quantiles(quantiles, levels, y)
    out: dict[str, float] = {}
    for name, (lo_lvl, hi_lvl) in CENTRAL_INTERVALS.items():
        lo, hi = _level_index(lv, lo_lvl), _level_index(lv, hi_lvl)
        out[name] = coverage(q[..., lo], q[..., hi], yy)
    return out


# ------------------------------------------------------------------------------ PIT / calib


def pit_from_samples(
    samples: ArrayLike, y: ArrayLike, rng: np.random.Generator | int | None = None
) -> FloatArray:
    """Randomised PIT of ``y`` under the ensemble ``samples`` (rank histogram on a continuous scale).

    With ``b = #{x_i < y}`` and ``e = #{x_i == y}`` (ties), the rank of y among the S + 1 values is
    ``R = b + K`` with ``K ~ UniformInt{0..e}`` (random tie breaking), and the PIT is
    ``u = (R + V) / (S + 1)``, ``V ~ Uniform(0, 1)``. If y is exchangeable with the samples
    (perfect calibration) R is uniform on {0..S} and u is *exactly* Uniform(0, 1), for any S.

    Args:
        samples: ``(N, S)`` draws; y: ``(N,)``; rng: generator or seed for the randomisation.

    Returns:
        ``(N,)`` PIT values in (0, 1); NaN where y or any sample of the row is NaN.
    """
    x, yy = _check_samples_y(samples, y)
    gen = np.random.default_rng(rng)
    s = x.shape[-1]
    below = np.sum(x < yy[..., None], axis=-1)
    ties = np.sum(x == yy[..., None], axis=-1)
    k = np.floor(gen.random(yy.shape) * (ties + 1))  # uniform integer in {0..ties}
    v = gen.random(yy.shape)
    u: FloatArray = (below + k + v) / (s + 1.0)
    bad = ~np.isfinite(yy) | np.any(np.isnan(x), axis=-1)
    return np.where(bad, np.nan, u)


def pit_from_cdf(cdf_values: ArrayLike) -> FloatArray:
    """PIT from predictive CDF values ``F(y)`` (e.g. a closed-form baseline): clipped to [0, 1]; NaN kept."""
    u = _as_float(cdf_values)
    out: FloatArray = np.clip(u, 0.0, 1.0)
    return out


def pit_histogram(pit: ArrayLike, bins: int = 10) -> NDArray[np.int64]:
    """Counts of the finite PIT values in ``bins`` equal-width bins on [0, 1] -> ``(bins,)`` int64.

    A calibrated forecaster gives a flat histogram (``count ~ n / bins``).
    """
    u = _as_float(pit).ravel()
    u = u[np.isfinite(u)]
    counts, _ = np.histogram(np.clip(u, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return counts.astype(np.int64)


def calibration_summary(pit: ArrayLike) -> dict[str, float | int | None]:
    """Simple calibration summary of PIT values (finite values only).

    Returns a JSON-ready dict with ``n``, ``ks`` (Kolmogorov-Smirnov distance
    ``sup_u |F_n(u) - u|`` of the empirical PIT cdf from Uniform(0, 1)), ``ks_pvalue``,
    ``mean`` (0.5 if calibrated) and ``var`` (1/12 ~ 0.0833 if calibrated; larger means
    over-confident / too-narrow forecasts, smaller means under-confident).
    """
    u = _as_float(pit).ravel()
    u = u[np.isfinite(u)]
    if u.size == 0:
        return {"n": 0, "ks": None, "ks_pvalue": None, "mean": None, "var": None}
    res = stats.kstest(u, "uniform")
    return {
        "n": int(u.size),
        "ks": float(res.statistic),
        "ks_pvalue": float(res.pvalue),
        "mean": float(u.mean()),
        "var": float(u.var()),
    }


# ----------------------------------------------------------------- distributional distances


def energy_distance(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """Energy distance between two sample sets (e.g. two samplers' forecasts for the same origin).

    Szekely's E-statistic (V-statistic form)::

        D(A, B) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|  =  2 * int (F_A(z) - F_B(z))^2 dz  >= 0

    Chosen over Wasserstein-1 because it is the two-sample analogue of the CRPS (it is 0 iff the
    empirical distributions coincide, it is in the units of the returns, and
    ``D(F, delta_y) = 2 CRPS(F, y)``). NB ``scipy.stats.energy_distance`` returns ``sqrt(D)``.

    Computed in O((S + S2) log(S + S2)) via sorted-sample pair sums and the identity
    ``sum_{pooled pairs} = sum_AA + sum_BB + 2 sum_AB``.

    Args:
        a: ``(S,)`` or ``(..., S)`` samples; b: ``(S2,)`` or ``(..., S2)`` with the same leading shape.

    Returns:
        The distance: 0-d array for 1-D inputs, else shape ``a.shape[:-1]``.
    """
    xa, xb = _as_float(a), _as_float(b)
    if xa.shape[:-1] != xb.shape[:-1] or xa.shape[-1] == 0 or xb.shape[-1] == 0:
        raise ValueError(f"incompatible sample shapes {xa.shape} and {xb.shape}")
    s, s2 = xa.shape[-1], xb.shape[-1]
    centre = 0.5 * (np.mean(xa, axis=-1, keepdims=True) + np.mean(xb, axis=-1, keepdims=True))
    xa, xb = xa - centre, xb - centre  # translation invariant; limits cancellation
    sa = _mean_abs_pairwise_sorted(np.sort(xa, axis=-1)) * (s * s)  # sum_{i,j} |a_i - a_j|
    sb = _mean_abs_pairwise_sorted(np.sort(xb, axis=-1)) * (s2 * s2)
    pooled = np.sort(np.concatenate([xa, xb], axis=-1), axis=-1)
    sp = _mean_abs_pairwise_sorted(pooled) * ((s + s2) ** 2)
    e_ab = 0.5 * (sp - sa - sb) / (s * s2)
    out: FloatArray = 2.0 * e_ab - sa / (s * s) - sb / (s2 * s2)
    # tiny negative values are float cancellation; the true value is >= 0
    return np.maximum(out, 0.0)


def wasserstein_1(a: ArrayLike, b: ArrayLike) -> float:
    """1-D Wasserstein-1 distance ``int |F_A - F_B| dz`` between two 1-D sample sets (scipy)."""
    return float(stats.wasserstein_distance(_as_float(a).ravel(), _as_float(b).ravel()))


# ------------------------------------------------------------------------------- summary


def _level_key(level: float) -> str:
    return f"q{round(level * 100):02d}"


def _jsonable(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarise(
    y: ArrayLike,
    *,
    samples: ArrayLike | None = None,
    quantiles: ArrayLike | None = None,
    levels: Sequence[float] = QUANTILE_LEVELS,
    crps: ArrayLike | None = None,
    pit: ArrayLike | None = None,
    pit_bins: int = 10,
    rng: np.random.Generator | int | None = None,
) -> dict[str, Any]:
    """Score one forecaster on N origins and return a JSON-ready dict.

    Give either ``samples`` ``(N, S)`` (everything is derived from them: exact CRPS, empirical
    quantiles at ``levels`` unless ``quantiles`` is given, randomised PIT), or ``quantiles``
    ``(N, Q)`` plus optionally per-row ``crps`` ``(N,)`` and ``pit`` ``(N,)`` (e.g. from a closed-form
    :class:`~worker.scoring.baselines.BaselineForecast`: ``crps=f.crps(y)``, ``pit=f.cdf(y)``).

    Rows where ``y`` or any provided per-row input is non-finite are dropped.

    Returns:
        ``{"n": int, "n_dropped": int, "crps": float|None, "pinball": {"q05": .., ..., "mean": ..},
        "coverage": {"50": .., "80": .., "90": ..}, "pit_histogram": [int]*pit_bins,
        "calibration": {...calibration_summary...}}`` -- Python scalars / lists only; undefined
        values (e.g. no CRPS for quantile-only input, n == 0) are ``None``.
    """
    yy = _as_float(y)
    if yy.ndim != 1:
        raise ValueError(f"y must be 1-D (N,), got shape {yy.shape}")
    n_all = yy.shape[0]
    lv = tuple(float(v) for v in levels)

    x = None
    if samples is not None:
        x, _ = _check_samples_y(samples, yy)
    q = None
    if quantiles is not None:
        q, _, _ = _check_quantiles(quantiles, lv, yy)
    if x is None and q is None:
        raise ValueError("summarise needs samples or quantiles")

    ok = np.isfinite(yy)
    if x is not None:
        ok &= np.all(np.isfinite(x), axis=-1)
    if q is not None:
        ok &= np.all(np.isfinite(q), axis=-1)
    c_arr = None if crps is None else _as_float(crps)
    p_arr = None if pit is None else _as_float(pit)
    for extra, name in ((c_arr, "crps"), (p_arr, "pit")):
        if extra is not None:
            if extra.shape != yy.shape:
                raise ValueError(f"{name} must have shape {yy.shape}, got {extra.shape}")
            ok &= np.isfinite(extra)

    y_ok = yy[ok]
    x_ok = None if x is None else x[ok]
    if q is None:
        assert x_ok is not None
        q_ok = np.quantile(x_ok, lv, axis=-1).T if y_ok.size else np.empty((0, len(lv)), dtype=np.float64)
    else:
        q_ok = q[ok]

    if c_arr is not None:
        crps_rows: FloatArray | None = c_arr[ok]
    elif x_ok is not None:
        crps_rows = crps_samples(x_ok, y_ok)
    else:
        crps_rows = None

    if p_arr is not None:
        pit_rows: FloatArray | None = pit_from_cdf(p_arr[ok])
    elif x_ok is not None:
        pit_rows = pit_from_samples(x_ok, y_ok, rng=rng)
    else:
        pit_rows = None

    n = int(y_ok.size)
    result: dict[str, Any] = {"n": n, "n_dropped": int(n_all - n)}
    result["crps"] = _jsonable(float(np.mean(crps_rows))) if crps_rows is not None and n > 0 else None
    if n > 0:
        per_level, mean_pb = pinball(q_ok, lv, y_ok)
        pb: dict[str, float | None] = {
            _level_key(v): _jsonable(float(p)) for v, p in zip(lv, per_level, strict=True)
        }
        pb["mean"] = _jsonable(mean_pb)
        cov_raw: Mapping[str, float] | None
        try:
            cov_raw = interval_coverages(q_ok, lv, y_ok)
        except ValueError:
            cov_raw = None
        cov = None if cov_raw is None else {k: _jsonable(v) for k, v in cov_raw.items()}
    else:
        pb = {_level_key(v): None for v in lv}
        pb["mean"] = None
        cov = {k: None for k in CENTRAL_INTERVALS}
    result["pinball"] = pb
    result["coverage"] = cov
    if pit_rows is not None:
        result["pit_histogram"] = [int(c) for c in pit_histogram(pit_rows, bins=pit_bins)]
        result["calibration"] = calibration_summary(pit_rows)
    else:
        result["pit_histogram"] = None
        result["calibration"] = None
    return result

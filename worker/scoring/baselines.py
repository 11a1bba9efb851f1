"""Closed-form volatility baselines for the h-bar cumulative log return.

Index convention (shared by every function in this module)
---------------------------------------------------------
``log_returns`` is a 1-D array ``r`` of length T of one-bar log returns, e.g.
``r = np.diff(np.log(closes))`` so that ``r[t] = log(closes[t + 1] / closes[t])``.

**Row t of every (T, H) output is the forecast made after observing return ``r[t]``** (information
up to and including ``r[t]``; with ``r = diff(log(closes))`` the forecast origin is the close
``closes[t + 1]``). Its target for horizon ``h = horizons[j]`` bars is the sum of the next h returns::

    Y[t, j] = r[t + 1] + ... + r[t + h]          (= log(closes[t + 1 + h] / closes[t + 1]))

which :func:`realised_cum_returns` computes (NaN where ``t + h > T - 1``). Row t never uses
``r[t + 1:]`` (tested by perturbing the future). Rows without enough history (warm-up, or before
the end of the GARCH training sample) are NaN in ``mean``/``scale`` and hence in every derived
quantity, so ``forecast.valid & np.isfinite(Y)`` selects the scorable (origin, horizon) pairs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import signal, special, stats

from worker.scoring.rules import QUANTILE_LEVELS, crps_normal, crps_student_t

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

__all__ = [
    "BaselineForecast",
    "ewma_normal",
    "garch_t",
    "log_returns_from_closes",
    "realised_cum_returns",
    "rolling_normal",
    "seasonal_ewma_normal",
]


# ------------------------------------------------------------------------------ container


@dataclass(frozen=True)
class BaselineForecast:
    """Parametric forecast distributions of the h-bar cumulative log return, per origin and horizon.

    Row ``t`` uses information up to and including ``log_returns[t]`` (see the module docstring);
    column ``j`` is horizon ``horizons[j]`` bars. The distribution of ``Y[t, j]`` is

    * ``dist == "normal"``: ``N(mean, scale^2)`` (``std == scale``);
    * ``dist == "t"``: ``mean + scale * T_df`` (location-scale Student-t, ``std = scale*sqrt(df/(df-2))``).

    Attributes:
        name: baseline name ("ewma_normal", "rolling_normal", "garch_t").
        horizons: ``(H,)`` horizons in bars.
        mean: ``(T, H)`` location (the mean; 0 for the zero-mean baselines). NaN = no forecast.
        scale: ``(T, H)`` scale parameter. NaN = no forecast.
        dist: "normal" or "t".
        df: ``(T, H)`` degrees of freedom when ``dist == "t"``, else None.
        origin_index: ``(T,)`` index into the original ``log_returns`` of each row (``arange(T)``
            unless the forecast was :meth:`select`-ed).
        info: fitted parameters and settings (JSON-friendly).
    """

    name: str
    horizons: IntArray
    mean: FloatArray
    scale: FloatArray
    dist: Literal["normal", "t"] = "normal"
    df: FloatArray | None = None
    origin_index: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mean.shape != self.scale.shape or self.mean.ndim != 2:
            raise ValueError(f"mean {self.mean.shape} and scale {self.scale.shape} must be equal (T, H)")
        if self.mean.shape[1] != self.horizons.shape[0]:
            raise ValueError("number of columns must equal len(horizons)")
        if self.dist == "t":
            if self.df is None or self.df.shape != self.mean.shape:
                raise ValueError("dist='t' needs df of shape (T, H)")
        elif self.dist != "normal":
            raise ValueError(f"unknown dist {self.dist!r}")
        if self.origin_index.shape[0] == 0 and self.mean.shape[0] > 0:
            object.__setattr__(self, "origin_index", np.arange(self.mean.shape[0], dtype=np.int64))
        if self.origin_index.shape != (self.mean.shape[0],):
            raise ValueError("origin_index must have shape (T,)")

    # -- shape helpers -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(T, H)``."""
        return (int(self.mean.shape[0]), int(self.mean.shape[1]))

    @property
    def std(self) -> FloatArray:
        """``(T, H)`` standard deviation of the forecast distribution."""
        if self.dist == "normal":
            return self.scale
        assert self.df is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            out: FloatArray = self.scale * np.sqrt(self.df / (self.df - 2.0))
        return out

    @property
    def valid(self) -> NDArray[np.bool_]:
        """``(T, H)`` True where a forecast exists (finite mean and positive finite scale)."""
        ok = np.isfinite(self.mean) & np.isfinite(self.scale) & (self.scale > 0)
        if self.df is not None:
            ok &= np.isfinite(self.df)
        out: NDArray[np.bool_] = ok
        return out

    def horizon_index(self, h: int) -> int:
        """Column index of horizon ``h`` bars (ValueError if absent)."""
        hits = np.flatnonzero(self.horizons == h)
        if hits.size == 0:
            raise ValueError(f"horizon {h} not in {self.horizons.tolist()}")
        return int(hits[0])

    def select(self, rows: slice | ArrayLike) -> BaselineForecast:
        """Subset of origins (slice, integer indices or boolean mask over rows); keeps ``origin_index``."""
        idx: slice | NDArray[Any] = rows if isinstance(rows, slice) else np.atleast_1d(np.asarray(rows))
        return BaselineForecast(
            name=self.name,
            horizons=self.horizons,
            mean=self.mean[idx],
            scale=self.scale[idx],
            dist=self.dist,
            df=None if self.df is None else self.df[idx],
            origin_index=self.origin_index[idx],
            info=self.info,
        )

    # -- distribution functions ----------------------------------------------------------
    def _z(self, y: ArrayLike) -> FloatArray:
        out: FloatArray = (np.asarray(y, dtype=np.float64) - self.mean) / self.scale
        return out

    def quantiles(self, levels: Sequence[float] = QUANTILE_LEVELS) -> FloatArray:
        """``(T, H, Q)`` forecast quantiles of ``Y[t, j]`` at ``levels``."""
        lv = np.asarray(levels, dtype=np.float64)
        if self.dist == "normal":
            std_q = special.ndtri(lv)[None, None, :]
        else:
            assert self.df is not None
            std_q = stats.t.ppf(lv[None, None, :], self.df[..., None])
        out: FloatArray = self.mean[..., None] + self.scale[..., None] * std_q
        return out

    def cdf(self, y: ArrayLike) -> FloatArray:
        """Predictive CDF ``F_{t,j}(y)``; ``y`` broadcastable to ``(T, H)`` -> ``(T, H)``.

        At the realised target this is the PIT.
        """
        z = self._z(y)
        if self.dist == "normal":
            out: FloatArray = special.ndtr(z)
        else:
            assert self.df is not None
            out = stats.t.cdf(z, self.df)
        return out

    def log_score(self, y: ArrayLike) -> FloatArray:
        """Negative log predictive density at ``y`` -> ``(T, H)`` (lower is better)."""
        z = self._z(y)
        if self.dist == "normal":
            lp = stats.norm.logpdf(z)
        else:
            assert self.df is not None
            lp = stats.t.logpdf(z, self.df)
        out: FloatArray = -(lp - np.log(self.scale))
        return out

    def crps(self, y: ArrayLike) -> FloatArray:
        """Closed-form CRPS at ``y`` (broadcastable to ``(T, H)``) -> ``(T, H)``."""
        if self.dist == "normal":
            return crps_normal(self.mean, self.scale, y)
        assert self.df is not None
        return crps_student_t(self.mean, self.scale, self.df, y)

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> FloatArray:
        """``(T, H, n)`` draws of ``Y[t, j]`` (NaN rows stay NaN). Memory is ``T*H*n*8`` bytes."""
        gen = np.random.default_rng(rng)
        t_, h_ = self.shape
        if self.dist == "normal":
            z = gen.standard_normal((t_, h_, n))
        else:
            assert self.df is not None
            df = np.where(np.isfinite(self.df), self.df, 1.0)
            z = gen.standard_t(df[..., None], size=(t_, h_, n))
        out: FloatArray = self.mean[..., None] + self.scale[..., None] * z
        return out


# -------------------------------------------------------------------------------- helpers


def log_returns_from_closes(closes: ArrayLike) -> FloatArray:
    """``r[t] = log(closes[t + 1] / closes[t])`` -> ``(len(closes) - 1,)``."""
    c = np.asarray(closes, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError("closes must be 1-D")
    out: FloatArray = np.diff(np.log(c))
    return out


def _check_returns(log_returns: ArrayLike) -> FloatArray:
    r = np.asarray(log_returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"log_returns must be 1-D, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("log_returns must be finite (fill or drop gaps before forecasting)")
    return r


def _check_horizons(horizons_bars: Sequence[int] | ArrayLike) -> IntArray:
    h = np.atleast_1d(np.asarray(horizons_bars))
    if h.ndim != 1 or h.size == 0 or not np.issubdtype(h.dtype, np.integer) or np.any(h < 1):
        raise ValueError(
            f"horizons_bars must be a non-empty sequence of positive ints, got {horizons_bars!r}"
        )
    return h.astype(np.int64)


def realised_cum_returns(log_returns: ArrayLike, horizons_bars: Sequence[int] | ArrayLike) -> FloatArray:
    """Targets aligned with the forecasts: ``Y[t, j] = sum_{k=1..h_j} r[t + k]`` -> ``(T, H)``.

    NaN where the window runs past the end (``t + h_j > T - 1``).
    """
    r = np.asarray(log_returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError("log_returns must be 1-D")
    hs = _check_horizons(horizons_bars)
    t_ = r.size
    csum = np.concatenate([[0.0], np.cumsum(r)])  # csum[i] = sum_{k<i} r[k]
    out = np.full((t_, hs.size), np.nan)
    for j, h in enumerate(hs):
        n_ok = t_ - int(h)  # rows t = 0 .. T-h-1
        if n_ok > 0:
            t_idx = np.arange(n_ok)
            out[:n_ok, j] = csum[t_idx + h + 1] - csum[t_idx + 1]
    return out


def _normal_forecast(
    name: str, one_step_var: FloatArray, hs: IntArray, info: dict[str, Any], drift: FloatArray | None = None
) -> BaselineForecast:
    """iid-in-time scaling: ``std_h = sqrt(h * var_1)``, ``mean_h = h * drift`` (0 if drift is None)."""
    hf = hs.astype(np.float64)[None, :]
    scale = np.sqrt(one_step_var[:, None] * hf)
    mean = np.zeros_like(scale) if drift is None else drift[:, None] * hf
    mean = np.where(np.isfinite(scale), mean, np.nan)
    return BaselineForecast(name=name, horizons=hs, mean=mean, scale=scale, dist="normal", info=info)


# ------------------------------------------------------------------------------ baselines


def ewma_normal(
    log_returns: ArrayLike,
    horizons_bars: Sequence[int] | ArrayLike,
    lam: float = 0.94,
    seed_window: int = 20,
) -> BaselineForecast:
    """RiskMetrics EWMA: zero-mean Normal with ``sigma_h = sigma_t * sqrt(h)``.

    One-step variance forecast after observing ``r[t]``::

        v[seed_window - 1] = mean(r[0 : seed_window]^2)                 (seed)
        v[t] = lam * v[t - 1] + (1 - lam) * r[t]^2,   t >= seed_window

    Rows ``t < seed_window - 1`` are NaN. ``Y[t, j] ~ N(0, h_j * v[t])``.
    """
    if not 0.0 < lam < 1.0:
        raise ValueError("lam must be in (0, 1)")
    if seed_window < 1:
        raise ValueError("seed_window must be >= 1")
    r = _check_returns(log_returns)
    hs = _check_horizons(horizons_bars)
    t_ = r.size
    var = np.full(t_, np.nan)
    if t_ >= seed_window:
        v0 = float(np.mean(r[:seed_window] ** 2))
        var[seed_window - 1] = v0
        if t_ > seed_window:
            # y[n] = (1-lam) x[n] + lam y[n-1], y[-1] = v0  (zi = lam * v0 in transposed DF-II)
            filtered, _ = signal.lfilter([1.0 - lam], [1.0, -lam], r[seed_window:] ** 2, zi=[lam * v0])
            var[seed_window:] = filtered
    info = {"lam": lam, "seed_window": seed_window}
    return _normal_forecast("ewma_normal", var, hs, info)


def rolling_normal(
    log_returns: ArrayLike,
    horizons_bars: Sequence[int] | ArrayLike,
    window: int = 100,
    demean: bool = False,
) -> BaselineForecast:
    """Rolling-window Normal with square-root-of-time scaling.

    Over the window ``w = r[t - window + 1 : t + 1]`` (the last ``window`` returns, inclusive of t):

    * ``demean=False`` (default): ``Y[t, j] ~ N(0, h_j * mean(w^2))`` (zero-mean, like RiskMetrics);
    * ``demean=True``: ``Y[t, j] ~ N(h_j * mean(w), h_j * var(w, ddof=1))``.

    Rows ``t < window - 1`` are NaN.
    """
    if window < 2:
        raise ValueError("window must be >= 2")
    r = _check_returns(log_returns)
    hs = _check_horizons(horizons_bars)
    t_ = r.size
    var = np.full(t_, np.nan)
    drift = np.full(t_, np.nan) if demean else None
    if t_ >= window:
        w = np.lib.stride_tricks.sliding_window_view(r, window)  # row k = r[k : k + window] -> t = k+window-1
        if demean:
            assert drift is not None
            drift[window - 1 :] = w.mean(axis=1)
            var[window - 1 :] = w.var(axis=1, ddof=1)
        else:
            var[window - 1 :] = np.mean(w * w, axis=1)
    info = {"window": window, "demean": demean}
    return _normal_forecast("rolling_normal", var, hs, info, drift=drift)


def _garch_backcast(x: FloatArray) -> float:
    """arch's GARCH backcast: 0.94-exponentially weighted mean of the first min(75, n) squared values."""
    tau = min(75, x.size)
    w = 0.94 ** np.arange(tau)
    w = w / w.sum()
    return float(np.sum(x[:tau] ** 2 * w))


def garch_t(
    log_returns: ArrayLike,
    horizons_bars: Sequence[int] | ArrayLike,
    *,
    train_end_index: int | None = None,
    refit_every: int | None = None,
    scale: float | None = None,
    min_train: int = 250,
    multipliers: ArrayLike | None = None,
) -> BaselineForecast:
    """Zero-mean GARCH(1,1) with Student-t innovations (``arch``), fixed-parameter filtering.

    Fitting (no look-ahead into the evaluation period):
        ``arch_model(c * r[:fit_end], vol="GARCH", p=1, q=1, dist="t", mean="Zero")`` with
        ``fit_end = train_end_index`` (default ``T // 2``) and, if ``refit_every = k``, expanding-window
        refits at ``fit_end = train_end + k, train_end + 2k, ...``. The parameters of the fit on
        ``r[:fit_end]`` are used for rows ``fit_end - 1 <= t < next_fit_end - 1`` only, so every row uses
        parameters estimated from ``r[: t + 1]`` at most. Rows ``t < train_end_index - 1`` (in-sample)
        are NaN.

    ``c`` (``scale``) rescales returns for the optimiser; GARCH is scale-equivariant so results do
    not depend on it. Default: the power of ten putting ``std(r[:train_end])`` in [1, 10)
    (``c = 100`` for daily-like returns, larger for intraday FX bars).

    Variance (vectorised over all origins, fixed parameters)::

        v[t]   = omega + alpha * x[t]^2 + beta * v[t-1],   x = c * r,
        v[-1]  = omega + (alpha + beta) * backcast          (arch's sigma2[0]; backcast from r[:75])
        E[sigma^2_{t+k} | F_t] = e_k,   e_1 = v[t],   e_{k+1} = omega + (alpha + beta) * e_k
        Var(Y[t, j]) = sum_{k=1..h_j} e_k / c^2          (returns are serially uncorrelated)

    ``multipliers`` (T, max h), optional: the returns are deseasonalised (``r = raw / s``) and row t's
    raw h-bar variance is ``sum_k multipliers[t, k-1]^2 * e_k`` (Andersen–Bollerslev GARCH on
    deseasonalised returns); the same Student-t approximation applies.

    ``v`` reproduces ``res.conditional_volatility**2`` and the ``e_k`` reproduce
    ``res.forecast(horizon=h, reindex=False).variance`` (tested).

    Distribution approximation: the h-step sum of GARCH-t returns is not Student-t (its tails
    thin with aggregation). We use a location-scale Student-t with the fitted ``nu`` and the exact
    h-step variance: ``Y[t, j] ~ scale * T_nu``, ``scale = sqrt(Var(Y[t, j]) * (nu - 2) / nu)``.
    For h = 1 this is exact; for larger h it is somewhat heavy-tailed but variance-matched.
    """
    from arch import arch_model  # local import: arch is slow to import and only needed here

    r = _check_returns(log_returns)
    hs = _check_horizons(horizons_bars)
    t_ = r.size
    train_end = t_ // 2 if train_end_index is None else int(train_end_index)
    if not min_train <= train_end <= t_:
        raise ValueError(f"train_end_index={train_end} must be in [min_train={min_train}, T={t_}]")
    if refit_every is not None and refit_every < 1:
        raise ValueError("refit_every must be a positive int or None")

    if scale is None:
        sd = float(np.std(r[:train_end]))
        c = 10.0 ** (-math.floor(math.log10(sd))) if sd > 0 else 1.0
    else:
        c = float(scale)
    x = c * r
    m2 = None
    if multipliers is not None:
        m2 = np.asarray(multipliers, dtype=np.float64) ** 2
        if m2.shape[0] != t_ or m2.shape[1] < int(hs.max()):
            raise ValueError(f"multipliers must have shape (T, >= max horizon), got {m2.shape}")

    fit_ends = list(range(train_end, t_ + 1, refit_every)) if refit_every else [train_end]
    max_h = int(hs.max())
    mean = np.full((t_, hs.size), np.nan)
    scl = np.full((t_, hs.size), np.nan)
    dfs = np.full((t_, hs.size), np.nan)
    fits: list[dict[str, Any]] = []

    for i, fit_end in enumerate(fit_ends):
        row_lo = fit_end - 1
        row_hi = fit_ends[i + 1] - 1 if i + 1 < len(fit_ends) else t_
        if row_lo >= row_hi:
            continue
        am = arch_model(x[:fit_end], vol="GARCH", p=1, q=1, dist="t", mean="Zero", rescale=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning is recorded in info instead
            res = am.fit(disp="off", show_warning=False)
        p = res.params
        omega, alpha, beta, nu = (
            float(p["omega"]),
            float(p["alpha[1]"]),
            float(p["beta[1]"]),
            float(p["nu"]),
        )
        fits.append(
            {
                "fit_end": int(fit_end),
                "rows": [int(row_lo), int(row_hi)],
                "omega_scaled": omega,
                "omega": omega / (c * c),
                "alpha": alpha,
                "beta": beta,
                "nu": nu,
                "converged": int(res.convergence_flag) == 0,
                "loglik": float(res.loglikelihood),
            }
        )
        # causal conditional-variance filter over r[0 : row_hi] with these fixed parameters
        x2 = x[:row_hi] ** 2
        bc = _garch_backcast(x[:fit_end])
        v0 = omega + (alpha + beta) * bc  # arch: sigma2[0] = omega + (alpha + beta) * backcast
        v, _ = signal.lfilter([1.0], [1.0, -beta], omega + alpha * x2, zi=[beta * v0])
        e = v[row_lo:row_hi]  # e_1 for rows in this block
        cum = np.zeros_like(e)
        phi = alpha + beta
        h_cols = {int(h): j for j, h in enumerate(hs)}
        for k in range(1, max_h + 1):
            cum = cum + (e if m2 is None else e * m2[row_lo:row_hi, k - 1])
            if k in h_cols:
                var_h = cum / (c * c)
                j = h_cols[k]
                scl[row_lo:row_hi, j] = np.sqrt(var_h * (nu - 2.0) / nu)
                mean[row_lo:row_hi, j] = 0.0
                dfs[row_lo:row_hi, j] = nu
            e = omega + phi * e

    # duplicated horizons share the column computed for the first occurrence
    for j, h in enumerate(hs):
        j0 = int(np.flatnonzero(hs == h)[0])
        if j0 != j:
            mean[:, j], scl[:, j], dfs[:, j] = mean[:, j0], scl[:, j0], dfs[:, j0]

    info = {"train_end_index": train_end, "refit_every": refit_every, "scale": c, "fits": fits}
    return BaselineForecast(name="garch_t", horizons=hs, mean=mean, scale=scl, dist="t", df=dfs, info=info)


def seasonal_ewma_normal(
    deseasonalised_var: ArrayLike,
    multipliers: ArrayLike,
    horizons_bars: Sequence[int] | ArrayLike,
    info: dict[str, Any] | None = None,
) -> BaselineForecast:
    """Seasonal EWMA (Andersen–Bollerslev): zero-mean Normal with
    ``Var(Y[t, j]) = v[t] * sum_{k=1..h_j} multipliers[t, k-1]^2``, where ``v[t]`` is the EWMA
    variance of the deseasonalised returns after bar t and ``multipliers[t, k-1]`` the intraday
    volatility multiplier of the k-th bar ahead (see ``worker.features.seasonal``). NaN rows stay NaN.
    """
    v = np.asarray(deseasonalised_var, dtype=np.float64)
    m2 = np.asarray(multipliers, dtype=np.float64) ** 2
    hs = _check_horizons(horizons_bars)
    if v.ndim != 1 or m2.shape[0] != v.shape[0] or m2.shape[1] < int(hs.max()):
        raise ValueError(f"need v (T,) and multipliers (T, >= max horizon); got {v.shape}, {m2.shape}")
    cum = np.cumsum(m2, axis=1)[:, hs - 1]
    scale = np.sqrt(v[:, None] * cum)
    mean = np.where(np.isfinite(scale), 0.0, np.nan)
    return BaselineForecast(name="seasonal_ewma", horizons=hs, mean=mean, scale=scale, dist="normal",
                            info=info or {})

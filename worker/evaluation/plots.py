"""Evaluation figures (PNG). Uses matplotlib's object API with the Agg canvas directly: no pyplot
global state, no display, safe to call from worker threads."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from numpy.typing import ArrayLike

from worker.scoring.rules import CENTRAL_INTERVALS, QUANTILE_LEVELS, coverage

__all__ = ["calibration_plot", "compare_plot", "fan_chart"]

_BAND_COLOURS = {"90": "#c6dbef", "80": "#9ecae1", "50": "#4292c6"}
_DPI = 110


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    FigureCanvasAgg(fig)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")


def _level_col(levels: Sequence[float], level: float) -> int:
    lv = np.asarray(levels, dtype=np.float64)
    hits = np.flatnonzero(np.isclose(lv, level, rtol=0.0, atol=1e-9))
    if hits.size == 0:
        raise ValueError(f"level {level} missing from {list(levels)}")
    return int(hits[0])


def fan_chart(
    times: ArrayLike,
    closes: ArrayLike,
    forecast_quantiles_price: ArrayLike,
    realised_prices: ArrayLike,
    path: str | os.PathLike[str],
    *,
    horizon: Any = None,
    target_times: ArrayLike | None = None,
    levels: Sequence[float] = QUANTILE_LEVELS,
    title: str | None = None,
    horizon_label: str | None = None,
) -> None:
    """Fan chart of one horizon's forecasts against the realised price.

    Args:
        times: ``(N,)`` forecast origin times (datetime64 / datetime / numbers).
        closes: ``(N,)`` close price at each origin.
        forecast_quantiles_price: ``(N, Q)`` forecast *price* quantiles at ``levels`` for the target
            ``origin + horizon`` (e.g. ``closes[:, None] * exp(return_quantiles)``).
        realised_prices: ``(N,)`` realised close at each target (NaN if unknown).
        path: PNG output path.
        horizon: offset added to ``times`` to get target times (timedelta / timedelta64 / number of
            time units); ignored if ``target_times`` is given. One of the two is required.
        target_times: ``(N,)`` explicit target times.
        levels: the Q quantile levels (must contain 0.05, 0.10, 0.25, 0.75, 0.90, 0.95; 0.5 optional).

    The 50/80/90% central bands (q25-q75, q10-q90, q05-q95) and the median are drawn at the
    *target* times, so they line up with the realised price they forecast; realised points outside
    the 90% band are marked. Observed coverages are given in the legend.
    """
    t0 = np.asarray(times)
    c = np.asarray(closes, dtype=np.float64)
    q = np.asarray(forecast_quantiles_price, dtype=np.float64)
    yr = np.asarray(realised_prices, dtype=np.float64)
    n = t0.shape[0]
    if c.shape != (n,) or yr.shape != (n,) or q.shape != (n, len(levels)):
        raise ValueError(
            f"shape mismatch: times {t0.shape}, closes {c.shape}, quantiles {q.shape}, realised {yr.shape}"
        )
    if target_times is not None:
        tt = np.asarray(target_times)
        if tt.shape != (n,):
            raise ValueError("target_times must have shape (N,)")
    elif horizon is not None:
        tt = t0 + horizon
    else:
        raise ValueError("give target_times or horizon to shift the forecasts to their target time")

    fig = Figure(figsize=(11, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    for name in ("90", "80", "50"):
        lo_lvl, hi_lvl = CENTRAL_INTERVALS[name]
        lo, hi = q[:, _level_col(levels, lo_lvl)], q[:, _level_col(levels, hi_lvl)]
        ok = np.isfinite(yr) & np.isfinite(lo) & np.isfinite(hi)
        cov = coverage(lo[ok], hi[ok], yr[ok]) if ok.any() else float("nan")
        ax.fill_between(
            tt, lo, hi, color=_BAND_COLOURS[name], linewidth=0, label=f"{name}% band (observed {cov:.0%})"
        )
    try:
        med = q[:, _level_col(levels, 0.5)]
        ax.plot(tt, med, color="#08519c", linewidth=1.0, linestyle="--", label="forecast median")
    except ValueError:
        pass
    ax.plot(t0, c, color="0.55", linewidth=0.8, label="close at origin")
    ax.plot(tt, yr, color="black", linewidth=1.2, label="realised price at target")
    lo90 = q[:, _level_col(levels, 0.05)]
    hi90 = q[:, _level_col(levels, 0.95)]
    miss = np.isfinite(yr) & ((yr < lo90) | (yr > hi90))
    if miss.any():
        ax.scatter(np.asarray(tt)[miss], yr[miss], s=14, color="#d62728", zorder=5, label="outside 90% band")
    hl = horizon_label if horizon_label is not None else (str(horizon) if horizon is not None else "h")
    ax.set_title(title or f"Forecast fan chart, horizon {hl} (bands at target time)")
    ax.set_xlabel("target time")
    ax.set_ylabel("price")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.autofmt_xdate()
    fig.tight_layout()
    _save(fig, path)


def calibration_plot(
    pit_hist_by_name: Mapping[str, ArrayLike],
    coverage_by_name: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> None:
    """PIT histograms (one panel per model/baseline) plus a nominal-vs-observed coverage panel.

    Args:
        pit_hist_by_name: name -> PIT histogram counts over equal-width bins on [0, 1]
            (e.g. :func:`~worker.scoring.rules.pit_histogram`). Drawn as density, with the
            uniform (calibrated) level 1 as a dashed line.
        coverage_by_name: name -> ``{"50": c50, "80": c80, "90": c90}`` observed coverage as
            fractions in [0, 1] (e.g. :func:`~worker.scoring.rules.interval_coverages`); None
            values are skipped.
        path: PNG output path.
    """
    names = list(pit_hist_by_name)
    n_panels = len(names) + 1
    ncols = min(n_panels, 4)
    nrows = int(np.ceil(n_panels / ncols))
    fig = Figure(figsize=(3.6 * ncols, 3.2 * nrows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        counts = np.asarray(pit_hist_by_name[name], dtype=np.float64)
        bins = counts.size
        total = counts.sum()
        dens = counts * bins / total if total > 0 else counts
        edges = np.linspace(0.0, 1.0, bins + 1)
        ax.bar(edges[:-1], dens, width=1.0 / bins, align="edge", color="#6baed6", edgecolor="white")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="uniform")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, max(2.0, float(np.max(dens, initial=0.0)) * 1.1))
        ax.set_title(f"PIT: {name} (n={int(total)})", fontsize=9)
        ax.set_xlabel("PIT value")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper center")

    ax = fig.add_subplot(nrows, ncols, n_panels)
    nominal = [int(k) for k in CENTRAL_INTERVALS]
    ax.plot([40, 100], [40, 100], color="black", linestyle="--", linewidth=1.0, label="ideal")
    markers = "osD^v<>ph*"
    for i, (name, cov) in enumerate(coverage_by_name.items()):
        pts = [(nom, cov.get(str(nom))) for nom in nominal]
        xs = [nom for nom, v in pts if v is not None and np.isfinite(v)]
        ys = [100.0 * float(v) for _, v in pts if v is not None and np.isfinite(v)]
        if xs:
            ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.0, label=name)
    observed = [100.0 * float(v) for cov in coverage_by_name.values() for v in cov.values() if v is not None]
    ax.set_xlim(40, 100)
    ax.set_ylim(min([40.0, *[o - 5.0 for o in observed if np.isfinite(o)]]), 100)
    ax.set_xticks(nominal)
    ax.set_xlabel("nominal coverage (%)")
    ax.set_ylabel("observed coverage (%)")
    ax.set_title("Central-interval coverage", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def compare_plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> None:
    """Sampler comparison: CRPS vs NFE and wall time vs NFE, one line per scheduler.

    Args:
        rows: dicts with keys ``scheduler`` (str), ``steps`` (int), ``nfe`` (int, network function
            evaluations), ``wall_ms`` (float) and ``crps`` (float). A row with a truthy
            ``"reference"`` key is drawn as a horizontal reference line instead of a point.
        reference: optional ``{"crps": float, "wall_ms": float, "label": str}`` reference (e.g. the
            full-step sampler or the best baseline); each present metric becomes a horizontal line.
        path: PNG output path.
    """
    refs: list[Mapping[str, Any]] = [r for r in rows if r.get("reference")]
    if reference is not None:
        refs.append(reference)
    points = [r for r in rows if not r.get("reference")]
    schedulers: list[str] = []
    for r in points:
        if str(r["scheduler"]) not in schedulers:
            schedulers.append(str(r["scheduler"]))

    fig = Figure(figsize=(11, 4.4))
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    metrics = (("crps", "CRPS (lower is better)"), ("wall_ms", "wall time per forecast (ms)"))
    nfes = [float(r["nfe"]) for r in points if float(r["nfe"]) > 0]
    log_x = bool(nfes) and max(nfes) / min(nfes) >= 10
    ref_styles = ["--", ":", "-."]
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for s in schedulers:
            pts = sorted((float(r["nfe"]), float(r[key]), r) for r in points if str(r["scheduler"]) == s)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.2, label=s)
        for i, ref in enumerate(refs):
            if key in ref and ref[key] is not None:
                lab = str(ref.get("label", ref.get("scheduler", "reference")))
                ax.axhline(
                    float(ref[key]),
                    color="black",
                    linestyle=ref_styles[i % 3],
                    linewidth=1.0,
                    label=f"{lab} ({float(ref[key]):.4g})",
                )
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
        if key == "wall_ms":
            vals = [float(r[key]) for r in [*points, *refs] if r.get(key) is not None and float(r[key]) > 0]
            if vals and max(vals) / min(vals) >= 10:
                ax.set_yscale("log")
        ax.set_xlabel("NFE (network function evaluations)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Accuracy vs cost")
    axes[1].set_title("Latency vs cost")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def coverage_by_hour_plot(
    by_horizon: Mapping[str, Mapping[str, Sequence[float | None]]],
    path: str | os.PathLike[str],
    *,
    floor: float = 0.80,
    title: str | None = None,
) -> None:
    """90 % interval coverage per hour of the day, one panel per horizon, one line per forecaster.

    Args:
        by_horizon: ``{horizon label: {forecaster name: [coverage for hour 0..23 or None]}}``.
    """
    fig = Figure(figsize=(4.2 * max(1, len(by_horizon)), 3.8))
    for i, (label, series) in enumerate(by_horizon.items()):
        ax = fig.add_subplot(1, max(1, len(by_horizon)), i + 1)
        for name, values in series.items():
            hours = [h for h, v in enumerate(values) if v is not None]
            ax.plot(hours, [float(values[h] or 0.0) for h in hours], marker="o", markersize=3, linewidth=1.2,
                    label=name)
        ax.axhline(0.90, color="black", linestyle="--", linewidth=1.0, label="nominal 90 %")
        ax.axhline(floor, color="red", linestyle=":", linewidth=1.0, label=f"floor {floor:.0%}")
        ax.set_ylim(0.6, 1.0)
        ax.set_xticks(range(0, 24, 3))
        ax.set_xlabel("hour of the origin (New York)")
        ax.set_ylabel("coverage of the 90 % interval")
        ax.set_title(f"{label} ahead")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)

"""Offline evaluation of probabilistic return forecasts: scoring rules, closed-form baselines, plots.

Pure numpy/scipy/arch/matplotlib (no torch, Kafka or Redis). ``scores`` and ``baselines`` are
re-exported here; the plotting functions are loaded lazily (matplotlib is only imported when a
plot function is first accessed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.evaluation.baselines import (
    BaselineForecast,
    ewma_normal,
    garch_t,
    log_returns_from_closes,
    realised_cum_returns,
    rolling_normal,
)
from worker.evaluation.scores import (
    CENTRAL_INTERVALS,
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

if TYPE_CHECKING:
    from worker.evaluation.plots import calibration_plot, compare_plot, fan_chart

_LAZY_PLOTS = frozenset({"calibration_plot", "compare_plot", "fan_chart"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_PLOTS:
        from worker.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CENTRAL_INTERVALS",
    "QUANTILE_LEVELS",
    "BaselineForecast",
    "calibration_plot",
    "calibration_summary",
    "compare_plot",
    "coverage",
    "crps_normal",
    "crps_samples",
    "crps_student_t",
    "energy_distance",
    "ewma_normal",
    "fan_chart",
    "garch_t",
    "interval_coverages",
    "log_returns_from_closes",
    "pinball",
    "pinball_loss",
    "pit_from_cdf",
    "pit_from_samples",
    "pit_histogram",
    "realised_cum_returns",
    "rolling_normal",
    "summarise",
    "wasserstein_1",
]

"""Candles for ``signal-worker demo``: real 5-minute bars of the five FX pairs from January 2024
(the validation month, which the model never trained on; never February on, which is reserved),
and the one-line view of the worker's live calibration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from worker.data import fx
from worker.features.candles import CandleSeries, to_ms

DEMO_START = "2024-01-08"  # the first full week after the New-Year close


def demo_candles(start: str = DEMO_START, bars: int = 600, pairs: Sequence[str] = fx.PAIRS,
                 warm_up: int = 0, timeframe_ms: int = 300_000) -> dict[str, CandleSeries]:
    """Per pair: ``warm_up`` bars before ``start`` (the model's history) and then ``bars`` bars,
    all inside January 2024. Raises :class:`fx.DataUnavailable` (with the install command) when the
    tradetide wheel is missing."""
    begin = to_ms(start)
    if not fx.VALIDATION_START <= begin < fx.RESERVED_FROM:
        raise ValueError("the demo replays January 2024 (the validation month): --start must be in it")
    out = {}
    for pair in pairs:
        series = fx.load_pair(pair, timeframe_ms)
        i = int(np.searchsorted(series.open_time, begin))
        out[pair] = series[max(0, i - warm_up) : i + bars]
    return out


def calibration_line(summary: Mapping[str, Mapping[str, float]], order: Sequence[str] = ("15m", "1h", "4h")) -> str:
    """The online scorer's rolling scores as one line: coverage of the 50/80/90 % intervals (ideal:
    the nominal level) and CRPS per horizon."""
    parts = []
    for label in [*[o for o in order if o in summary], *[k for k in summary if k not in order]]:
        s = summary[label]
        parts.append(f"{label}: n={int(s['n'])} cov50/80/90={s['coverage_50']:.0%}/{s['coverage_80']:.0%}/"
                     f"{s['coverage_90']:.0%} CRPS={s['crps'] * 1e4:.2f}bp")
    return "[calibration] " + (" | ".join(parts) if parts else "waiting for the first horizons to realise")

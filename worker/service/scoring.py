"""Online scoring: when the bar that realises a forecast's horizon arrives, score that forecast.

Forecasts wait in memory with their samples; each window write for a symbol looks up whether the
bar ``h`` bars of the stream after the origin is now in the window. Rolling CRPS and interval
coverage per horizon (last ``window`` scores) are what the worker exports, so a drifting or
miscalibrated model shows on a dashboard the same day. Pending forecasts of partitions that move
to another replica are dropped (scoring is best-effort; forecasts are not).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from schemas.timeframe import format_duration

if TYPE_CHECKING:  # annotations only: the scorer needs the pure scoring package, not the model
    from worker.model.forecaster import Forecast
from worker.scoring.rules import crps_samples
from worker.state.windows import WindowSnapshot

_INTERVALS = {"50": (2, 4), "80": (1, 5), "90": (0, 6)}  # indices into the 7 quantiles


@dataclass
class _Pending:
    forecast: Forecast
    samples: np.ndarray | None  # (S, K)
    scored: set[int] = field(default_factory=set)  # horizon indices already scored


@dataclass
class HorizonScore:
    crps: deque[float] = field(default_factory=deque)
    hits: dict[str, deque[bool]] = field(default_factory=lambda: {k: deque() for k in _INTERVALS})


class OnlineScorer:
    def __init__(self, window: int = 500, max_pending_per_symbol: int = 1024) -> None:
        self.window = window
        self.max_pending = max_pending_per_symbol
        self._pending: dict[str, deque[_Pending]] = {}
        self.scores: dict[str, HorizonScore] = {}

    def add(self, forecast: Forecast, samples: np.ndarray | None) -> None:
        q = self._pending.setdefault(forecast.symbol, deque(maxlen=self.max_pending))
        q.append(_Pending(forecast, samples))

    def drop(self, symbols: set[str]) -> None:
        for s in symbols:
            self._pending.pop(s, None)

    def observe(self, snapshot: WindowSnapshot) -> list[tuple[str, float, dict[str, bool]]]:
        """Score every pending forecast of this symbol whose horizon bar is now in the window.
        Returns (horizon label, crps, interval hits) for each newly scored horizon."""
        q = self._pending.get(snapshot.symbol)
        if not q:
            return []
        times = snapshot.open_times()
        closes = snapshot.ohlcv()[:, 3]
        out: list[tuple[str, float, dict[str, bool]]] = []
        keep: deque[_Pending] = deque(maxlen=self.max_pending)
        for p in q:
            f = p.forecast
            pos = int(np.searchsorted(times, f.open_time))
            if pos >= len(times) or times[pos] != f.open_time:
                if len(times) and f.open_time < times[0]:
                    continue  # trimmed out of the window: can no longer be scored
                keep.append(p)
                continue
            remaining = False
            for k, h in enumerate(f.horizons):
                if k in p.scored:
                    continue
                target = pos + h.bars
                if target >= len(times):
                    remaining = True
                    continue
                y = float(np.log(closes[target] / f.close))
                if p.samples is not None:
                    crps = float(crps_samples(p.samples[None, :, k], np.array([y]))[0])
                else:  # quantile-only forecasts: mean pinball loss over the 7 levels, times 2
                    crps = _quantile_crps(h.quantiles, y)
                hits = {name: h.quantiles[lo] <= y <= h.quantiles[hi] for name, (lo, hi) in _INTERVALS.items()}
                label = format_duration(h.horizon_ms)
                self._record(label, crps, hits)
                out.append((label, crps, hits))
                p.scored.add(k)
            if remaining:
                keep.append(p)
        self._pending[snapshot.symbol] = keep
        return out

    def _record(self, label: str, crps: float, hits: dict[str, bool]) -> None:
        s = self.scores.setdefault(label, HorizonScore())
        s.crps.append(crps)
        if len(s.crps) > self.window:
            s.crps.popleft()
        for name, hit in hits.items():
            s.hits[name].append(hit)
            if len(s.hits[name]) > self.window:
                s.hits[name].popleft()

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            label: {"crps": float(np.mean(s.crps)), **{f"coverage_{k}": float(np.mean(v)) for k, v in s.hits.items()},
                    "n": float(len(s.crps))}
            for label, s in self.scores.items() if s.crps
        }


def _quantile_crps(quantiles: tuple[float, ...], y: float) -> float:
    from schemas.forecast import QUANTILE_LEVELS

    loss = [max(lv * (y - q), (lv - 1) * (y - q)) for lv, q in zip(QUANTILE_LEVELS, quantiles, strict=True)]
    return 2.0 * float(np.mean(loss))

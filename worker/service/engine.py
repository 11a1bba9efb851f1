"""What the service calls to turn a micro-batch into forecasts, off the event loop.

``ModelEngine`` wraps the :class:`Forecaster`: each batch is prepared on the host and sampled on
the device, on its own CUDA stream from a pool when a GPU is present. A CUDA out-of-memory error
is retried once as two half batches; if that fails too, :class:`SamplingFailed` propagates and
the worker exits without committing, so the records are redelivered after a restart.

``TrivialEngine`` has the same interface and no model (a Normal with the window's realised
volatility): the I/O path alone, for benchmarks and transport tests.
"""

from __future__ import annotations

import itertools
import math
import queue
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from worker.errors import InsufficientHistory, SignalWorkerError
from worker.model.forecaster import Forecast, Forecaster, ForecastRequest, PreparedBatch
from worker.model.summary import QUANTILE_LEVELS, HorizonStats
from worker.observability.logging import get_logger

_log = get_logger("worker.engine")


class SamplingFailed(SignalWorkerError):
    """A batch could not be sampled even after the out-of-memory retry."""


@dataclass
class EngineResult:
    forecasts: list[Forecast]
    samples: np.ndarray | None  # (G, S, K) cumulative log returns, aligned with ``forecasts``
    rejected: list[tuple[int, InsufficientHistory]] = field(default_factory=list)  # input index -> why


class Engine(Protocol):
    model_version: str
    scheduler: str
    device: str
    timeframe_ms: int
    horizons_ms: list[int]
    window_bars: int
    steps: int
    samples: int
    calibrated_for: str  # the sampler setting the calibration was fitted with, or "uncalibrated"

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult: ...


class ModelEngine:
    def __init__(self, forecaster: Forecaster, *, samples: int, steps: int, seed: int, cuda_streams: int = 2,
                 keep_samples: bool = True) -> None:
        self.forecaster = forecaster
        self.samples = samples
        self.steps = steps
        self.seed = seed
        self.keep_samples = keep_samples
        self.model_version = forecaster.model_version
        self.scheduler = forecaster.scheduler
        self.device = str(forecaster.device)
        self.timeframe_ms = forecaster.timeframe_ms
        self.horizons_ms = forecaster.horizons_ms
        self.window_bars = forecaster.window_bars
        # Served with another sampler setting than the calibration was fitted with: the intervals may
        # miss their levels by points. Said once, at start-up, where ops read the settings.
        fitted = forecaster.checkpoint.manifest.fitted_sampler()
        self.calibrated_for = fitted.label() if fitted else "uncalibrated"
        mismatch = forecaster.calibration_mismatch(steps)
        if mismatch:
            _log.warning("calibration_fitted_for_another_sampler", detail=mismatch, model_version=self.model_version,
                         scheduler=self.scheduler, steps=steps)
        uncalibrated = forecaster.uncalibrated_horizons()
        if uncalibrated:
            _log.warning("horizons_without_calibration", detail=uncalibrated, model_version=self.model_version)
        self._streams: queue.SimpleQueue[torch.cuda.Stream] | None = None
        if forecaster.device.type == "cuda":
            self._streams = queue.SimpleQueue()
            for _ in range(cuda_streams):
                self._streams.put(torch.cuda.Stream(device=forecaster.device))

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        batch = self.forecaster.prepare(requests)
        rejected = sorted(batch.rejected.items())
        stream = self._streams.get() if self._streams is not None else None
        try:
            forecasts, samples = self._run(batch, stream)
        finally:
            if stream is not None and self._streams is not None:
                self._streams.put(stream)
        return EngineResult(forecasts, samples, rejected)

    def _run(self, batch: PreparedBatch, stream: torch.cuda.Stream | None,
             retry: bool = True) -> tuple[list[Forecast], np.ndarray | None]:
        try:
            return self.forecaster.run_with_samples(
                batch, num_samples=self.samples, num_steps=self.steps, seed=self.seed, stream=stream,
                keep_samples=self.keep_samples,
            )
        except torch.cuda.OutOfMemoryError as exc:
            # Retry only after leaving this block: the exception's traceback holds the failed
            # attempt's frames and, through them, its GPU tensors, which empty_cache cannot free.
            failure = str(exc).splitlines()[0] if str(exc) else "out of memory"
        torch.cuda.empty_cache()
        if not retry or len(batch.requests) < 2:
            raise SamplingFailed(f"CUDA out of memory on a batch of {len(batch.requests)}: {failure}")
        half = len(batch.requests) // 2
        parts = [_slice(batch, slice(0, half)), _slice(batch, slice(half, None))]
        results = [self._run(p, stream, retry=False) for p in parts]
        forecasts = results[0][0] + results[1][0]
        samples = None
        if results[0][1] is not None and results[1][1] is not None:
            samples = np.concatenate([results[0][1], results[1][1]])
        return forecasts, samples


def _slice(batch: PreparedBatch, s: slice) -> PreparedBatch:
    assert batch.contexts is not None
    ctx = batch.contexts
    fields = {name: getattr(ctx, name)[s] for name in ctx.__dataclass_fields__}
    return PreparedBatch(requests=batch.requests[s], contexts=type(ctx)(**fields))


class TrivialEngine:
    """No model: zero-mean Normal with the window's realised volatility. Same output shape."""

    def __init__(self, *, timeframe_ms: int, horizons_ms: Sequence[int], window_bars: int = 8) -> None:
        self.model_version = "trivial-normal"
        self.scheduler = "none"
        self.calibrated_for = "uncalibrated"
        self.device = "cpu"
        self.timeframe_ms = timeframe_ms
        self.horizons_ms = sorted(horizons_ms)
        self.window_bars = window_bars
        self.steps = 1  # the contract counts at least one step, NFE and sample
        self.samples = 1
        self._z = [_norm_ppf(p) for p in QUANTILE_LEVELS]
        self._horizons = [(h, h // timeframe_ms, math.sqrt(h // timeframe_ms)) for h in self.horizons_ms]

    def process(self, requests: Sequence[ForecastRequest]) -> EngineResult:
        # Plain floats, not numpy: on a handful of bars numpy's per-call cost would dominate, and
        # this engine exists to show what the worker costs without a model.
        out: list[Forecast] = []
        rejected: list[tuple[int, InsufficientHistory]] = []
        for i, req in enumerate(requests):
            c = req.candles
            if len(c) < self.window_bars:
                rejected.append((i, InsufficientHistory("insufficient_history", f"{req.symbol}: {len(c)} bars")))
                continue
            closes = c.close[-self.window_bars :].tolist()
            close = closes[-1]
            logs = [math.log(v) for v in closes]
            sq = [(b - a) ** 2 for a, b in itertools.pairwise(logs)]
            sigma = math.sqrt(sum(sq) / len(sq)) or 1e-6
            hs = []
            for h, bars, root in self._horizons:
                s = sigma * root
                q = tuple([s * z for z in self._z])
                hs.append(HorizonStats(h, bars, 0.0, s, q, 0.5, close * math.exp(s * s / 2),
                                       tuple([close * math.exp(v) for v in q])))
            out.append(Forecast(req.symbol, int(c.open_time[-1]), close, tuple(hs), "none", 1, 1, 1, 0,
                                self.model_version))
        return EngineResult(out, None, rejected)


def _norm_ppf(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)

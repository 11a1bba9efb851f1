"""ModelEngine on the CPU: the out-of-memory half-batch retry (simulated) gives the forecasts an
unbroken run gives, and runs outside the failed attempt's exception (whose traceback would pin its
GPU tensors)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from worker.features.candles import CandleSeries, load_csv
from worker.model.forecaster import Forecaster, ForecastRequest
from worker.service.engine import ModelEngine, SamplingFailed

from .conftest import CHECKPOINT, needs_model

pytestmark = needs_model


def _requests(n: int) -> list[ForecastRequest]:
    from worker.cli.service_commands import SHIPPED_CANDLES

    series = load_csv(SHIPPED_CANDLES)
    ends = [400 + 37 * i for i in range(n)]
    return [ForecastRequest(f"S{i}", CandleSeries(series.open_time[:e], series.ohlcv[:e])) for i, e in enumerate(ends)]


@pytest.fixture(scope="module")
def forecaster() -> Forecaster:
    torch.set_num_threads(1)
    return Forecaster.load(CHECKPOINT, scheduler="dpmpp")


def _engine(forecaster: Forecaster) -> ModelEngine:
    return ModelEngine(forecaster, samples=8, steps=4, seed=5, keep_samples=True)


def test_oom_is_retried_as_two_halves_outside_the_failed_attempt(forecaster: Forecaster,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    requests = _requests(5)
    expected = _engine(forecaster).process(requests)
    real = forecaster.run_with_samples
    sizes: list[int] = []

    def flaky(batch: Any, **kw: Any) -> Any:
        sizes.append(len(batch.requests))
        if len(sizes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        assert sys.exc_info() == (None, None, None), "retried inside the except block"
        return real(batch, **kw)

    monkeypatch.setattr(forecaster, "run_with_samples", flaky)
    got = _engine(forecaster).process(requests)
    assert sizes == [5, 2, 3]
    assert [(f.symbol, f.open_time) for f in got.forecasts] == [(f.symbol, f.open_time) for f in expected.forecasts]
    for a, b in zip(got.forecasts, expected.forecasts, strict=True):  # per symbol/bar seeds: batch-independent
        for ha, hb in zip(a.horizons, b.horizons, strict=True):
            assert (ha.mean, ha.std, *ha.quantiles) == pytest.approx((hb.mean, hb.std, *hb.quantiles), rel=1e-4,
                                                                     abs=1e-9)
    assert got.samples is not None and expected.samples is not None
    assert got.samples.shape == expected.samples.shape


def test_oom_of_a_half_fails_the_batch(forecaster: Forecaster, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(batch: Any, **kw: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(forecaster, "run_with_samples", oom)
    with pytest.raises(SamplingFailed, match="out of memory on a batch of 2"):
        _engine(forecaster).process(_requests(4))


def test_serving_another_sampler_than_the_calibration_was_fitted_with_is_logged_once_at_start() -> None:
    import io
    import json

    from worker.observability import configure_logging

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    calibrated = Forecaster.load("eurusd-1h", scheduler="unipc")  # fitted with DPM-Solver++ at 10 steps
    ModelEngine(calibrated, samples=8, steps=5, seed=0)
    ModelEngine(calibrated.with_scheduler("dpmpp"), samples=8, steps=10, seed=0)  # as fitted: nothing to say
    ModelEngine(Forecaster.load("eurusd-1h-v1", scheduler="unipc"), samples=8, steps=5, seed=0)  # uncalibrated
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    warned = [e for e in events if e["event"] == "calibration_fitted_for_another_sampler"]
    assert len(warned) == 1
    assert warned[0]["level"] == "warning" and warned[0]["scheduler"] == "unipc" and warned[0]["steps"] == 5
    assert "dpmpp 10 steps" in warned[0]["detail"]
    assert not [e for e in events if e["event"] == "horizons_without_calibration"]
    ModelEngine(Forecaster.load(horizons="15m,30m,1h"), samples=8, steps=10, seed=0)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    uncalibrated = [e for e in events if e["event"] == "horizons_without_calibration"]
    assert len(uncalibrated) == 1 and "horizons 30m" in uncalibrated[0]["detail"]
    # What model_info carries beside scheduler and steps (a pod serving another setting shows in it).
    assert ModelEngine(calibrated, samples=8, steps=5, seed=0).calibrated_for == "dpmpp 10 steps"
    assert ModelEngine(Forecaster.load("eurusd-1h-v1"), samples=8, steps=5, seed=0).calibrated_for == "uncalibrated"

"""CUDA-only checks; they skip cleanly on machines without a GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from worker.features.candles import CandleSeries
from worker.model.checkpoint import Checkpoint, load_checkpoint
from worker.model.forecaster import Forecaster, ForecastRequest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _stats(f: object) -> np.ndarray:
    return np.array([[h.mean, h.std, h.p_up, *h.quantiles] for h in f.horizons])  # type: ignore[attr-defined]


def test_cuda_forecast_matches_cpu(tiny_ckpt_dir: object, eurusd: CandleSeries) -> None:
    books = {"A": eurusd[:3000], "B": eurusd[:4000]}
    cpu = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu").forecast(books, num_samples=256, seed=1)  # type: ignore[arg-type]
    gpu = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cuda").forecast(books, num_samples=256, seed=1)  # type: ignore[arg-type]
    for s in books:  # same CPU generators -> same noise; only float reduction order differs
        np.testing.assert_allclose(_stats(gpu[s]), _stats(cpu[s]), rtol=1e-3, atol=1e-6)


def test_batches_on_two_streams_equal_sequential_runs(tiny_ckpt: Checkpoint, eurusd: CandleSeries) -> None:
    fc = Forecaster(tiny_ckpt, device="cuda")
    batches = [fc.prepare([ForecastRequest(f"S{i}{j}", eurusd[: 2000 + 100 * i + j]) for j in range(8)])
               for i in range(2)]
    sequential = [fc.run(b, num_samples=128, num_steps=10, seed=3) for b in batches]
    streams = [torch.cuda.Stream() for _ in batches]
    results: list[object] = [None, None]

    def work(i: int) -> None:
        results[i] = fc.run(batches[i], num_samples=128, num_steps=10, seed=3, stream=streams[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, par in zip(sequential, results, strict=True):
        for a, b in zip(seq, par, strict=True):  # type: ignore[call-overload]
            np.testing.assert_allclose(_stats(a), _stats(b), rtol=1e-5, atol=1e-7)


def test_engine_with_more_batches_in_flight_than_streams(tiny_ckpt: Checkpoint, eurusd: CandleSeries) -> None:
    """Four executor threads share two streams (and their pinned buffers and kernel caches) as the
    worker's sampler does; batches of different sizes reuse each stream's buffers."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.service.engine import ModelEngine

    engine = ModelEngine(Forecaster(tiny_ckpt, device="cuda"), samples=64, steps=8, seed=3, cuda_streams=2)
    batches = [[ForecastRequest(f"S{i}{j}", eurusd[: 2000 + 50 * i + j]) for j in range(2 + 3 * (i % 3))]
               for i in range(8)]
    sequential = [engine.process(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(engine.process, batches))
    for seq, par in zip(sequential, concurrent, strict=True):
        assert [f.symbol for f in seq.forecasts] == [f.symbol for f in par.forecasts]
        for a, b in zip(seq.forecasts, par.forecasts, strict=True):
            np.testing.assert_allclose(_stats(a), _stats(b), rtol=1e-5, atol=1e-7)

"""CUDA-only checks; they skip cleanly on machines without a GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from worker.features.candles import CandleSeries
from worker.model import graphs
from worker.model.checkpoint import Checkpoint, load_checkpoint
from worker.model.forecaster import Forecaster, ForecastRequest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _stats(f: object) -> np.ndarray:
    return np.array([[h.mean, h.std, h.p_up, *h.quantiles] for h in f.horizons])  # type: ignore[attr-defined]


def test_cuda_forecast_matches_cpu(tiny_ckpt_dir: object, eurusd: CandleSeries) -> None:
    books = {"A": eurusd[:2990], "B": eurusd[:4000]}  # 2999: the week's last bar
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


def _five_minute(series: CandleSeries, start_ms: int = 1_704_700_800_000) -> CandleSeries:
    """Real EURUSD prices on a 5-minute clock from Monday 2024-01-08 00:00 UTC: the default model's
    timeframe, without the tradetide wheel (the GPU machine has none)."""
    return CandleSeries(start_ms + 300_000 * np.arange(len(series), dtype=np.int64), series.ohlcv.copy())


def test_default_model_through_cuda_graphs_equals_eager_sampling(eurusd: CandleSeries) -> None:
    """The shipped 5-minute model (48-bar paths): the Forecaster's graph path gives the eager
    path's samples, on the first (captured) call and on replays with other inputs and row counts
    in the same bucket."""
    eager = Forecaster.load(device="cuda", cuda_graphs=False)
    graphed = Forecaster.load(device="cuda", cuda_graphs=True)
    stream = torch.cuda.Stream()
    model = graphed.checkpoint.model
    graphs.clear_graphs(model)
    for call, (offset, symbols) in enumerate(((0, 8), (900, 7), (1800, 5))):
        # 512, 448 and 320 rows: one 512-row bucket, the last two calls with padding rows
        books = [ForecastRequest(f"S{i}", _five_minute(eurusd[offset + 100 * i: offset + 100 * i + 600]))
                 for i in range(symbols)]
        batch = graphed.prepare(books)
        assert batch.contexts is not None and len(batch.requests) == len(books)
        want, want_paths = eager.run_with_samples(batch, num_samples=64, num_steps=10, seed=7)
        got, got_paths = graphed.run_with_samples(batch, num_samples=64, num_steps=10, seed=7, stream=stream)
        assert want_paths is not None and got_paths is not None
        assert float(np.abs(got_paths - want_paths).max()) <= 1e-5, f"call {call}"
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(_stats(b), _stats(a), rtol=1e-5, atol=1e-7)
    captured = graphs._graphs[model]
    assert len(captured) == 1 and all(isinstance(g, graphs.SamplingGraph) and g.graph is not None
                                      for g in captured.values())


def test_engine_samples_through_graphs_on_its_streams(tiny_ckpt: Checkpoint, eurusd: CandleSeries) -> None:
    """The worker's engine with graphs on and off: the same forecasts, and each of its streams holds
    its own captured graphs."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.service.engine import ModelEngine

    batches = [[ForecastRequest(f"S{i}{j}", eurusd[: 2000 + 50 * i + j]) for j in range(1 + i % 4)]
               for i in range(6)]
    off = ModelEngine(Forecaster(tiny_ckpt, device="cuda", cuda_graphs=False), samples=64, steps=8, seed=3,
                      cuda_streams=2)
    on = ModelEngine(Forecaster(tiny_ckpt, device="cuda", cuda_graphs=True), samples=64, steps=8, seed=3,
                     cuda_streams=2)
    graphs.clear_graphs(tiny_ckpt.model)
    want = [off.process(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(on.process, batches))
    for a, b in zip(want, got, strict=True):
        for fa, fb in zip(a.forecasts, b.forecasts, strict=True):
            np.testing.assert_allclose(_stats(fb), _stats(fa), rtol=1e-5, atol=1e-7)
    captured = graphs._graphs[tiny_ckpt.model]
    assert captured and all(isinstance(g, graphs.SamplingGraph) and g.graph is not None for g in captured.values())

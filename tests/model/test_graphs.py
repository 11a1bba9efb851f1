"""The CUDA-graph sampling path. Its static-buffer plumbing (buckets, padding rows, the graph's own
copy of the folded weights) runs uncaptured on the CPU here; the captured graph itself is checked
against eager sampling in the CUDA-marked tests, which skip without a device (``make gpu-check``)."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.model import graphs
from worker.model.fused import run_dpmsolver, run_fused
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.s4d import clear_kernel_caches
from worker.model.samplers import fused_plan, plan_timesteps, sample_paths
from worker.model.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.cosine(200)
CFG = NetworkConfig(horizon=12, channels=16, state=8)


def _model(seed: int = 0) -> SSSDDenoiser:
    torch.manual_seed(seed)
    model = SSSDDenoiser(CFG)
    torch.nn.init.normal_(model.proj.weight, std=0.5)
    return model.eval()


def _call_inputs(model: SSSDDenoiser, groups: int, samples: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = groups * samples
    cond = torch.randn(n, CFG.channels, generator=g).to(device)
    ftime = torch.randn(n, CFG.horizon, CFG.time_features, generator=g).to(device)
    x = torch.randn(groups, samples, CFG.horizon, generator=g).to(device)
    return x, cond, ftime


def test_buckets_are_powers_of_two_from_the_minimum() -> None:
    assert graphs.bucket_rows(1) == graphs.MIN_BUCKET
    assert graphs.bucket_rows(64) == 64
    assert graphs.bucket_rows(65) == 128
    assert graphs.bucket_rows(1024) == 1024
    assert graphs.bucket_rows(1025) == 2048


def test_no_graph_on_the_cpu_or_for_a_plain_callable() -> None:
    model = _model()
    _x, cond, ftime = _call_inputs(model, 1, 4, 0, torch.device("cpu"))
    assert not graphs.graph_capable(model.bind(cond, ftime), torch.device("cpu"))
    assert not graphs.graph_capable(lambda x, t: x, torch.device("cuda"))


@pytest.mark.parametrize("sampler", ["dpmpp", "unipc"])
def test_uncaptured_graph_body_equals_the_eager_loop_across_calls_and_weight_changes(sampler: str) -> None:
    """Three calls through one (stream, bucket) graph: different row counts (stale padding rows from
    the previous call), different inputs, and a weight change through ``.data`` in between."""
    cpu = torch.device("cpu")
    model = _model(1)
    solver = fused_plan(sampler, SCHEDULE, 6)
    ts = plan_timesteps(solver, cpu)
    graphs.clear_graphs(model)
    for call, (groups, samples) in enumerate([(3, 20), (2, 16), (3, 20)]):
        if call == 2:
            model.blocks[0].gate.weight.data.mul_(1.3)
        clear_kernel_caches(model)  # as every sampling call does
        x, cond, ftime = _call_inputs(model, groups, samples, seed=call, device=cpu)
        with torch.inference_mode():
            bound = model.bind(cond, ftime)
            eager = run_fused(bound, x, solver, ts)
            graphed = graphs.sample_graphed(bound, x, solver, ts, capture=False)
        assert graphed.shape == eager.shape
        assert float((graphed - eager).abs().max()) <= 1e-5, f"call {call}"
    assert len(graphs._graphs[model]) == 1  # all three calls fit the 64-row bucket of this thread


def test_uncaptured_graphs_are_per_thread_lane() -> None:
    cpu = torch.device("cpu")
    model = _model(2)
    solver = fused_plan("dpmpp", SCHEDULE, 4)
    ts = plan_timesteps(solver, cpu)
    graphs.clear_graphs(model)
    x, cond, ftime = _call_inputs(model, 2, 8, seed=5, device=cpu)
    with torch.inference_mode():
        ref = run_dpmsolver(model.bind(cond, ftime), x, solver, ts)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                for _ in range(5):
                    out = graphs.sample_graphed(model.bind(cond, ftime), x, solver, ts, capture=False)
                    assert float((out - ref).abs().max()) <= 1e-5
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(graphs._graphs[model]) == 2


def test_a_failed_capture_warns_once_and_leaves_the_call_to_the_eager_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that raises (as torch does for an op that cannot be captured) is not retried on
    every call, and the sampler runs the same call eagerly."""
    cpu = torch.device("cpu")
    model = _model(5)
    solver = fused_plan("dpmpp", SCHEDULE, 4)
    ts = plan_timesteps(solver, cpu)
    graphs.clear_graphs(model)
    attempts: list[int] = []

    def failing_capture(self: graphs.SamplingGraph, *args: object, **kwargs: object) -> None:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.SamplingGraph, "__init__", failing_capture)
    x, cond, ftime = _call_inputs(model, 2, 8, seed=6, device=cpu)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="capture failed.*eagerly"):
            assert graphs.sample_graphed(model.bind(cond, ftime), x, solver, ts) is None
        assert graphs.sample_graphed(model.bind(cond, ftime), x, solver, ts) is None  # remembered: no retry
    assert len(attempts) == 1


# -- on a device ------------------------------------------------------------------------------------



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["dpmpp", "unipc"])
def test_captured_graph_equals_eager_on_cuda(sampler: str) -> None:
    dev = torch.device("cuda")
    model = _model(3).to(dev)
    graphs.clear_graphs(model)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        for call, (groups, samples) in enumerate([(4, 32), (3, 30), (4, 32)]):
            clear_kernel_caches(model)
            _x, cond, ftime = _call_inputs(model, groups, samples, seed=call, device=dev)
            gens = [torch.Generator().manual_seed(10 * call + g) for g in range(groups)]
            kw = {"schedule": SCHEDULE, "scheduler": sampler, "steps": 10, "groups": groups, "samples": samples,
                  "horizon": CFG.horizon, "device": dev}
            eager = sample_paths(model.bind(cond, ftime), generators=gens, **kw).paths  # type: ignore[arg-type]
            gens = [torch.Generator().manual_seed(10 * call + g) for g in range(groups)]
            graphed = sample_paths(model.bind(cond, ftime), generators=gens, cuda_graphs=True, **kw).paths  # type: ignore[arg-type]
            assert float((graphed - eager).abs().max()) <= 1e-5, f"call {call}"
    stream.synchronize()
    per_model = graphs._graphs[model]
    assert len(per_model) == 1 and all(g.graph is not None for g in per_model.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_on_two_streams_at_once_equal_sequential_eager() -> None:
    dev = torch.device("cuda")
    model = _model(4).to(dev)
    graphs.clear_graphs(model)
    solver = fused_plan("dpmpp", SCHEDULE, 8)
    ts = plan_timesteps(solver, dev)
    inputs = [_call_inputs(model, 2, 48, seed=20 + i, device=dev) for i in range(2)]
    with torch.inference_mode():
        eager = [run_dpmsolver(model.bind(c, f), x, solver, ts) for x, c, f in inputs]
    results: list[torch.Tensor | None] = [None, None]
    streams = [torch.cuda.Stream() for _ in inputs]

    def work(i: int) -> None:
        x, c, f = inputs[i]
        with torch.cuda.stream(streams[i]), torch.inference_mode():
            for _ in range(3):
                clear_kernel_caches(model)
                out = graphs.sample_graphed(model.bind(c, f), x, solver, ts)
            streams[i].synchronize()
            results[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(2):
        assert results[i] is not None
        assert float((results[i] - eager[i]).abs().max()) <= 1e-5  # type: ignore[operator]

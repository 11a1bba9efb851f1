"""Side-by-side benchmark of the sampling path: today's reference vs the fast path, in one process,
on the same weights and inputs, old and new runs interleaved (the machine is shared and drifts).

Components, each as (reference ms, new ms, ratio, max abs difference):

* **network** — one denoiser evaluation: ``denoise_reference`` (the network as trained: FFT S4D,
  per-row step MLP and FiLM) vs the folded network bound to the call's conditioning
  (``SSSDDenoiser.bind``);
* **sampler** — the loop alone, driven by a free denoiser (a fixed tensor): the diffusers
  scheduler vs the fused loop of the same algorithm (DPM-Solver++ or UniPC);
* **sample** — the whole ``Forecaster.sample`` call (context encoding, sampling, scaling).

Beside them, the machine's own limit measured in the same run: the GFLOP/s of a plain fp32 matmul
of the network's main shape (the gate projection, (2C × C) · (C × rows·positions)); the network's
achieved GFLOP/s — the matmul FLOPs the folded network performs per evaluation, over its time — is
reported as a fraction of it — and of the best rate of the same projection on one cache-sized
chunk (the in-cache peak; the full-batch shape is memory-bound on a small CPU). Dev-only: the CLI's
``bench-model`` is a thin layer over this.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from worker.model import folded
from worker.model.forecaster import Forecaster
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.s4d import clear_kernel_caches, reference_kernels
from worker.model.samplers import SAMPLERS, Denoise, diffusers_reference, sample_paths
from worker.model.schedule import NoiseSchedule


class ReferenceDenoiser(nn.Module):
    """Today's network path around the same weights (shared, not copied): ``denoise`` and ``bind``
    go through ``denoise_reference``, and every S4D kernel through ``kernel_reference``."""

    def __init__(self, inner: SSSDDenoiser) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg

    def encode(self, bar_features: torch.Tensor, context_time: torch.Tensor) -> torch.Tensor:
        # Once per sampling call, first: today's code recomputed every kernel on every call (the
        # new path keeps them while the weights are unchanged, s4d.refresh_kernel_caches).
        clear_kernel_caches(self.inner)
        with reference_kernels():
            return self.inner.encode(bar_features, context_time)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                future_time: torch.Tensor) -> torch.Tensor:
        with reference_kernels():
            return self.inner.denoise_reference(x_t, t, cond, future_time)

    def bind(self, cond: torch.Tensor, future_time: torch.Tensor) -> Denoise:
        return lambda x, t: self.denoise(x, t, cond, future_time)


def reference_forecaster(fc: Forecaster) -> Forecaster:
    """The same checkpoint through today's path: the diffusers loop of ``fc``'s (fused) sampler and the
    reference network (what ``Forecaster.sample`` ran before the fused samplers and the folded network)."""
    ckpt = dataclasses.replace(fc.checkpoint, model=ReferenceDenoiser(fc.checkpoint.model))  # type: ignore[arg-type]
    return Forecaster(ckpt, scheduler=diffusers_reference(fc.scheduler), device=fc.device, horizons=fc.horizons_ms,
                      timeframe_ms=fc.timeframe_ms, allow_timeframe_mismatch=True)


def busy_neighbour() -> subprocess.Popen[bytes]:
    """Another process that keeps one core busy until killed: the neighbour ``bench-model
    --neighbour`` measures under (a real one, not a simulated slowdown)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall times (ms) of each function: ``repeats`` rounds of all in turn, each timed call right
    after an untimed call of the same function. So each is timed as in a loop of its own: after its
    last parallel op an idle OpenMP team spins on for a while (GOMP_SPINCOUNT; ~8 ms at libgomp's
    default on the 2-core VM) on cores the next call needs, and back to back the reference's
    two-thread ops billed that spin to the new path's lanes. (A pause instead lets the idle vCPUs go
    cold: it slowed every short call more.)"""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _row(component: str, times: dict[str, list[float]], diff: float, **extra: Any) -> dict[str, Any]:
    old, new = statistics.median(times["reference"]), statistics.median(times["new"])
    return {"component": component, **extra, "reference_ms": round(old, 3), "new_ms": round(new, 3),
            "ratio": round(old / new, 2), "max_abs_diff": float(f"{diff:.3g}"), "repeats": len(times["new"]),
            "reference_runs_ms": [round(t, 2) for t in times["reference"]],
            "new_runs_ms": [round(t, 2) for t in times["new"]]}


def network_flops(cfg: NetworkConfig, rows: int, length: int) -> int:
    """Matmul FLOPs of one folded-network evaluation (``worker/model/folded.py``): per block the
    direct convolution (2·L per channel and position), the gate (2C+1 × C+1), the skip (C × C+1)
    and, except on the last block, the residual (C × C+1); then the output projection."""
    c, blocks = cfg.channels, cfg.denoiser_blocks
    cols = rows * length
    per_block = 2 * length * c + 2 * (2 * c + 1) * (c + 1) + 2 * c * (c + 1)
    return cols * (blocks * per_block + (blocks - 1) * 2 * c * (c + 1) + 2 * c)


def main_matmul(cfg: NetworkConfig, rows: int, length: int, device: torch.device) -> tuple[Callable[[], Any], int, str]:
    """A plain fp32 matmul of the network's main shape (the gate projection over every row and
    position): the function, its FLOPs and its shape."""
    c = cfg.channels
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2 * c, c, generator=g).to(device)
    x = torch.randn(c, rows * length, generator=g).to(device)
    return (lambda: torch.mm(w, x)), 2 * (2 * c) * c * rows * length, f"({2 * c}x{c}) @ ({c}x{rows * length})"


def bench_network(model: SSSDDenoiser, rows: int, context: int, repeats: int, device: torch.device,
                  label: str) -> dict[str, Any]:
    """One denoiser evaluation, reference vs folded, and the network's share of the matmul limit."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(rows, context, cfg.bar_features, generator=g).to(device)
    ctime = torch.randn(rows, context, cfg.time_features, generator=g).to(device)
    ftime = torch.randn(rows, cfg.horizon, cfg.time_features, generator=g).to(device)
    x = torch.randn(rows, cfg.horizon, generator=g).to(device)
    t = torch.tensor([120.0], device=device).expand(rows)
    with torch.inference_mode():
        cond = model.encode(feats, ctime)
        bound = model.bind(cond, ftime)
        ref = ReferenceDenoiser(model)
        diff = float((bound(x, t) - ref.denoise(x, t, cond, ftime)).abs().max())
        mm, mm_flops, mm_shape = main_matmul(cfg, rows, cfg.horizon, device)
        # The same projection on one cache-sized chunk of columns: the matmul rate the machine
        # reaches when its operands stay in cache (the full-batch shape above is memory-bound here).
        peak_rows = max(1, min(rows, folded.CHUNK_COLUMNS // cfg.horizon))
        mm_peak, peak_flops, peak_shape = main_matmul(cfg, peak_rows, cfg.horizon, device)
        # The limits are measured in the same rounds as the network, so all see the same machine.
        times = interleaved({"reference": lambda: ref.denoise(x, t, cond, ftime),
                             "new": lambda: bound(x, t), "matmul": mm, "matmul_peak": mm_peak}, repeats, device)
    mm_ms = statistics.median(times.pop("matmul"))
    peak_ms = min(times.pop("matmul_peak"))
    limit = {"shape": mm_shape, "median_ms": round(mm_ms, 3), "gflops": round(mm_flops / mm_ms / 1e6, 1)}
    peak = {"shape": peak_shape, "best_ms": round(peak_ms, 4), "gflops": round(peak_flops / peak_ms / 1e6, 1)}
    row = _row("network", times, diff, model=label, rows=rows, path_bars=cfg.horizon, channels=cfg.channels)
    flops = network_flops(cfg, rows, cfg.horizon)
    achieved = flops / row["new_ms"] / 1e6
    row.update({"network_gflop": round(flops / 1e9, 3), "network_gflops": round(achieved, 1),
                "matmul_limit": limit, "fraction_of_limit": round(achieved / limit["gflops"], 3),
                "matmul_peak": peak, "fraction_of_peak": round(achieved / peak["gflops"], 3)})
    return row


def bench_sampler(schedule: NoiseSchedule, groups: int, samples: int, horizon: int, steps: int, repeats: int,
                  device: torch.device, scheduler: str = "dpmpp") -> dict[str, Any]:
    """The sampling loop's own cost: a free denoiser (a fixed tensor), diffusers vs fused."""
    out = torch.randn(groups * samples, horizon, generator=torch.Generator().manual_seed(2)).to(device) * 0.5

    def free(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out

    def run(name: str) -> torch.Tensor:
        return sample_paths(free, schedule=schedule, scheduler=name, steps=steps, groups=groups, samples=samples,
                            horizon=horizon, generators=[torch.Generator().manual_seed(s) for s in range(groups)],
                            device=device).paths

    with torch.inference_mode():
        reference = diffusers_reference(scheduler)
        diff = float((run(scheduler) - run(reference)).abs().max())
        # cheap: many more rounds, so the median is not a scheduler hiccup of a shared machine
        times = interleaved({"reference": lambda: run(reference), "new": lambda: run(scheduler)},
                            max(repeats, 41), device)
    return _row("sampler", times, diff, groups=groups, samples=samples, path_bars=horizon, steps=steps,
                scheduler=scheduler)


def bench_sample(fc: Forecaster, batch_contexts: Any, seeds: Sequence[int], samples: int, steps: int,
                 repeats: int) -> dict[str, Any]:
    """The whole ``Forecaster.sample`` call, today's path vs the new one, same noise. On a CPU with
    several intra-op threads also the new path with its evaluations on the caller's threads instead of
    the lanes (``callers_threads_ms``, ``lanes_vs_callers_threads``: see ``folded.lane_count``). On CUDA also the
    new path with and without its CUDA graph (``eager_ms``, ``graph_ms``, ``graph_ratio`` and
    ``graph_max_abs_diff``); ``new`` is ``fc``'s own setting."""
    ref = reference_forecaster(fc)
    new_out, nfe = fc.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps)
    ref_out, _ = ref.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps)
    diff = float((new_out - ref_out).abs().max())
    fns = {"reference": lambda: ref.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps),
           "new": lambda: fc.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps)}
    graph_diff = None
    callers_diff = None
    if fc.device.type == "cpu" and torch.get_num_threads() > 1:
        # the same call with every evaluation unchunked on this thread's own intra-op threads (how
        # calls under one chunk ran before 2026-12-07), to show what the lanes give on this machine
        def sample_on_callers_threads() -> Any:
            with folded.on_callers_threads():
                return fc.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps)

        callers_diff = float((new_out - sample_on_callers_threads()[0]).abs().max())
        fns["callers_threads"] = sample_on_callers_threads
    if fc.device.type == "cuda":
        # the same weights and sampler with the CUDA graph setting flipped
        other = Forecaster(fc.checkpoint, scheduler=fc.scheduler, device=fc.device, horizons=fc.horizons_ms,
                           timeframe_ms=fc.timeframe_ms, allow_timeframe_mismatch=True,
                           cuda_graphs=not fc.cuda_graphs)
        graph_diff = float((new_out - other.sample(batch_contexts, seeds, num_samples=samples,
                                                   num_steps=steps)[0]).abs().max())
        fns["other"] = lambda: other.sample(batch_contexts, seeds, num_samples=samples, num_steps=steps)
    times = interleaved(fns, repeats, fc.device)
    other_times = times.pop("other", None)
    callers_times = times.pop("callers_threads", None)
    row = _row("sample", times, diff, symbols=len(seeds), samples=samples, scheduler=fc.scheduler, steps=steps,
               nfe=nfe, model=fc.model_version)
    if callers_times is not None:
        callers_ms = statistics.median(callers_times)
        row.update({"callers_threads_ms": round(callers_ms, 3),
                    "lanes_vs_callers_threads": round(callers_ms / statistics.median(times["new"]), 2),
                    "callers_threads_max_abs_diff": float(f"{callers_diff:.3g}"),
                    "callers_threads_runs_ms": [round(t, 2) for t in callers_times]})
    if other_times is not None:
        graph_times, eager_times = (times["new"], other_times) if fc.cuda_graphs else (other_times, times["new"])
        graph_ms, eager_ms = statistics.median(graph_times), statistics.median(eager_times)
        row.update({"cuda_graphs": fc.cuda_graphs, "eager_ms": round(eager_ms, 3), "graph_ms": round(graph_ms, 3),
                    "graph_ratio": round(eager_ms / graph_ms, 2), "graph_max_abs_diff": float(f"{graph_diff:.3g}"),
                    "eager_runs_ms": [round(t, 2) for t in eager_times],
                    "graph_runs_ms": [round(t, 2) for t in graph_times]})
    # the new path's latency under the field names bench-model has always reported
    row.update({"median_ms": row["new_ms"], "min_ms": round(min(times["new"]), 2),
                "max_ms": round(max(times["new"]), 2)})
    return row


def random_network(horizon: int, seed: int = 0, **overrides: Any) -> SSSDDenoiser:
    """A randomly initialised network of the given path length (default widths otherwise), with a
    non-zero output projection so its output depends on its input."""
    torch.manual_seed(seed)
    model = SSSDDenoiser(NetworkConfig(horizon=horizon, **overrides))
    nn.init.normal_(model.proj.weight, std=0.5)
    return model.eval()


def fused_scheduler(name: str) -> bool:
    return name in SAMPLERS and SAMPLERS[name].fused and diffusers_reference(name) in SAMPLERS


def bench_graph(model: SSSDDenoiser, schedule: NoiseSchedule, groups: int, samples: int, steps: int,
                repeats: int, device: torch.device, label: str, scheduler: str = "dpmpp") -> dict[str, Any]:
    """CUDA only: the fused loop with the bound network, eager vs one captured graph, on a stream
    of its own (as a micro-batch runs), each call starting from a cleared cache like a real call."""
    from worker.model import graphs
    from worker.model.fused import run_fused
    from worker.model.samplers import fused_plan, plan_timesteps

    cfg = model.cfg
    n = groups * samples
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(n, cfg.channels, generator=g).to(device)
    ftime = torch.randn(n, cfg.horizon, cfg.time_features, generator=g).to(device)
    x = torch.randn(groups, samples, cfg.horizon, generator=g).to(device)
    solver = fused_plan(scheduler, schedule, steps)
    ts = plan_timesteps(solver, device)
    stream = torch.cuda.Stream(device=device)

    def eager() -> torch.Tensor:
        clear_kernel_caches(model)
        return run_fused(model.bind(cond, ftime), x, solver, ts)

    def graphed() -> torch.Tensor:
        clear_kernel_caches(model)
        out = graphs.sample_graphed(model.bind(cond, ftime), x, solver, ts)
        if out is None:
            raise RuntimeError("CUDA graph capture failed on this device (see the warning above)")
        return out

    with torch.cuda.stream(stream), torch.inference_mode():
        diff = float((graphed() - eager()).abs().max())
        times = interleaved({"reference": eager, "new": graphed}, repeats, device)
    row = _row("cuda_graph", times, diff, model=label, groups=groups, samples=samples, path_bars=cfg.horizon,
               steps=steps, scheduler=scheduler)
    row["note"] = "reference = the eager fused loop, new = its CUDA graph"
    return row

"""The whole fused sampling loop as one CUDA graph per (stream, batch-size bucket, steps).

A 10-step DPM-Solver++ call on the folded network is ~400 small kernels; on a GPU their launch cost
is most of the call. Captured once, a call is then: copy the inputs into the graph's static buffers,
replay, copy the samples out — three launches, no host synchronisation.

What a graph holds (:class:`SamplingGraph`):

* **static inputs** — noisy paths, conditioning and future-time features, ``bucket`` rows each; a call
  with fewer rows fills the first ones (every row is computed independently of the others, so the
  padding rows change nothing and are dropped);
* **static weights** — its own copy of the folded weights (:class:`worker.model.folded.DenoisePlan`).
  On CUDA every sampling call starts by clearing the kernel caches (``s4d.refresh_kernel_caches``)
  and so folds the weights afresh; the graph copies them in before each replay, so a weight change
  — even through ``.data`` — reaches it;
* the captured work: the per-call constants (``bind_inputs``), then every step's network evaluation
  and fused solver update.

Graphs are cached per CUDA stream, so each micro-batch replays on its own stream; a lock per graph
covers copy-in, replay and copy-out, because the worker may share one stream between two executor
threads. The eager path stays the fallback: on the CPU, with an FFT-length path, or when asked.

The same :class:`SamplingGraph` runs uncaptured (``capture=False``: the body is simply called), which
is how the static-buffer plumbing is tested without a GPU (``tests/model/test_graphs.py``).
``make gpu-check`` compares graph and eager sampling on a device.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import fields

import torch

from worker.model import folded
from worker.model.fused import FusedPlan, run_fused
from worker.model.network import BoundDenoiser, SSSDDenoiser

MIN_BUCKET = 64


def bucket_rows(rows: int) -> int:
    """The static row count for a call of ``rows`` rows: the next power of two (≥ MIN_BUCKET), so
    a stream holds at most a handful of graphs however batch sizes vary."""
    b = MIN_BUCKET
    while b < rows:
        b *= 2
    return b


def graph_capable(denoise: object, device: torch.device) -> bool:
    if not isinstance(denoise, BoundDenoiser) or device.type != "cuda":
        return False
    return denoise.model._folded_ok(denoise.cond) and denoise.future_time.shape[1] <= folded.FFT_ABOVE


def _plan_tensors(plan: folded.DenoisePlan) -> list[torch.Tensor]:
    out = [getattr(plan, f.name) for f in fields(plan) if isinstance(getattr(plan, f.name), torch.Tensor)]
    for block in plan.blocks:
        out += [t for t in (block.conv, block.gate_w, block.res_w) if t is not None]
    return out


def _clone_plan(plan: folded.DenoisePlan) -> folded.DenoisePlan:
    blocks = [folded.BlockPlan(conv=None if b.conv is None else b.conv.clone(), s4=b.s4, sum_eps=b.sum_eps,
                               gate_w=b.gate_w.clone(), res_w=None if b.res_w is None else b.res_w.clone())
              for b in plan.blocks]
    kw = {f.name: getattr(plan, f.name) for f in fields(plan)}
    kw.update({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)})
    kw["blocks"] = blocks
    return folded.DenoisePlan(**kw)


class SamplingGraph:
    """Static buffers and the captured (or, uncaptured, directly run) fused sampling loop (DPM-Solver++
    or UniPC)."""

    def __init__(self, model: SSSDDenoiser, plan: folded.DenoisePlan, solver: FusedPlan, timesteps: torch.Tensor,
                 rows: int, cond_dim: int, time_features: int, capture: bool) -> None:
        dev = timesteps.device
        self.model = model
        self.solver = solver
        self.timesteps = timesteps
        self.rows = rows
        self.plan = _clone_plan(plan)
        self.x = torch.zeros(rows, plan.horizon, device=dev)
        self.cond = torch.zeros(rows, cond_dim, device=dev)
        self.future_time = torch.zeros(rows, plan.horizon, time_features, device=dev)
        self.out = torch.zeros(rows, plan.horizon, device=dev)
        self.lock = threading.Lock()
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def _body(self) -> None:
        bound = folded.bind_inputs(self.plan, self.cond, self.future_time)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return folded.run(self.model, self.plan, bound, x, t)

        self.out.copy_(run_fused(denoise, self.x[None], self.solver, self.timesteps)[0])

    def _capture(self) -> None:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=current.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS workspaces, allocator)
            self._body()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture_stream = side if current == torch.cuda.default_stream(current.device) else current
        # thread_local: other executor threads keep sampling on their own streams while this captures
        with torch.cuda.graph(graph, stream=capture_stream, capture_error_mode="thread_local"):
            self._body()
        self.graph = graph

    def __call__(self, plan: folded.DenoisePlan, x: torch.Tensor, cond: torch.Tensor,
                 future_time: torch.Tensor) -> torch.Tensor:
        """Samples for ``x`` (N, H) initial noise (N ≤ rows); ``plan`` is the current folded weights."""
        n = x.shape[0]
        with self.lock:
            torch._foreach_copy_(_plan_tensors(self.plan), _plan_tensors(plan))
            self.x[:n].copy_(x)
            self.cond[:n].copy_(cond)
            self.future_time[:n].copy_(future_time)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
            return self.out[:n].clone()


_CAPTURE_FAILED = object()  # stands in a model's table for a key whose capture failed
_graphs: weakref.WeakKeyDictionary[SSSDDenoiser, dict[tuple[object, ...], SamplingGraph | object]] = (
    weakref.WeakKeyDictionary())
_graphs_lock = threading.Lock()


def _lane_key(device: torch.device) -> object:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else threading.get_ident()


def sample_graphed(denoise: BoundDenoiser, x: torch.Tensor, solver: FusedPlan, timesteps: torch.Tensor,
                   capture: bool = True) -> torch.Tensor | None:
    """The fused loop through this stream's graph for the call's bucket (captured on first use).
    ``x`` (groups, samples, horizon) is the initial noise; returns the samples, same shape — or None
    when this shape's capture failed (once, with a warning), and the caller runs the loop eagerly."""
    model = denoise.model
    groups, samples, horizon = x.shape
    n = groups * samples
    plan = model.plan(horizon)
    key = (_lane_key(x.device), bucket_rows(n), solver, horizon, plan.channels, len(plan.blocks),
           denoise.cond.shape[1], denoise.future_time.shape[2])
    with _graphs_lock:
        per_model = _graphs.setdefault(model, {})
        graph = per_model.get(key)
    if graph is _CAPTURE_FAILED:
        return None
    if graph is None:
        try:
            graph = SamplingGraph(model, plan, solver, timesteps, bucket_rows(n), denoise.cond.shape[1],
                                  denoise.future_time.shape[2], capture=capture)
        except RuntimeError as exc:
            # A driver or torch build that cannot capture this loop must not stop sampling: eager
            # gives the same samples, slower. Remembered per key, so the capture is tried once.
            warnings.warn(f"CUDA graph capture failed ({exc}); sampling {bucket_rows(n)}-row batches eagerly",
                          RuntimeWarning, stacklevel=2)
            with _graphs_lock:
                per_model[key] = _CAPTURE_FAILED
            return None
        with _graphs_lock:
            graph = per_model.setdefault(key, graph)
    assert isinstance(graph, SamplingGraph)
    out = graph(plan, x.reshape(n, horizon), denoise.cond, denoise.future_time)
    return out.reshape(groups, samples, horizon)


def clear_graphs(model: SSSDDenoiser | None = None) -> None:
    """Drop captured graphs (and their memory): of one model, or all."""
    with _graphs_lock:
        if model is None:
            _graphs.clear()
        else:
            _graphs.pop(model, None)

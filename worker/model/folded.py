"""The path denoiser rearranged for inference: same weights, same outputs, a fraction of the work.

``SSSDDenoiser.denoise_reference`` is the network as trained (and the reference in tests). At
inference the same function is computed here with the weights folded ahead of time and everything
that is constant across the denoising steps of one sampling call computed once:

* **Layout (channels, positions, rows).** Every position-wise projection is then one plain matmul
  ``W @ X`` over all rows and positions, the S4D convolution is a batched matmul over channels, and
  no activation is ever transposed or copied between layers.
* **Direct convolution.** For the short paths the denoiser sees (4 hourly, 48 five-minute bars) an
  S4D layer is a small (L × L) Toeplitz matrix per channel; the forward and the backward kernel and
  the skip term D go into one matrix, so a bidirectional layer is one ``bmm`` instead of four FFTs,
  two flips and a complex product. Longer paths keep the FFT (``FFT_ABOVE``).
* **Folding.** LayerNorm's affine and its centering go into the gate weights (W·(I − 11ᵀ/C) maps
  y and y − mean(y) alike, so the activations are only scaled, never centred), and so does the −2
  of tanh(a) = 1 − 2σ(−2a), so one sigmoid pass covers both gate halves; the 1/√2 of the residual
  into the residual weights (its bias into the next block's FiLM shift, a per-row vector); the skip
  halves of the output projections, the 1/√blocks and the final linear layer into one matrix per
  block, side by side in one (C, blocks·(C + 1)) matrix against all blocks' gate outputs stacked in
  one buffer, so the skip sum and the final layer are one matmul; the last block's residual half,
  whose result nothing reads, is not computed.
* **Per call, not per step** (:class:`BoundInputs`): the context half of every block's FiLM
  projection and the future-time half of the input projection. **Per step, not per row**: the step
  embedding and its MLP, for the one timestep all rows share.

* **No new pages** (:class:`Workspace`): on the CPU a chunk's activations live in buffers its
  thread reuses from one evaluation to the next, written with ``out=`` and in place; freshly
  allocated, their pages were faulted in anew on every chunk (glibc hands large freed blocks back
  to the OS), which cost more than the arithmetic.

* **Lanes** (:func:`lane_count`): with N > 1 intra-op torch threads on the CPU, the cache-sized row
  chunks run on N threads of a small persistent pool, each with one intra-op thread, instead of one
  unchunked evaluation whose every op is split N ways, whatever the call's size (a neighbour
  process on one core slows the split ops' barriers five-fold, not the lanes).

The folded weights (``DenoisePlan``) are cached per lane (CUDA stream / CPU thread) exactly like the
S4D kernels, keyed on the parameters' versions and storage, and forgotten by ``clear_kernel_caches``
when a sampling call finds the weights changed (``s4d.refresh_kernel_caches``; on CUDA every call).
``tests/model/test_folded.py`` checks the outputs against ``denoise_reference`` (≤ 1e-5) on the
shipped checkpoint and on random networks.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch.nn import functional as F

from worker.model.s4d import ThreadSwitch

if TYPE_CHECKING:
    from worker.model.network import ResidualBlock, SSSDDenoiser

# Above this path length the direct (L²) convolution costs more than the FFT (L log L): keep the FFT.
FFT_ABOVE = 256
# Columns (rows × positions) per chunk on one CPU thread, and on each lane: measured, not derived from
# cache sizes (see chunk_rows). fx-5m has ~1 KB of activations a column, ~8 MB a chunk: beyond an L2,
# well inside an L3.
CHUNK_COLUMNS = 8192

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@dataclass
class BlockPlan:
    conv: torch.Tensor | None  # (C, L, L): y = conv @ u per channel (both directions + D); None: FFT
    s4: torch.nn.Module  # the S4D layer itself, for the FFT path
    sum_eps: float  # C · LayerNorm's eps: run_chunk normalises with sums, not means
    # Biases ride along as an extra input column against a row of ones (see run_chunk), so no
    # matmul copies a broadcast bias into its output first.
    gate_w: torch.Tensor  # (2C, C + 1): rows [−2 · tanh half; sigmoid half], LayerNorm's centering, γ, β folded in
    res_w: torch.Tensor | None  # (C, C + 1) / √2 with bias; None on the last block (never read)


@dataclass
class DenoisePlan:
    key: tuple[object, ...]
    channels: int
    horizon: int
    w_x: torch.Tensor  # (C, 1, 1): input weight of the noisy value
    w_ft: torch.Tensor  # (C, F): input weights of the future-time features
    b_in: torch.Tensor  # (C, 1)
    film_ctx_w: torch.Tensor  # (blocks · 2C, C): the context half of every FiLM
    film_step_w: torch.Tensor  # (blocks · 2C, C): the step half
    film_b: torch.Tensor  # (blocks · 2C,), the scale rows + 1: FiLM's h · (1 + scale) is one addcmul
    blocks: list[BlockPlan]
    # (C, blocks · (C + 1)): per block, final · skip half / √blocks and its bias (+ final's, block 0),
    # side by side: the skip sum of all blocks and the final layer are one matmul
    skip_w: torch.Tensor
    proj_w: torch.Tensor  # (1, C)
    proj_b: torch.Tensor  # (1, 1)


def build_plan(model: SSSDDenoiser, horizon: int, key: tuple[object, ...]) -> DenoisePlan:
    """Fold the weights (in float64, then float32) for paths of ``horizon`` positions."""
    c = model.cfg.channels
    dev = model.proj.weight.device

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=torch.float32).contiguous()

    inp_w = model.inp.weight.double()  # (C, 1 + F)
    final_w = model.final.weight.double()  # (C, C)
    res_blocks = cast("list[ResidualBlock]", list(model.blocks))
    n_blocks = len(res_blocks)
    blocks: list[BlockPlan] = []
    skips: list[torch.Tensor] = []
    for i, block in enumerate(res_blocks):
        gamma, beta = block.norm.weight.double(), block.norm.bias.double()
        gw, gb = block.gate.weight.double(), block.gate.bias.double()
        ow, ob = block.out.weight.double(), block.out.bias.double()
        gate = torch.zeros(2 * c, c + 1, dtype=torch.float64, device=dev)
        # LayerNorm's centering as weights: gw·γ·(y − mean(y)) = (gw·γ·(I − 11ᵀ/C))·y, whose rows sum
        # to zero, so run_chunk scales the activations but never subtracts their mean
        centre = torch.eye(c, dtype=torch.float64, device=dev) - 1.0 / c
        gate[:, :c], gate[:, c] = (gw * gamma[None, :]) @ centre, gw @ beta + gb
        gate[:, :c] *= math.sqrt(c)  # run_chunk's normalised y is y / σ over √C (sums, not means)
        # tanh(a) = 1 − 2σ(−2a): the tanh half computes −2a, so one sigmoid pass covers both halves.
        # Measured, not assumed: torch's CPU tanh costs 1–1.3 sigmoids on one VM of this project's
        # kind and ~6 on another (AMD EPYC, AVX-512: 64 × 4080 floats, 0.13 ms sigmoid, 0.8 ms tanh,
        # a fifth of the chunk); the sigmoid form loses ~2 % on the first and gains ~13 % on the second.
        gate[:c] *= -2.0
        skip = torch.cat([final_w @ ow[c:], (final_w @ ob[c:])[:, None]], dim=1) / math.sqrt(n_blocks)
        if i == 0:
            skip[:, c] += model.final.bias.double()
        skips.append(skip)
        # stored transposed, (C, L_out, L_in), so the (C, L, R) activations are the right operand
        conv = None if horizon > FFT_ABOVE else block.s4.toeplitz(horizon).transpose(1, 2)
        blocks.append(BlockPlan(
            conv=None if conv is None else f32(conv),
            s4=block.s4,
            sum_eps=c * float(block.norm.eps),
            gate_w=f32(gate),
            res_w=None if i == n_blocks - 1 else f32(torch.cat([ow[:c], ob[:c, None]], dim=1) * _INV_SQRT2),
        ))
    film_w = torch.cat([b.film.weight.double() for b in res_blocks])  # (blocks · 2C, 2C)
    return DenoisePlan(
        key=key,
        channels=c,
        horizon=horizon,
        w_x=f32(inp_w[:, :1, None]),
        w_ft=f32(inp_w[:, 1:]),
        b_in=f32(model.inp.bias.double()[:, None]),
        film_ctx_w=f32(film_w[:, :c]),
        film_step_w=f32(film_w[:, c:]),
        film_b=f32(torch.cat([b.film.bias.double() + torch.cat([torch.ones(c, dtype=torch.float64, device=dev),
                                                                 torch.zeros(c, dtype=torch.float64, device=dev)])
                              for b in res_blocks])),
        blocks=blocks,
        skip_w=f32(torch.cat(skips, dim=1)),
        proj_w=f32(model.proj.weight.double()),
        proj_b=f32(model.proj.bias.double()[:, None]),
    )


@dataclass
class BoundInputs:
    """What one sampling call's conditioning contributes, computed once for all its steps."""

    rows: int
    chunk_rows: int  # rows per chunk (the last one may be shorter)
    film_ctx: torch.Tensor  # (blocks, 2C, N): context half of every block's FiLM, plus its bias
    ft_proj: list[torch.Tensor]  # per chunk (C, L, rows): input projection of the future time, plus bias
    lanes: int = 1  # CPU threads the chunks are spread over (see lane_count); 1: the caller's thread


def lane_count(plan: DenoisePlan, device: torch.device) -> int:
    """How many single-threaded lanes run the chunks of a call: torch's intra-op thread count on
    the CPU, else 1.

    With N > 1 intra-op threads every small op of a chunk ends at a barrier where the threads wait
    for each other (on a shared 2-core machine, for one the OS has descheduled), and the unchunked
    activations leave the cache. Independent cache-sized chunks on N threads with one intra-op
    thread each (torch releases the GIL inside ops) have neither problem: measured on the 2-core
    VM, 48-bar paths × 1024 rows, see docs/benchmarks.md. One lane (today's chunked loop on the
    caller's thread) when the caller already runs single-threaded ops — a backtest lane, or a
    lane of this pool — so lanes never nest; on a GPU (few large launches win); and on the FFT path
    (its S4D kernels are cached per thread, and the pool's threads are not the caller's).

    Small calls too (until 2026-12-07 a call under one chunk, 8,192 columns, ran unchunked on the
    caller's threads), because of what another process on one of the cores does to the caller's
    barriers: with a busy loop on one of the two cores, whole sampling calls on the AMD VM kind
    (medians of 11 interleaved rounds) took 52 ms on the lanes against 262 on the caller's threads
    for one eurusd-1h symbol (256 columns), 76 against 422 for one fx-5m symbol (3,072), 108 against
    211 for two, 182 against 269 for 16 eurusd-1h symbols. Idle, that kind was faster on the lanes
    as well (26 / 32, 36 / 46, 63 / 76, 79 / 97 ms); the Intel kind was faster on the caller's
    threads for calls under one chunk (per evaluation, GOMP_SPINCOUNT=20000, medians of 100
    rounds, lanes / caller: fx-5m 64 rows × 48 bars 1.56 / 0.92 ms, 128 rows 1.87 / 1.59, 256 rows
    2.98 / 2.98; eurusd-1h 1024 rows × 4 bars 2.70 / 2.31; the live worker's one-symbol sampling
    29–33 / 23–27 ms): a few milliseconds a call given up there, for a call that does not slow
    five-fold when a neighbour takes a core. A call of fewer rows than lanes is one chunk on the
    caller's thread (``chunk_rows``)."""
    if device.type != "cpu" or any(b.conv is None for b in plan.blocks) or _callers_threads.on:
        return 1
    return max(1, torch.get_num_threads())


_callers_threads = ThreadSwitch()


def on_callers_threads() -> AbstractContextManager[None]:
    """Calls bound in this block, on this thread, run unchunked on the caller's own intra-op threads
    instead of the lanes, as calls under one chunk did before 2026-12-07: for ``bench-model``'s
    side-by-side of the two (outputs equal to float rounding: the caller's ops split their sums
    between two threads)."""
    return _callers_threads.turned_on()


def chunk_rows(rows: int, length: int, device: torch.device, chunk_columns: int = CHUNK_COLUMNS,
               lanes: int = 1) -> int:
    """Rows per chunk. Chunking is for one CPU thread's caches (measured: 255 -> 185 ms a 48-bar
    evaluation); a GPU wants few, large launches, and several intra-op threads on one chunk's ops
    lose more waiting at each op's barrier than the cache saves, so both get one chunk. On several
    lanes (``lane_count``) the chunks are equal and their count a multiple of the lanes, so that no
    lane idles while another finishes a long last chunk."""
    if device.type != "cpu" or (lanes <= 1 and torch.get_num_threads() > 1):
        return max(rows, 1)
    # Each lane gets a single thread's chunk, not a share of one. Halving it per lane (for vCPUs that
    # share a cache) was measured when each chunk's buffers were new pages (36 ms an fx-5m evaluation
    # at 8192 columns a lane, 24 at 4096); with reused workspaces (Workspace) the smaller chunks only
    # add per-op cost, which two lanes pay more of than one thread (every op hands the GIL over):
    # fx-5m, 1024 rows × 48 bars, two lanes, 2-core Intel VM of 2026-12-03, medians of 40
    # interleaved rounds, by rows a chunk: 74 (halved) 15.3 ms, 128 (this) 12.3, 256 11.4, 512 11.7;
    # one thread (170-row chunks) 19.0. Outputs are bit-identical whatever the chunking.
    step = max(1, min(rows, chunk_columns // max(length, 1)))
    if lanes > 1 and rows >= lanes:
        chunks = -(-rows // step)  # ceil
        chunks = -(-chunks // lanes) * lanes
        step = -(-rows // chunks)
    return step


def bind_inputs(plan: DenoisePlan, cond: torch.Tensor, future_time: torch.Tensor,
                chunk_columns: int = CHUNK_COLUMNS) -> BoundInputs:
    n, length, nf = future_time.shape
    c = plan.channels
    film_ctx = torch.addmm(plan.film_b[:, None], plan.film_ctx_w, cond.float().t())  # (blocks·2C, N)
    lanes = lane_count(plan, future_time.device)
    step = chunk_rows(n, length, future_time.device, chunk_columns, lanes=lanes)
    chunks = []
    ft = future_time.float()
    for r0 in range(0, n, step):
        part = ft[r0 : r0 + step].permute(2, 1, 0).reshape(nf, -1)  # (F, L·rows), position-major
        chunks.append(torch.addmm(plan.b_in, plan.w_ft, part).view(c, length, -1))
    return BoundInputs(rows=n, chunk_rows=step, film_ctx=film_ctx.view(len(plan.blocks), 2 * c, n),
                       ft_proj=chunks, lanes=min(lanes, len(chunks)))


def step_film(model: SSSDDenoiser, plan: DenoisePlan, t: torch.Tensor) -> torch.Tensor:
    """(blocks, 2C, 1) when every row has the same step (an expanded t, as the samplers pass it),
    else (blocks, 2C, N): the step half of every FiLM."""
    from worker.model.network import step_embedding

    rows = t[:1] if t.dim() == 1 and t.shape[0] > 0 and t.stride(0) == 0 else t
    s = model.step_mlp(step_embedding(rows, model.cfg.step_embedding))  # (R, C)
    return (plan.film_step_w @ s.float().t()).view(len(plan.blocks), 2 * plan.channels, -1)


@dataclass
class Workspace:
    """One chunk's activation buffers. On the CPU they are reused, per thread and shape, from one
    evaluation to the next: freshly allocated, every chunk's ~4 MB of activations came from new pages
    (glibc returns large freed blocks to the OS), and touching them cost ~1,200 page faults a chunk,
    more than half its time (measured on the 2-core VM: 4.46 -> 2.18 ms a 74-row 48-bar chunk,
    bit-identical output). On a GPU the caching allocator already reuses memory, and a captured
    graph needs its own buffers: there each evaluation takes new ones.

    The views run_chunk reads and writes are made once here, not per chunk: on the lanes every call
    from Python into torch hands the GIL over, and the two lanes wait for each other at each
    handover (measured on the 2-core Intel VM, fx-5m, 48 bars: on two lanes a 74-row chunk took
    1.87 ms, on one thread alone 1.27 ms; two processes side by side each run at one thread's
    speed, 2.14 against 2.16 ms a 128-row chunk). With the LayerNorm in sums (see run_chunk) a
    chunk makes about 35 such calls instead of 65: 5.8 % faster on one thread, paired."""

    h: torch.Tensor  # (C, L, R): the residual stream
    u: torch.Tensor  # (C, L, R): FiLM output, then the LayerNorm's squares
    y1: torch.Tensor  # (C + 1, L, R): S4D output, normalised in place, over a row of ones
    gates: torch.Tensor  # (blocks, C + 1, L·R): each block's gate output over a row of ones
    z: torch.Tensor  # (2C, L·R): gate pre-activations, then their sigmoids
    acc: torch.Tensor  # (C, L·R): the skip sum
    s1: torch.Tensor  # (L, R): Σ y over the channels
    s2: torch.Tensor  # (L, R): Σ y², then C · var, then the normalising factor
    film: torch.Tensor  # (blocks, 2C, R): this chunk's FiLM, [1 + scale; shift] per block
    # views of the buffers above (see the class docstring)
    y: torch.Tensor = field(init=False)  # (C, L, R): y1 without its ones row
    y1_cols: torch.Tensor = field(init=False)  # (C + 1, L·R)
    h_cols: torch.Tensor = field(init=False)  # (C, L·R)
    gates_cols: torch.Tensor = field(init=False)  # (blocks · (C + 1), L·R)
    z_tanh: torch.Tensor = field(init=False)  # (C, L·R): σ(−2a)
    z_sigmoid: torch.Tensor = field(init=False)  # (C, L·R): σ(b)
    gate_in: list[torch.Tensor] = field(init=False)  # per block (C + 1, L·R): [g; 1]
    gate_out: list[torch.Tensor] = field(init=False)  # per block (C, L·R): g
    film_scale: list[torch.Tensor] = field(init=False)  # per block (C, 1, R): 1 + scale
    film_shift: list[torch.Tensor] = field(init=False)  # per block (C, 1, R)

    def __post_init__(self) -> None:
        c, cols = self.h.shape[0], self.h.shape[1] * self.h.shape[2]
        self.y = self.y1[:c]
        self.y1_cols = self.y1.view(c + 1, cols)
        self.h_cols = self.h.view(c, cols)
        self.gates_cols = self.gates.view(-1, cols)
        self.z_tanh, self.z_sigmoid = self.z[:c], self.z[c:]
        self.gate_in = list(self.gates.unbind(0))
        self.gate_out = [g[:c] for g in self.gate_in]
        self.film_scale = [f[:c, None, :] for f in self.film.unbind(0)]
        self.film_shift = [f[c:, None, :] for f in self.film.unbind(0)]

    @classmethod
    def new(cls, c: int, blocks: int, length: int, r: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        cols = length * r
        # Normal tensors even under inference mode: a workspace made in an inference-mode call must
        # still take in-place writes in a later call that is only under no_grad.
        with torch.inference_mode(False):
            ws = cls(h=empty(c, length, r), u=empty(c, length, r), y1=empty(c + 1, length, r),
                     gates=empty(blocks, c + 1, cols), z=empty(2 * c, cols), acc=empty(c, cols),
                     s1=empty(length, r), s2=empty(length, r), film=empty(blocks, 2 * c, r))
            # the ones rows are never written by run_chunk: set once per buffer
            ws.y1[c].fill_(1.0)
            ws.gates[:, c].fill_(1.0)
        return ws

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.h, self.u, self.y1, self.gates, self.z, self.acc, self.s1, self.s2,
                                      self.film))


# What one thread keeps in workspaces (one per chunk shape it has seen: a call's full chunks and its
# shorter last one, for each batch size): past this the thread's set is dropped and rebuilt, and a
# single workspace larger than this (an unchunked evaluation of a big batch) is never kept.
WORKSPACE_BYTES_PER_THREAD = 64 << 20
_workspaces = threading.local()


def workspace(c: int, blocks: int, length: int, r: int, dtype: torch.dtype, device: torch.device) -> Workspace:
    """This thread's reusable buffers for a (C, L, R) chunk on the CPU; new buffers elsewhere."""
    if device.type != "cpu":
        return Workspace.new(c, blocks, length, r, dtype, device)
    cache: dict[tuple[object, ...], Workspace] | None = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = {}
    key = (c, blocks, length, r, dtype)
    ws = cache.get(key)
    if ws is None:
        ws = Workspace.new(c, blocks, length, r, dtype, device)
        size = ws.nbytes()
        if size > WORKSPACE_BYTES_PER_THREAD:
            return ws  # used once, not kept
        if sum(w.nbytes() for w in cache.values()) + size > WORKSPACE_BYTES_PER_THREAD:
            cache.clear()
        cache[key] = ws
    return ws


def run_chunk(plan: DenoisePlan, x_t: torch.Tensor, ft_proj: torch.Tensor, film_ctx: torch.Tensor,
              film_step: torch.Tensor) -> torch.Tensor:
    """x_t (L, R) (any strides), ft_proj (C, L, R), this chunk's rows of the context FiLM
    (blocks, 2C, R) and the step FiLM (blocks, 2C, R or 1) -> (L, R), a new tensor (the activations
    live in this thread's :func:`workspace`, which the next call overwrites)."""
    c = plan.channels
    length, r = x_t.shape
    ws = workspace(c, len(plan.blocks), length, r, ft_proj.dtype, ft_proj.device)
    torch.add(film_ctx, film_step, out=ws.film)
    h = torch.addcmul(ft_proj, plan.w_x, x_t, out=ws.h)  # (C, L, R)
    # The normalised activations have a constant row of ones below their C channels, so the gate's
    # bias is one more weight column; each block's gate output in turn carries a ones row for the
    # biases of the residual and skip matmuls. All blocks' [g; 1] are stacked in one buffer so that
    # the skip sum over blocks is one matmul at the end (skip_w holds the blocks side by side).
    y, u = ws.y, ws.u
    for i, block in enumerate(plan.blocks):
        torch.addcmul(ws.film_shift[i], h, ws.film_scale[i], out=u)  # h · (1 + scale) + shift
        if block.conv is not None:
            torch.bmm(block.conv, u, out=y)
        else:  # the layer's own FFT path on (R, C, L)
            y.copy_(block.s4(u.permute(2, 0, 1)).permute(1, 2, 0))
        # LayerNorm over channels (the outer dimension here) in sums: with S1 = Σy and S2 = Σy²,
        # C·var = S2 − S1²/C, and y / √(C·var + C·eps) is the normalised y over √C, a √C that gate_w
        # carries; the centering is in gate_w too, so y is only scaled. The sums save the centring
        # pass (clamped: rounding may take a zero variance below 0; tests bound what the
        # cancellation costs the output). Not var_mean: its dim-0 reduction is unvectorised on the
        # CPU (~100x slower than sum). The squares go into u, which the S4D has consumed.
        s1 = torch.sum(y, dim=0, out=ws.s1)
        s2 = torch.sum(torch.mul(y, y, out=u), dim=0, out=ws.s2)
        y.mul_(s2.addcmul_(s1, s1, value=-1.0 / c).clamp_(min=0.0).add_(block.sum_eps).rsqrt_())
        torch.mm(block.gate_w, ws.y1_cols, out=ws.z).sigmoid_()  # (2C, L·R): [σ(−2a); σ(b)]
        # g = tanh(a)·σ(b) = σ(b) − 2·σ(−2a)·σ(b): one fused multiply-add into this block's slot
        torch.addcmul(ws.z_sigmoid, ws.z_tanh, ws.z_sigmoid, value=-2.0, out=ws.gate_out[i])
        if block.res_w is not None:
            ws.h_cols.addmm_(block.res_w, ws.gate_in[i], beta=_INV_SQRT2)  # in place
    acc = torch.mm(plan.skip_w, ws.gates_cols, out=ws.acc)  # (C, L·R): Σ over blocks of final · skip
    out = torch.addmm(plan.proj_b, plan.proj_w, F.silu(acc, inplace=True))  # (1, L·R), new
    return out.view(length, r)


class _LanePool:
    """Persistent threads (one process-wide pool, created on first use, grown when more lanes are
    asked for) that each run chunks with one intra-op torch thread.

    Under torch's OpenMP backend the intra-op thread count is per OS thread (each thread's OpenMP
    setting; a thread that never set it starts from the value ``torch.set_num_threads`` was last
    called with, in any thread). Each pool thread sets its own to 1 once, when it starts; the
    creating caller then sets the process default back to its own count, so threads started later
    (and the caller) keep theirs — unlike ``backtest._single_threaded_ops``, nothing flips for the
    duration of a call, so concurrent callers (several micro-batches sampling at once) do not see
    each other's settings: they share the pool's threads, their lane tasks queue in order."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        started = threading.Barrier(threads + 1)

        def single_threaded() -> None:
            # get first: a thread's first get or parallel op (re)sets its count from the process
            # default, which would undo the set below once the caller has restored that default
            torch.get_num_threads()
            torch.set_num_threads(1)
            started.wait()

        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="denoise-lane", initializer=single_threaded)
        for _ in range(threads):  # every worker blocks in its initializer, so each submit starts one
            self.executor.submit(lambda: None)
        started.wait()


_pool: _LanePool | None = None
_pool_lock = threading.Lock()


def _lane_pool(lanes: int) -> _LanePool:
    global _pool
    pool = _pool  # one read: another caller may replace it meanwhile
    if pool is not None and pool.threads >= lanes:
        return pool
    with _pool_lock:
        if _pool is None or _pool.threads < lanes:
            before = torch.get_num_threads()
            _pool = _LanePool(lanes)
            torch.set_num_threads(before)  # the pool threads' set_num_threads(1) made 1 the default
            # A smaller pool it replaces is not shut down (a caller may still be submitting to it):
            # its threads exit once the last caller drops it (ThreadPoolExecutor's own weakref).
        return _pool


def run(model: SSSDDenoiser, plan: DenoisePlan, bound: BoundInputs, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's output (N, L) for noisy paths x_t (N, L) at steps t (N,)."""
    n, length = x_t.shape
    if n != bound.rows:
        raise ValueError(f"bound to {bound.rows} rows, got {n}")
    if n == 0:
        return torch.empty(0, length, dtype=torch.float32, device=x_t.device)
    film_step = step_film(model, plan, t)  # (blocks, 2C, 1), or (blocks, 2C, N) for per-row steps
    xt = x_t.float().t()  # (L, N) view
    step = bound.chunk_rows
    if step >= n:
        return run_chunk(plan, xt, bound.ft_proj[0], bound.film_ctx, film_step).t()
    out = torch.empty(length, n, dtype=torch.float32, device=x_t.device)
    # Bound on several lanes but now called from a single-threaded context (a lane itself): one lane.
    lanes = min(bound.lanes, torch.get_num_threads()) if x_t.device.type == "cpu" else 1

    def chunk(k: int, r0: int) -> None:
        r1 = min(n, r0 + step)
        # Each chunk adds its own rows' FiLM (context + step): on the lanes, not as one op on the
        # caller's thread, whose idle OpenMP team would otherwise spin through the lanes' start
        out[:, r0:r1] = run_chunk(plan, xt[:, r0:r1], bound.ft_proj[k], bound.film_ctx[:, :, r0:r1],
                                  film_step if film_step.shape[2] == 1 else film_step[:, :, r0:r1])

    chunks = list(enumerate(range(0, n, step)))  # (index, first row)
    if lanes <= 1:
        for k, r0 in chunks:
            chunk(k, r0)
        return out.t()
    inference = torch.is_inference_mode_enabled()
    # One task per lane, each taking the next chunk until none is left: one hand-off to the pool and
    # back per lane, not per chunk (each costs a thread wake-up), and a lane that starts late leaves
    # its share to the others.
    pending = iter(chunks)
    taking = threading.Lock()

    def on_lane() -> None:
        # grad and inference mode are per thread: the pool's threads take the caller's
        with torch.inference_mode(inference), torch.no_grad():
            while True:
                with taking:
                    item = next(pending, None)
                if item is None:
                    return
                chunk(*item)

    executor = _lane_pool(lanes).executor
    futures: list[Future[None]] = [executor.submit(on_lane) for _ in range(lanes)]
    wait(futures)  # all of them, even if one failed: none may still write to ``out`` after we return
    for f in futures:
        f.result()  # re-raises a lane's exception here
    return out.t()

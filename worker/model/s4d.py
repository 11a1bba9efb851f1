"""Diagonal structured state-space layer (S4D) with a zero-order-hold discretisation.

Continuous system per channel h and mode n:  x' = A x + B u,  y = 2·Re(C x) + D u, with complex
diagonal A (S4D-Lin initialisation), discretised exactly under ZOH:
    Ā = exp(Δ A),   B̄ = (Ā − 1) / A · B.
The length-L convolution kernel is K[l] = 2·Re(Σ_n C_n B̄_n Ā_n^l); ``forward`` applies it with an
FFT, ``recurrent`` runs the same system step by step (used by tests to prove they agree).

The kernel depends on the weights only, so at inference it is cached and the cache is keyed on
the parameters' version counters: any in-place weight change (optimizer step, load_state_dict)
invalidates it. Changes made through ``p.data`` bypass version counters, so every sampling call
starts with :func:`refresh_kernel_caches`: on the CPU it compares the weights value for value with
a copy taken when they last changed and forgets this lane's caches only if they differ (or this
lane has not seen them since); on CUDA, where the comparison would be a host sync, it forgets them
every call (:func:`clear_kernel_caches`) — one recomputation per call, none per denoising step.
The cache is a plain attribute, never part of ``state_dict``.

The worker samples several micro-batches at once (executor threads; on CUDA each on its own
stream), so there is one cache entry per lane — the calling thread on the CPU, the current stream
on CUDA — and a call clears only its own. A kernel computed on one stream is then never read on
another stream without synchronisation, nor freed under it, and no thread sees another's entry
disappear between its check and its read.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


class S4D(nn.Module):
    def __init__(self, channels: int, state: int = 32, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.state = state
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        log_dt = torch.rand(directions, channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_a_real = nn.Parameter(torch.log(0.5 * torch.ones(directions, channels, state)))
        self.a_imag = nn.Parameter(math.pi * torch.arange(state).float().repeat(directions, channels, 1))
        c = torch.randn(directions, channels, state, 2) * math.sqrt(0.5)
        self.c = nn.Parameter(c)
        self.d = nn.Parameter(torch.randn(channels))
        self._kernel_cache: dict[tuple[object, ...], tuple[tuple[object, ...], torch.Tensor]] = {}

    def clear_kernel_cache(self) -> None:
        """Forget this lane's cached kernel (see the module docstring)."""
        self._kernel_cache.pop(_lane(self.log_dt.device), None)

    def _discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā, B̄·C, C) in complex64; shapes (dirs, channels, state)."""
        dt = torch.exp(self.log_dt.float())[..., None]
        a = torch.complex(-torch.exp(self.log_a_real.float()), self.a_imag.float())
        da = torch.exp(dt * a)
        db = (da - 1.0) / a  # B = 1: its scale is absorbed by C
        c = torch.view_as_complex(self.c.float().contiguous())
        return da, db * c, c

    def kernel(self, length: int) -> torch.Tensor:
        """Real kernel (dirs, channels, length), float32."""
        reference = _reference_kernels.on
        key = (length, reference, self.log_dt.device, *(p._version for p in self.parameters()),
               *(p.data_ptr() for p in self.parameters()))
        use_cache = not torch.is_grad_enabled()
        lane = _lane(self.log_dt.device)
        entry = self._kernel_cache.get(lane)  # one read: another lane may change the dict meanwhile
        if use_cache and entry is not None and entry[0] == key:
            return entry[1]
        k = self.kernel_reference(length) if reference else self._kernel_values(length)
        if use_cache:
            self._kernel_cache[lane] = (key, k)
        else:
            self._kernel_cache.pop(lane, None)
        return k

    def _kernel_values(self, length: int) -> torch.Tensor:
        """K[l] = 2·Re(Σ_n B̄C_n Ā_n^l) with Ā_n^l = exp(l·Δ·A_n) in real float64 arithmetic:
        magnitude exp(l·Δ·Re A), phase l·Δ·Im A (no branch cut: l is an integer). A complex64
        ``exp`` over (channels, state, length) was most of a small sampling call's time, and the
        phase l·Δ·Im A reaches hundreds of radians, where float32 loses digits."""
        _, dbc, _ = self._discrete()
        dt = torch.exp(self.log_dt.double())[..., None]  # (dirs, channels, 1)
        a_re = -torch.exp(self.log_a_real.double())
        a_im = self.a_imag.double()
        pos = torch.arange(length, device=dbc.device, dtype=torch.float64)
        mag = torch.exp((dt * a_re)[..., None] * pos)  # (dirs, channels, state, L)
        phase = (dt * a_im)[..., None] * pos
        dbc64 = dbc.to(torch.complex128)
        k = 2.0 * (torch.einsum("dcn,dcnl->dcl", dbc64.real, mag * torch.cos(phase))
                   - torch.einsum("dcn,dcnl->dcl", dbc64.imag, mag * torch.sin(phase)))
        return k.float()

    def kernel_reference(self, length: int) -> torch.Tensor:
        """The kernel as first written (complex64 powers through exp(l·log Ā)); tests compare."""
        da, dbc, _ = self._discrete()
        powers = torch.exp(torch.log(da)[..., None] * torch.arange(length, device=da.device))  # Ā^l
        return 2.0 * torch.einsum("dcn,dcnl->dcl", dbc, powers).real

    def toeplitz(self, length: int) -> torch.Tensor:
        """The whole layer on length-``length`` sequences as one matrix per channel, (channels, L, L),
        float32: ``y = u @ M`` for u (…, channels, 1, L) rows, i.e. ``M[c, j, l]`` is the weight of
        input position j in output position l — the forward kernel above the diagonal, the backward
        kernel below it, both (and D) on it. For short sequences a batched matmul with it is much
        cheaper than the FFT (see worker/model/folded.py); the result is the same convolution."""
        k = self.kernel(length)
        pos = torch.arange(length, device=k.device)
        lag = pos[None, :] - pos[:, None]  # l - j
        fwd = torch.where(lag >= 0, k[0][:, lag.clamp(min=0)], 0.0)
        m = fwd
        if self.bidirectional:
            m = m + torch.where(lag <= 0, k[1][:, (-lag).clamp(min=0)], 0.0)
        return m + torch.diag_embed(self.d.float()[:, None].expand(-1, length))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (batch, channels, length) -> same shape."""
        length = u.shape[-1]
        # FFTs stay in fp32 with autocast off: bf16 FFT is unsupported and fp16 needs power-of-two sizes.
        with torch.autocast(device_type=u.device.type, enabled=False):
            x = u.float()
            k = self.kernel(length)
            n = 2 * length
            kf = torch.fft.rfft(k, n=n)
            y = torch.fft.irfft(torch.fft.rfft(x, n=n) * kf[0], n=n)[..., :length]
            if self.bidirectional:
                xr = torch.flip(x, dims=(-1,))
                yb = torch.fft.irfft(torch.fft.rfft(xr, n=n) * kf[1], n=n)[..., :length]
                y = y + torch.flip(yb, dims=(-1,))
            y = y + x * self.d.float()[:, None]
        return y.to(u.dtype)

    @torch.no_grad()
    def recurrent(self, u: torch.Tensor) -> torch.Tensor:
        """The same layer run as a recurrence, one step at a time (reference for tests)."""
        da, dbc, _ = self._discrete()
        x = u.float()

        def scan(seq: torch.Tensor, d: int) -> torch.Tensor:
            state = torch.zeros(seq.shape[0], self.channels, self.state, dtype=torch.complex64, device=seq.device)
            outs = []
            for t in range(seq.shape[-1]):
                state = da[d] * state + seq[:, :, t, None]
                outs.append(2.0 * (dbc[d] * state).sum(-1).real)
            return torch.stack(outs, dim=-1)

        y = scan(x, 0)
        if self.bidirectional:
            y = y + torch.flip(scan(torch.flip(x, dims=(-1,)), 1), dims=(-1,))
        return y + x * self.d.float()[:, None]


class ThreadSwitch:
    """An on/off switch of the calling thread, on for the duration of a ``with`` block (nests): how
    benchmarks and tests run today's path beside the new one in the same process."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def on(self) -> bool:
        return bool(getattr(self._local, "on", False))

    @contextlib.contextmanager
    def turned_on(self) -> Iterator[None]:
        before = self.on
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = before


_reference_kernels = ThreadSwitch()


def reference_kernels() -> contextlib.AbstractContextManager[None]:
    """In this thread, compute S4D kernels with the original complex64 formula
    (``kernel_reference``): today's implementation, for side-by-side benchmarks and tests."""
    return _reference_kernels.turned_on()


def _lane(device: torch.device) -> tuple[object, ...]:
    if device.type == "cuda":
        return ("cuda", torch.cuda.current_stream(device).cuda_stream)  # the current stream is per thread
    return ("cpu", threading.get_ident())


def clear_kernel_caches(module: nn.Module) -> None:
    """Forget this lane's cached S4D kernels and folded inference weights under ``module`` (start of
    each sampling call): any submodule with a ``clear_kernel_cache`` method."""
    for m in module.modules():
        clear = getattr(m, "clear_kernel_cache", None)
        if callable(clear):
            clear()


@dataclass
class _WeightsSeen:
    """The weights a module's caches were last rebuilt for, and which lanes have rebuilt since."""

    snapshot: list[torch.Tensor]
    generation: int
    lanes: dict[tuple[object, ...], int] = field(default_factory=dict)  # lane -> generation it cleared at


_weights_seen: weakref.WeakKeyDictionary[nn.Module, _WeightsSeen] = weakref.WeakKeyDictionary()
_weights_lock = threading.Lock()


def _same_weights(snapshot: list[torch.Tensor], tensors: list[torch.Tensor]) -> bool:
    # torch.equal is False on any NaN: a NaN weight means "changed" on every call (always safe)
    return len(snapshot) == len(tensors) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(snapshot, tensors, strict=True))


def refresh_kernel_caches(module: nn.Module) -> None:
    """Start of a sampling call: forget this lane's cached S4D kernels and folded weights under
    ``module`` if a weight or buffer changed since they were made — even through ``p.data``.

    Rebuilding them costs a small call more than its sampling (the 5-minute model, one symbol:
    ~8 of ~25 ms on the 2-core CPU), so on the CPU the weights are compared, value for value, with a
    copy of those the caches were last rebuilt for (~0.1 ms for these models). A change starts a
    new generation, and every lane clears once when it next sees it: the caches are per lane (see
    the module docstring), and one lane's rebuild says nothing about another's. On CUDA the
    comparison would stall the stream on a host sync, so there the caches are cleared every call."""
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers())]
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type != "cpu":
        clear_kernel_caches(module)
        return
    lane = _lane(device)
    with _weights_lock:
        seen = _weights_seen.get(module)
        if seen is None or not _same_weights(seen.snapshot, tensors):
            seen = _WeightsSeen(snapshot=[t.clone() for t in tensors],
                                generation=0 if seen is None else seen.generation + 1)
            _weights_seen[module] = seen
        if seen.lanes.get(lane) == seen.generation:
            return
        seen.lanes[lane] = seen.generation
    clear_kernel_caches(module)

"""The SSSD denoiser: a context encoder and a path denoiser, both built from S4D residual blocks.

The context (L past bars) is encoded once per symbol and bar — it does not change across diffusion
steps or samples — into a conditioning vector. The denoiser sees the noisy future path of H
normalised log returns (plus the nominal time features of those future bars), the diffusion step
and the conditioning, and predicts the training target (``v`` or ``epsilon``) for every position.
Every horizon is read off that one path, so the horizons are consistent with each other.

``denoise_reference`` is the network as trained (used for training, under autograd or autocast, and
as the reference in tests); ``denoise`` at inference and ``bind`` compute the same function through
:mod:`worker.model.folded` (weights folded once, per-call and per-step constants hoisted, direct
convolution for short paths).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from worker.model import folded
from worker.model.s4d import S4D, _lane


@dataclass(frozen=True)
class NetworkConfig:
    bar_features: int = 7
    time_features: int = 4
    horizon: int = 4
    channels: int = 64
    state: int = 32
    encoder_blocks: int = 2
    denoiser_blocks: int = 3
    step_embedding: int = 64
    dropout: float = 0.1

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def step_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion steps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResidualBlock(nn.Module):
    """S4D -> norm -> gated activation, FiLM-conditioned; returns (residual out, skip).

    Activations are (batch, length, channels): the position-wise projections are plain matmuls,
    which are much faster on CPU than 1x1 convolutions; only the S4D sees (batch, channels, length).
    """

    def __init__(self, channels: int, state: int, cond_dim: int, bidirectional: bool, dropout: float) -> None:
        super().__init__()
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.s4 = S4D(channels, state, bidirectional=bidirectional)
        self.norm = nn.LayerNorm(channels)
        self.gate = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, 2 * channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.film(cond)[:, None, :].chunk(2, dim=-1)
        h = x * (1 + scale) + shift
        h = self.norm(self.s4(h.transpose(1, 2)).transpose(1, 2))
        a, b = self.gate(h).chunk(2, dim=-1)
        h = self.dropout(torch.tanh(a) * torch.sigmoid(b))
        res, skip = self.out(h).chunk(2, dim=-1)
        return (x + res) / math.sqrt(2.0), skip


class ContextEncoder(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.inp = nn.Linear(cfg.bar_features + cfg.time_features, c)
        self.blocks = nn.ModuleList(
            ResidualBlock(c, cfg.state, c, bidirectional=False, dropout=cfg.dropout)
            for _ in range(cfg.encoder_blocks)
        )
        self.zero_cond = nn.Parameter(torch.zeros(1, c))
        self.head = nn.Sequential(nn.Linear(2 * c, c), nn.SiLU(), nn.Linear(c, c))

    def forward(self, bar_features: torch.Tensor, context_time: torch.Tensor) -> torch.Tensor:
        """(B, L, F), (B, L, 4) -> (B, C)."""
        x = self.inp(torch.cat([bar_features, context_time], dim=-1))
        cond = self.zero_cond.expand(x.shape[0], -1)
        skips = torch.zeros_like(x)
        for block in self.blocks:
            x, skip = block(x, cond)
            skips = skips + skip
        # Causal encoder: the last position summarises the whole context; the mean adds a stable view.
        return self.head(torch.cat([skips[:, -1], skips.mean(dim=1)], dim=1))


class SSSDDenoiser(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.encoder = ContextEncoder(cfg)
        self.step_mlp = nn.Sequential(nn.Linear(cfg.step_embedding, c), nn.SiLU(), nn.Linear(c, c))
        self.inp = nn.Linear(1 + cfg.time_features, c)
        self.blocks = nn.ModuleList(
            ResidualBlock(c, cfg.state, 2 * c, bidirectional=True, dropout=cfg.dropout)
            for _ in range(cfg.denoiser_blocks)
        )
        self.final = nn.Linear(c, c)
        self.proj = nn.Linear(c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # The folded inference weights, one entry per lane (see worker/model/s4d.py); never in state_dict.
        self._plan_cache: dict[tuple[object, ...], folded.DenoisePlan] = {}
        self._bound_cache: dict[tuple[object, ...], tuple[folded.DenoisePlan, torch.Tensor, torch.Tensor,
                                                          folded.BoundInputs]] = {}

    def encode(self, bar_features: torch.Tensor, context_time: torch.Tensor) -> torch.Tensor:
        return self.encoder(bar_features, context_time)

    def denoise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, future_time: torch.Tensor
    ) -> torch.Tensor:
        """x_t (N, H) noisy paths, t (N,) steps, cond (N, C), future_time (N, H, 4) -> (N, H)."""
        if not self._folded_ok(x_t):
            return self.denoise_reference(x_t, t, cond, future_time)
        plan = self.plan(x_t.shape[1])
        return folded.run(self, plan, self._bound_inputs(plan, cond, future_time), x_t, t)

    def _bound_inputs(self, plan: folded.DenoisePlan, cond: torch.Tensor,
                      future_time: torch.Tensor) -> folded.BoundInputs:
        """What depends on (cond, future_time) alone, computed once per sampling call: remembered
        for the tensors this lane last saw, by identity (a sampler passes the same two tensors on
        every step; a new call brings new ones), or until ``clear_kernel_caches``. Changing ``cond``
        or ``future_time`` in place between two calls without clearing is not supported."""
        lane = _lane(cond.device)
        entry = self._bound_cache.get(lane)
        if entry is not None and entry[0] is plan and entry[1] is cond and entry[2] is future_time:
            return entry[3]
        # drop the last call's inputs first: at 256 symbols × 64 samples they are ~100 MB
        self._bound_cache.pop(lane, None)
        del entry
        bound = folded.bind_inputs(plan, cond, future_time)
        self._bound_cache[lane] = (plan, cond, future_time, bound)
        return bound

    def bind(self, cond: torch.Tensor, future_time: torch.Tensor) -> BoundDenoiser:
        """``denoise`` for one sampling call's fixed conditioning: a callable ``(x_t, t) -> out`` that
        computes what depends on ``cond`` and ``future_time`` alone once, not on every step."""
        return BoundDenoiser(self, cond, future_time)

    def _folded_ok(self, x: torch.Tensor) -> bool:
        return (not self.training and not torch.is_grad_enabled() and x.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type))

    def plan(self, horizon: int) -> folded.DenoisePlan:
        """This lane's folded weights for ``horizon``-position paths, rebuilt when a weight changes."""
        params = list(self.parameters())
        key = (horizon, params[0].device, *(p._version for p in params), *(p.data_ptr() for p in params))
        lane = _lane(params[0].device)
        entry = self._plan_cache.get(lane)  # one read: another lane may change the dict meanwhile
        if entry is not None and entry.key == key:
            return entry
        plan = folded.build_plan(self, horizon, key)
        self._plan_cache[lane] = plan
        return plan

    def clear_kernel_cache(self) -> None:
        """Forget this lane's folded weights and bound inputs (``clear_kernel_caches``; a sampling
        call starts with ``refresh_kernel_caches``, which calls it when the weights changed)."""
        lane = _lane(self.proj.weight.device)
        self._plan_cache.pop(lane, None)
        self._bound_cache.pop(lane, None)

    def denoise_reference(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, future_time: torch.Tensor
    ) -> torch.Tensor:
        """The network as trained, layer by layer (FFT convolutions): the reference ``denoise``
        is tested against, and the path used under autograd, autocast and in training mode."""
        h = self.inp(torch.cat([x_t[:, :, None], future_time], dim=-1))
        c = torch.cat([cond, self.step_mlp(step_embedding(t, self.cfg.step_embedding))], dim=1)
        skips = torch.zeros_like(h)
        for block in self.blocks:
            h, skip = block(h, c)
            skips = skips + skip
        out: torch.Tensor = self.proj(F.silu(self.final(skips / math.sqrt(len(self.blocks)))))
        return out[:, :, 0]


class BoundDenoiser:
    """``SSSDDenoiser.denoise`` with its conditioning fixed for one sampling call: calls go through
    ``denoise`` (so wrappers of it see every evaluation), whose per-lane memo computes the
    conditioning's share once. The CUDA-graph sampler (worker/model/graphs.py) needs this object:
    it names the inputs a captured graph must copy into its static buffers."""

    def __init__(self, model: SSSDDenoiser, cond: torch.Tensor, future_time: torch.Tensor) -> None:
        self.model = model
        self.cond = cond
        self.future_time = future_time

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(x_t, t, self.cond, self.future_time)

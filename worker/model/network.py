"""The SSSD denoiser: a context encoder and a path denoiser, both built from S4D residual blocks.

The context (L past bars) is encoded once per symbol and bar — it does not change across diffusion
steps or samples — into a conditioning vector. The denoiser sees the noisy future path of H
normalised log returns (plus the nominal time features of those future bars), the diffusion step
and the conditioning, and predicts the training target (``v`` or ``epsilon``) for every position.
Every horizon is read off that one path, so the horizons are consistent with each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from worker.model.s4d import S4D


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

    def encode(self, bar_features: torch.Tensor, context_time: torch.Tensor) -> torch.Tensor:
        return self.encoder(bar_features, context_time)

    def denoise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, future_time: torch.Tensor
    ) -> torch.Tensor:
        """x_t (N, H) noisy paths, t (N,) steps, cond (N, C), future_time (N, H, 4) -> (N, H)."""
        h = self.inp(torch.cat([x_t[:, :, None], future_time], dim=-1))
        c = torch.cat([cond, self.step_mlp(step_embedding(t, self.cfg.step_embedding))], dim=1)
        skips = torch.zeros_like(h)
        for block in self.blocks:
            h, skip = block(h, c)
            skips = skips + skip
        out: torch.Tensor = self.proj(F.silu(self.final(skips / math.sqrt(len(self.blocks)))))
        return out[:, :, 0]

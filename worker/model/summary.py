"""From sampled return paths to the numbers a trader reads: per horizon mean, std, quantiles, P(up),
and the same quantiles as price levels. Computed on the device, one small copy to the host."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from schemas.forecast import QUANTILE_KEYS, QUANTILE_LEVELS  # the contract's levels: one source

__all__ = ["QUANTILE_KEYS", "QUANTILE_LEVELS", "BatchStats", "HorizonStats", "cumulative_returns", "summarise"]


@dataclass(frozen=True)
class HorizonStats:
    horizon_ms: int
    bars: int
    mean: float
    std: float
    quantiles: tuple[float, ...]  # log returns at QUANTILE_LEVELS
    p_up: float
    price_mean: float
    price_quantiles: tuple[float, ...]

    @property
    def horizon_minutes(self) -> int:
        return self.horizon_ms // 60_000


def cumulative_returns(paths: torch.Tensor, bars: list[int]) -> torch.Tensor:
    """(G, S, H) per-bar log returns -> (G, S, len(bars)) log return from the origin close to each horizon."""
    cum = paths.cumsum(dim=-1)
    return cum[..., [b - 1 for b in bars]]


@dataclass(frozen=True)
class BatchStats:
    """Host arrays for G groups and K horizons."""

    mean: np.ndarray  # (G, K)
    std: np.ndarray  # (G, K)
    quantiles: np.ndarray  # (G, K, 7)
    p_up: np.ndarray  # (G, K)
    price_mean: np.ndarray  # (G, K)


def summarise(cum: torch.Tensor, closes: np.ndarray) -> BatchStats:
    levels = torch.tensor(QUANTILE_LEVELS, device=cum.device, dtype=cum.dtype)
    x = cum.transpose(1, 2)  # (G, K, S)
    q = torch.quantile(x, levels, dim=-1).permute(1, 2, 0)  # (G, K, 7)
    close = torch.as_tensor(closes, device=cum.device, dtype=torch.float64)[:, None]
    stacked = torch.stack([x.mean(-1), x.std(-1), (x > 0).float().mean(-1)], dim=0).double()
    price_mean = close * torch.exp(x.double()).mean(-1)
    host = torch.cat([stacked.reshape(-1), q.double().reshape(-1), price_mean.reshape(-1)]).cpu().numpy()
    g, k = x.shape[0], x.shape[1]
    n = g * k
    return BatchStats(
        mean=host[:n].reshape(g, k),
        std=host[n : 2 * n].reshape(g, k),
        p_up=host[2 * n : 3 * n].reshape(g, k),
        quantiles=host[3 * n : 3 * n + 7 * n].reshape(g, k, 7),
        price_mean=host[3 * n + 7 * n :].reshape(g, k),
    )

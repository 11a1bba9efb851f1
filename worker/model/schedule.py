"""The training noise schedule, stored exactly (the betas themselves) so every sampler is built from
the same numbers the model was trained with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

PredictionType = Literal["epsilon", "v_prediction"]
# The schedule must end near pure noise, or sampling starts from a distribution the model never saw
# at t=T (the original SSSD linear schedule, T=200, ends at ᾱ_T ≈ 0.13).
MAX_FINAL_ALPHA_BAR = 1e-3


@dataclass(frozen=True)
class NoiseSchedule:
    betas: tuple[float, ...]
    prediction_type: PredictionType = "v_prediction"
    name: str = "cosine"

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) < 2:
            raise ValueError("betas must be a 1-D sequence of at least 2 values")
        if not np.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas must be finite and strictly between 0 and 1")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")
        final = float(self.alphas_cumprod()[-1])
        if final > MAX_FINAL_ALPHA_BAR:
            raise ValueError(
                f"schedule ends at alpha_bar_T={final:.3g}, far from pure noise (need <= {MAX_FINAL_ALPHA_BAR})"
            )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def alphas_cumprod(self) -> torch.Tensor:
        """float32, computed exactly as diffusers does from ``trained_betas``."""
        betas = torch.tensor(self.betas, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def cosine(cls, timesteps: int = 200, max_beta: float = 0.999,
               prediction_type: PredictionType = "v_prediction") -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule (diffusers' ``squaredcos_cap_v2``), in float64."""

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = tuple(
            min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)
        )
        return cls(betas=betas, prediction_type=prediction_type, name="cosine")

    @classmethod
    def linear(cls, timesteps: int = 200, beta_start: float = 1e-4, beta_end: float = 0.02,
               prediction_type: PredictionType = "v_prediction") -> NoiseSchedule:
        """The original SSSD schedule; rejected at T=200 because it ends far from noise."""
        betas = tuple(float(b) for b in np.linspace(beta_start, beta_end, timesteps))
        return cls(betas=betas, prediction_type=prediction_type, name="linear")


def noisy_and_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process q(x_t | x_0) and the regression target for the chosen parameterisation."""
    ab = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    sa, so = ab.sqrt(), (1 - ab).sqrt()
    x_t = sa * x0 + so * noise
    target = noise if prediction_type == "epsilon" else sa * noise - so * x0
    return x_t, target

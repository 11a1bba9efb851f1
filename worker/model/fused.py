"""A fused DPM-Solver++ 2M sampling loop: the diffusers scheduler's arithmetic, precomputed.

diffusers' ``DPMSolverMultistepScheduler.step`` recomputes, on every step, α, σ and λ of the current
and previous timesteps from 0-d tensors, shifts its history list and branches on the step index —
per-step Python and small-tensor work that does not depend on the sample. For a given schedule and
step count all of it is a table of five numbers per step:

    x0_k    = p_k · x_k + q_k · out_k                     (the data prediction from the model output)
    x_{k+1} = a_k · x_k + b_k · x0_k + c_k · (x0_k − x0_{k−1})

(first-order steps have c_k = 0). :func:`dpmsolver_plan` reads the timesteps and σs from a configured
diffusers scheduler — so both use the same timesteps, the same trailing spacing and the same final
σ = 0 — and computes the table in float64 exactly as ``dpm_solver_first_order_update`` /
``multistep_dpm_solver_second_order_update`` (midpoint) do; :func:`run_dpmsolver` applies it with plain
Python floats, so a step is a handful of tensor operations, no host↔device traffic and nothing that a
CUDA graph could not capture. ``tests/model/test_fused.py`` checks it step by step against diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The configuration the table reproduces; any other (SDE variants, order 3, Karras σs, thresholding…)
# keeps the diffusers loop. Checked against the scheduler object, not assumed.
_REQUIRED_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "final_sigmas_type": "zero",
    "thresholding": False,
    "use_karras_sigmas": False,
    "euler_at_final": False,
}


@dataclass(frozen=True)
class DPMSolverPlan:
    """Per-step coefficients of DPM-Solver++ 2M for one (schedule, step count)."""

    timesteps: tuple[int, ...]
    p: tuple[float, ...]  # x0 = p·x + q·model_output
    q: tuple[float, ...]
    a: tuple[float, ...]  # x_next = a·x + b·x0 + c·(x0 − x0_prev)
    b: tuple[float, ...]
    c: tuple[float, ...]  # 0.0 on first-order steps

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _lam(alpha: float, sigma: float) -> float:
    return math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)


def dpmsolver_plan(scheduler: object, steps: int) -> DPMSolverPlan:
    """The table for a diffusers ``DPMSolverMultistepScheduler`` (configured, not yet stepped)."""
    config = scheduler.config  # type: ignore[attr-defined]
    for key, want in _REQUIRED_CONFIG.items():
        if config.get(key, want) != want:
            raise ValueError(f"fused DPM-Solver++ needs {key}={want!r}, scheduler has {config.get(key)!r}")
    prediction = config["prediction_type"]
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"fused DPM-Solver++ supports epsilon and v_prediction, not {prediction!r}")
    if float(scheduler.init_noise_sigma) != 1.0:  # type: ignore[attr-defined]
        raise ValueError("fused DPM-Solver++ assumes init_noise_sigma = 1")
    scheduler.set_timesteps(steps, device="cpu")  # type: ignore[attr-defined]
    timesteps = tuple(int(t) for t in scheduler.timesteps)  # type: ignore[attr-defined]
    sigmas = np.asarray(scheduler.sigmas, dtype=np.float64)  # type: ignore[attr-defined]  # float32 values, len = steps + 1
    n = len(timesteps)
    p, q, a, b, c = [], [], [], [], []
    for k in range(n):
        alpha_s, sigma_s = _alpha_sigma(float(sigmas[k]))
        if prediction == "v_prediction":
            p.append(alpha_s)
            q.append(-sigma_s)
        else:
            p.append(1.0 / alpha_s)
            q.append(-sigma_s / alpha_s)
        alpha_t, sigma_t = _alpha_sigma(float(sigmas[k + 1]))
        lam_t, lam_s = _lam(alpha_t, sigma_t), _lam(alpha_s, sigma_s)
        h = lam_t - lam_s
        e = alpha_t * (math.exp(-h) - 1.0)  # exp(-inf) = 0 on the final σ = 0 step
        a.append(sigma_t / sigma_s)
        b.append(-e)
        # diffusers: the first step is first order (no history), and so is the last whatever
        # ``lower_order_final`` says, because the final σ is zero.
        if k == 0 or k == n - 1:
            c.append(0.0)
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(float(sigmas[k - 1]))
            h0 = lam_s - _lam(alpha_s1, sigma_s1)
            r0 = h0 / h
            c.append(-0.5 * e / r0)  # −0.5·α_t(e^{−h}−1)·D1 with D1 = (x0 − x0_prev)/r0
    return DPMSolverPlan(timesteps, tuple(p), tuple(q), tuple(a), tuple(b), tuple(c))


def dpmsolver_step(plan: DPMSolverPlan, k: int, x: torch.Tensor, out: torch.Tensor,
                   x0_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: (x_{k+1}, x0_k). Python-float coefficients: no host↔device traffic."""
    x0 = torch.add(x * plan.p[k], out, alpha=plan.q[k])
    a, b, c = plan.a[k], plan.b[k], plan.c[k]
    nxt = x0 * b if a == 0.0 else torch.add(x * a, x0, alpha=b)
    if c != 0.0 and x0_prev is not None:
        nxt = nxt.add_(x0 - x0_prev, alpha=c)
    return nxt, x0


def run_dpmsolver(denoise: Denoise, x: torch.Tensor, plan: DPMSolverPlan, timesteps: torch.Tensor) -> torch.Tensor:
    """The whole loop. ``x`` (groups, samples, horizon) is the initial noise; ``timesteps`` (steps,)
    float32 on x's device; ``denoise(x (N, H), t (N,))`` sees every row at once."""
    groups, samples, horizon = x.shape
    n = groups * samples
    x0_prev: torch.Tensor | None = None
    for k in range(plan.steps):
        out = denoise(x.reshape(n, horizon), timesteps[k].expand(n)).reshape(x.shape)
        x, x0_prev = dpmsolver_step(plan, k, x, out.float(), x0_prev)
    return x

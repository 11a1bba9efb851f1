"""Fused sampling loops (DPM-Solver++ 2M, UniPC bh2): the diffusers schedulers' arithmetic, precomputed.

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

UniPC (``UniPCMultistepScheduler``, bh2, order 2, predicting x0) is the same idea with a corrector:
at step k, before the predictor, the sample the last predictor made is corrected with the model output
just computed at it (no extra network evaluation) —

    x0_k    = p_k · x_k + q_k · out_k                     (x_k as predicted, uncorrected)
    x_k^c   = A_k · x_{k−1}^c + B_k · x0_{k−1} + C_k · (x0_{k−2} − x0_{k−1}) + E_k · (x0_k − x0_{k−1})
    x_{k+1} = a_k · x_k^c + b_k · x0_k + c_k · (x0_{k−1} − x0_k)

(k ≥ 1 for the corrector; C_k = 0 where the corrector is first order, c_k = 0 where the predictor is).
:func:`unipc_plan` computes the table in float64 as ``multistep_uni_c_bh_update`` /
``multistep_uni_p_bh_update`` do, for the orders ``step`` picks (warm-up and ``lower_order_final``).
Measured on the 5-minute model (docs/quality.md, "Few steps"): UniPC at 5 NFE scores the CRPS that
DPM-Solver++ needs 6–10 for (within noise), which is why it is fused too.
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
_REQUIRED_CONFIG: dict[str, object] = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "final_sigmas_type": "zero",
    "thresholding": False,
    "use_karras_sigmas": False,
    "euler_at_final": False,
    # flow σs use α = 1 − σ where the table assumes α² + σ² = 1; a learned variance splits the output
    "use_flow_sigmas": False,
    "variance_type": None,
    "use_dynamic_shifting": False,
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


def _configured_steps(scheduler: object, steps: int, required: dict[str, object],
                      algorithm: str) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(prediction type, timesteps, σs) of a configured diffusers scheduler set to ``steps``, after
    checking it has the configuration the fused loop of ``algorithm`` reproduces."""
    config = scheduler.config  # type: ignore[attr-defined]
    for key, want in required.items():
        if config.get(key, want) != want:
            raise ValueError(f"fused {algorithm} needs {key}={want!r}, scheduler has {config.get(key)!r}")
    prediction = config["prediction_type"]
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"fused {algorithm} supports epsilon and v_prediction, not {prediction!r}")
    if float(scheduler.init_noise_sigma) != 1.0:  # type: ignore[attr-defined]
        raise ValueError(f"fused {algorithm} assumes init_noise_sigma = 1")
    scheduler.set_timesteps(steps, device="cpu")  # type: ignore[attr-defined]
    timesteps = tuple(int(t) for t in scheduler.timesteps)  # type: ignore[attr-defined]
    sigmas = np.asarray(scheduler.sigmas, dtype=np.float64)  # type: ignore[attr-defined]  # float32 values, len = steps + 1
    return prediction, timesteps, sigmas


def _x0_coefficients(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) with x0 = p·x + q·model_output, as diffusers' ``convert_model_output``."""
    if prediction == "v_prediction":
        return alpha, -sigma
    return 1.0 / alpha, -sigma / alpha


def dpmsolver_plan(scheduler: object, steps: int) -> DPMSolverPlan:
    """The table for a diffusers ``DPMSolverMultistepScheduler`` (configured, not yet stepped)."""
    prediction, timesteps, sigmas = _configured_steps(scheduler, steps, _REQUIRED_CONFIG, "DPM-Solver++")
    n = len(timesteps)
    p, q, a, b, c = [], [], [], [], []
    for k in range(n):
        alpha_s, sigma_s = _alpha_sigma(float(sigmas[k]))
        pk, qk = _x0_coefficients(prediction, alpha_s, sigma_s)
        p.append(pk)
        q.append(qk)
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
    """One step: (x_{k+1}, x0_k). Python-float coefficients: no host↔device traffic.

    a·x + b·x0 + c·(x0 − x0_prev) is computed as a·x + (b + c)·x0 − c·x0_prev: one kernel less
    (no x0 − x0_prev temporary) on a step whose few kernels each cost more in launch than in
    arithmetic at these sizes."""
    x0 = torch.add(x * plan.p[k], out, alpha=plan.q[k])
    a, b, c = plan.a[k], plan.b[k], plan.c[k]
    if c == 0.0 or x0_prev is None:
        return (x0 * b if a == 0.0 else torch.add(x * a, x0, alpha=b)), x0
    nxt = x0 * (b + c) if a == 0.0 else torch.add(x * a, x0, alpha=b + c)
    return nxt.add_(x0_prev, alpha=-c), x0


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


# ------------------------------------------------------------------------------------------ UniPC
_UNIPC_REQUIRED_CONFIG: dict[str, object] = {
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}


@dataclass(frozen=True)
class UniPCPlan:
    """Per-step coefficients of UniPC bh2 (order 2, x0 prediction) for one (schedule, step count)."""

    timesteps: tuple[int, ...]
    p: tuple[float, ...]  # x0 = p·x + q·model_output
    q: tuple[float, ...]
    corr_a: tuple[float, ...]  # the corrector (step k ≥ 1; index 0 unused), see the module docstring
    corr_b: tuple[float, ...]
    corr_c: tuple[float, ...]  # 0.0 where the corrector is first order
    corr_e: tuple[float, ...]
    a: tuple[float, ...]  # the predictor: x_next = a·x^c + b·x0 + c·(x0_prev − x0)
    b: tuple[float, ...]
    c: tuple[float, ...]  # 0.0 on first-order steps

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _unipc_b(hh: float, order: int) -> list[float]:
    """diffusers' ``b`` vector of the B(h) = e^hh − 1 (bh2) variant, for ``order`` terms."""
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, out = 1, []
    for i in range(1, order + 1):
        out.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return out


def unipc_plan(scheduler: object, steps: int) -> UniPCPlan:
    """The table for a diffusers ``UniPCMultistepScheduler`` (configured, not yet stepped)."""
    if getattr(scheduler, "solver_p", None) is not None:
        raise ValueError("fused UniPC does not run a solver_p predictor")
    prediction, timesteps, sigmas = _configured_steps(scheduler, steps, _UNIPC_REQUIRED_CONFIG, "UniPC")
    n = len(timesteps)
    alpha_sigma = [_alpha_sigma(float(s)) for s in sigmas]
    lam = [_lam(a, s) for a, s in alpha_sigma]
    # the order ``step`` uses at k: warm-up (k + 1 outputs so far) and lower_order_final
    order = [min(2, n - k, k + 1) for k in range(n)]
    p, q = [], []
    ca, cb, cc, ce = [0.0], [0.0], [0.0], [0.0]
    a, b, c = [], [], []
    for k in range(n):
        alpha_s, sigma_s = alpha_sigma[k]
        pk, qk = _x0_coefficients(prediction, alpha_s, sigma_s)
        p.append(pk)
        q.append(qk)
        if k >= 1:  # the corrector of x_k, at the order the predictor that made x_k had
            alpha_t, sigma_t = alpha_sigma[k]
            h = lam[k] - lam[k - 1]
            # −α_t·h·φ₁(h) on x0_{k−1}, and −α_t·B(h) on the differences: the same number for bh2
            scale = -alpha_t * math.expm1(-h)
            ca.append(sigma_t / alpha_sigma[k - 1][1])
            cb.append(scale)
            if order[k - 1] == 1:
                cc.append(0.0)
                ce.append(scale * 0.5)
            else:
                rk = (lam[k - 2] - lam[k - 1]) / h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(_unipc_b(-h, 2)))
                cc.append(scale * float(rho[0]) / rk)
                ce.append(scale * float(rho[1]))
        alpha_t, sigma_t = alpha_sigma[k + 1]
        h = lam[k + 1] - lam[k]  # inf on the final σ = 0 step: expm1(−inf) = −1
        scale = -alpha_t * math.expm1(-h)
        a.append(sigma_t / sigma_s if sigma_t else 0.0)
        b.append(scale)
        if order[k] == 1:
            c.append(0.0)
        else:
            c.append(scale * 0.5 / ((lam[k - 1] - lam[k]) / h))  # rhos_p = 0.5 for order 2, over rk
    return UniPCPlan(timesteps, tuple(p), tuple(q), tuple(ca), tuple(cb), tuple(cc), tuple(ce),
                     tuple(a), tuple(b), tuple(c))


@dataclass
class UniPCState:
    """What UniPC carries from one step to the next: the corrected sample and the last two x0s."""

    x_corrected: torch.Tensor | None = None  # x_{k−1}^c
    x0_prev: torch.Tensor | None = None  # x0_{k−1}
    x0_prev2: torch.Tensor | None = None  # x0_{k−2}


def unipc_step(plan: UniPCPlan, k: int, x: torch.Tensor, out: torch.Tensor, state: UniPCState) -> torch.Tensor:
    """One step: corrects ``x`` (= x_k as predicted) with ``out``, returns x_{k+1}; updates ``state``.
    Python-float coefficients: no host↔device traffic."""
    x0 = torch.add(x * plan.p[k], out, alpha=plan.q[k])
    a, b, c = plan.a[k], plan.b[k], plan.c[k]
    x_prev, m0, m1 = state.x_corrected, state.x0_prev, state.x0_prev2
    if k >= 1:
        if x_prev is None or m0 is None or (plan.corr_c[k] != 0.0 and m1 is None):
            raise ValueError(f"UniPC step {k} needs the state of the steps before it")
        # The corrected sample feeds only the predictor's a·x term: on the final step (a = 0, to
        # σ = 0) nothing reads it — diffusers computes it and drops it — so it is not computed.
        if a != 0.0:
            xc = torch.add(x_prev * plan.corr_a[k], m0, alpha=plan.corr_b[k])
            if m1 is not None and plan.corr_c[k] != 0.0:
                xc.add_(m1 - m0, alpha=plan.corr_c[k])
            x = xc.add_(x0 - m0, alpha=plan.corr_e[k])
    nxt = x0 * b if a == 0.0 else torch.add(x * a, x0, alpha=b)
    if c != 0.0 and m0 is not None:
        nxt.add_(m0 - x0, alpha=c)
    state.x_corrected, state.x0_prev2, state.x0_prev = x, m0, x0
    return nxt


def run_unipc(denoise: Denoise, x: torch.Tensor, plan: UniPCPlan, timesteps: torch.Tensor) -> torch.Tensor:
    """The whole loop, as :func:`run_dpmsolver`."""
    groups, samples, horizon = x.shape
    n = groups * samples
    state = UniPCState()
    for k in range(plan.steps):
        out = denoise(x.reshape(n, horizon), timesteps[k].expand(n)).reshape(x.shape)
        x = unipc_step(plan, k, x, out.float(), state)
    return x


# ------------------------------------------------------------------------------------ either loop
FusedPlan = DPMSolverPlan | UniPCPlan


def fused_plan_for(scheduler: object, steps: int) -> FusedPlan:
    """The table of whichever fused loop reproduces ``scheduler`` (DPM-Solver++ or UniPC)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return dpmsolver_plan(scheduler, steps)
    if isinstance(scheduler, UniPCMultistepScheduler):
        return unipc_plan(scheduler, steps)
    raise ValueError(f"no fused loop for {type(scheduler).__name__}")


def run_fused(denoise: Denoise, x: torch.Tensor, plan: FusedPlan, timesteps: torch.Tensor) -> torch.Tensor:
    """The fused loop of ``plan``'s algorithm over initial noise ``x`` (groups, samples, horizon)."""
    if isinstance(plan, UniPCPlan):
        return run_unipc(denoise, x, plan, timesteps)
    return run_dpmsolver(denoise, x, plan, timesteps)

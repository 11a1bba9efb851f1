"""Samplers: diffusers schedulers built from the training schedule, and one batched sampling loop.

Each algorithm is one entry of :data:`SAMPLERS` (a scheduler class plus its configuration); a fresh
scheduler object is built for every sampling call because schedulers carry state between steps
(multistep history, step index), so two batches in flight can never corrupt each other.

Every scheduler gets ``trained_betas`` and the training ``prediction_type`` verbatim; sample clipping
and thresholding are off (returns are not images in [-1, 1]); Karras sigmas are off (with a cosine
schedule they hit a diffusers IndexError in DPM-Solver++); timesteps are "trailing" so the first
step is the last training step, i.e. pure noise.

The sample tensor is shaped (groups, samples, horizon), where a group is one symbol and bar. Initial
noise and any per-step noise come from one generator per group (diffusers' ``randn_tensor`` draws
row ``g`` from ``generators[g]``), so a group's forecast does not depend on which other groups share
its batch.

DPM-Solver++ 2M ("dpmpp", the default) and UniPC ("unipc") run as fused loops
(:mod:`worker.model.fused`): the same arithmetic as diffusers' ``step`` from a coefficient table
computed once per (schedule, steps), with no per-step scheduler work. "dpmpp-diffusers" and
"unipc-diffusers" are the same samplers through the diffusers schedulers — selectable everywhere a
scheduler name is, and the references the fused loops are tested against.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from worker.model.fused import FusedPlan, fused_plan_for, run_fused
from worker.model.noise import InitialNoise, initial_noise
from worker.model.schedule import NoiseSchedule

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_cls: type[Any]  # a diffusers scheduler class
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    full_schedule: bool = False  # the reference: one step per training timestep, ``steps`` ignored
    stochastic: bool = False  # draws fresh noise in ``step``: needs the per-group generators
    fused: bool = False  # run by a fused loop (worker.model.fused: DPM-Solver++, UniPC), not ``scheduler.step``


_DPMPP_CONFIG: dict[str, Any] = {
    "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
    "use_karras_sigmas": False, "final_sigmas_type": "zero", "thresholding": False, "timestep_spacing": "trailing",
}

_UNIPC_CONFIG: dict[str, Any] = {
    "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "thresholding": False,
    "use_karras_sigmas": False, "timestep_spacing": "trailing", "final_sigmas_type": "zero",
}

SAMPLERS: dict[str, SamplerSpec] = {
    "dpmpp": SamplerSpec(
        DPMSolverMultistepScheduler, dict(_DPMPP_CONFIG),
        "DPM-Solver++ 2M (deterministic, multistep), fused loop", fused=True,
    ),
    "dpmpp-diffusers": SamplerSpec(
        DPMSolverMultistepScheduler, dict(_DPMPP_CONFIG),
        "DPM-Solver++ 2M through the diffusers scheduler (the fused loop's reference)",
    ),
    "ddim": SamplerSpec(
        DDIMScheduler,
        {"clip_sample": False, "thresholding": False, "set_alpha_to_one": True, "timestep_spacing": "trailing"},
        "DDIM, eta=0",
    ),
    "euler": SamplerSpec(
        EulerDiscreteScheduler,
        {"timestep_spacing": "trailing", "use_karras_sigmas": False, "final_sigmas_type": "zero"},
        "Euler (k-diffusion discrete)",
    ),
    "kdpm2": SamplerSpec(
        KDPM2DiscreteScheduler,
        {"timestep_spacing": "trailing", "use_karras_sigmas": False},
        "KDPM2 (2 model evaluations per step)",
    ),
    "unipc": SamplerSpec(
        UniPCMultistepScheduler, dict(_UNIPC_CONFIG),
        "UniPC bh2 predictor-corrector (multistep), fused loop", fused=True,
    ),
    "unipc-diffusers": SamplerSpec(
        UniPCMultistepScheduler, dict(_UNIPC_CONFIG),
        "UniPC through the diffusers scheduler (the fused loop's reference)",
    ),
    "reference": SamplerSpec(
        DDPMScheduler,
        {"clip_sample": False, "thresholding": False, "variance_type": "fixed_small",
         "timestep_spacing": "leading"},
        "ancestral DDPM over every training step",
        full_schedule=True,
        stochastic=True,
    ),
}


Sampler = str | SamplerSpec  # a SAMPLERS name, or a configuration of any diffusers scheduler

_REFERENCE_SUFFIX = "-diffusers"


def diffusers_reference(name: str) -> str:
    """The registered diffusers loop a fused sampler is tested (and benchmarked) against."""
    return f"{name}{_REFERENCE_SUFFIX}"


def algorithm_of(name: str) -> str:
    """The sampler a SAMPLERS name runs, by the name of its fused loop: ``"dpmpp-diffusers"`` and
    ``"dpmpp"`` are one algorithm (the same samples to float rounding), so a calibration fitted
    through either holds for both. Any other name is its own."""
    base = name.removesuffix(_REFERENCE_SUFFIX)
    if base != name and base in SAMPLERS and SAMPLERS[base].fused:
        return base
    return name


def resolve_sampler(sampler: Sampler) -> tuple[str, SamplerSpec]:
    """``(label, spec)``: a name is looked up; a spec equal to a registered one takes its name (so a spec
    equal to dpmpp's runs the fused loop); any other spec is labelled by its class. A spec asking for a
    fused loop must be a validated one (dpmpp, unipc): the loops implement only those configurations."""
    if isinstance(sampler, str):
        try:
            return sampler, SAMPLERS[sampler]
        except KeyError:
            raise ValueError(f"unknown scheduler {sampler!r}; choose one of {sorted(SAMPLERS)}") from None
    if not isinstance(sampler, SamplerSpec):
        raise ValueError(f"scheduler must be a SAMPLERS name or a SamplerSpec, got {type(sampler).__name__}")
    for name, spec in SAMPLERS.items():
        if spec == sampler:
            return name, spec
    if sampler.fused:
        raise ValueError("only the validated dpmpp and unipc configurations run a fused loop; set fused=False")
    if not (isinstance(sampler.scheduler_cls, type) and issubclass(sampler.scheduler_cls, SchedulerMixin)):
        raise ValueError(f"scheduler_cls must be a diffusers scheduler class, got {sampler.scheduler_cls!r}")
    return f"custom:{sampler.scheduler_cls.__name__}", sampler


def make_scheduler(name: Sampler, schedule: NoiseSchedule) -> SchedulerMixin:
    """A new scheduler object for one sampling call, on the training schedule."""
    _, spec = resolve_sampler(name)
    return spec.scheduler_cls(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=list(schedule.betas),
        prediction_type=schedule.prediction_type,
        **spec.config,
    )


@dataclass(frozen=True)
class SampleResult:
    paths: torch.Tensor  # (groups, samples, horizon) in the model's normalised units
    nfe: int  # network evaluations actually made


@functools.lru_cache(maxsize=64)
def fused_plan(name: str, schedule: NoiseSchedule, steps: int) -> FusedPlan:
    """The coefficient table of a fused sampler, built once per (sampler, schedule, steps)."""
    return fused_plan_for(make_scheduler(name, schedule), steps)


_timestep_tensors: dict[tuple[FusedPlan, torch.device], torch.Tensor] = {}
_timestep_lock = threading.Lock()


def plan_timesteps(plan: FusedPlan, device: torch.device) -> torch.Tensor:
    """The plan's timesteps as a float32 tensor on ``device``, made once and then only read. On CUDA
    the one-time copy is waited for, so a tensor made on one stream is complete before any other
    stream reads it."""
    key = (plan, device)
    ts = _timestep_tensors.get(key)
    if ts is None:
        with _timestep_lock:
            ts = _timestep_tensors.get(key)
            if ts is None:
                ts = torch.tensor(plan.timesteps, dtype=torch.float32, device=device)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                _timestep_tensors[key] = ts
    return ts


def _step_takes_generator(scheduler: SchedulerMixin) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters  # type: ignore[attr-defined]


def sample_paths(
    denoise: Denoise,
    *,
    schedule: NoiseSchedule,
    scheduler: Sampler,
    steps: int,
    groups: int,
    samples: int,
    horizon: int,
    generators: Sequence[torch.Generator],
    device: torch.device,
    cuda_graphs: bool = False,
    noise: InitialNoise = "iid",
    horizon_bars: Sequence[int] | None = None,
) -> SampleResult:
    """Run one scheduler over a batch. ``denoise(x (N, H), t (N,))`` sees all groups × samples at once.

    ``cuda_graphs``: on CUDA, run a fused sampler with a bound network (``SSSDDenoiser.bind``) as one
    captured graph per (stream, batch-size bucket, steps) (worker/model/graphs.py); anything else
    runs eagerly. ``noise``/``horizon_bars``: the initial noise (worker/model/noise.py)."""
    if len(generators) != groups:
        raise ValueError(f"need one generator per group: {len(generators)} != {groups}")
    name, spec = resolve_sampler(scheduler)
    if spec.fused:
        plan = fused_plan(name, schedule, steps)
        x = randn_tensor((groups, samples, horizon), generator=list(generators), device=device, dtype=torch.float32)
        x = initial_noise(noise, x, horizon_bars, generators)
        if cuda_graphs:
            from worker.model import graphs  # imports the network: only when asked for

            if graphs.graph_capable(denoise, device):
                graphed = graphs.sample_graphed(denoise, x, plan, plan_timesteps(plan, device))  # type: ignore[arg-type]
                if graphed is not None:  # None: this shape could not be captured; eager below
                    return SampleResult(paths=graphed, nfe=plan.steps)
        return SampleResult(paths=run_fused(denoise, x, plan, plan_timesteps(plan, device)), nfe=plan.steps)
    sched = make_scheduler(spec, schedule)
    n_steps = schedule.num_train_timesteps if spec.full_schedule else steps
    if isinstance(sched, DDIMScheduler) and schedule.num_train_timesteps % n_steps:
        raise ValueError(
            f"ddim needs a step count that divides {schedule.num_train_timesteps} (got {n_steps}): diffusers' DDIM "
            f"steps by T // steps, which does not land on the trailing timesteps otherwise; use euler (the same "
            f"sampler) or dpmpp"
        )
    sched.set_timesteps(n_steps, device=device)  # type: ignore[attr-defined]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)  # avoids a device->host sync looking up the first step on GPU
    gens = list(generators)
    x = randn_tensor((groups, samples, horizon), generator=gens, device=device, dtype=torch.float32)
    x = initial_noise(noise, x, horizon_bars, gens)
    x = x * sched.init_noise_sigma  # type: ignore[attr-defined]
    # Only stochastic steps get the generators. Euler's step draws (and, with s_churn=0, discards)
    # noise every step: with CPU generators that would be a host->device copy per step on GPU.
    # A spec of our own says whether it is stochastic; any other gets the generators if its step takes
    # them (correct for ancestral samplers; a wasted draw at worst).
    registered = name in SAMPLERS
    stochastic = (spec.stochastic or not registered) and _step_takes_generator(sched)
    step_kwargs: dict[str, Any] = {"generator": gens} if stochastic else {}
    n = groups * samples
    nfe = 0
    for t in sched.timesteps:  # type: ignore[attr-defined]
        model_in = sched.scale_model_input(x, t)  # type: ignore[attr-defined]
        t_batch = t.to(device=device, dtype=torch.float32).expand(n)
        out = denoise(model_in.reshape(n, horizon), t_batch).reshape(groups, samples, horizon)
        nfe += 1
        x = sched.step(out, t, x, return_dict=False, **step_kwargs)[0]  # type: ignore[attr-defined]
    return SampleResult(paths=x, nfe=nfe)

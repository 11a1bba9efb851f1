"""The fused DPM-Solver++ 2M and UniPC loops against the diffusers schedulers they replace, step by step."""

from __future__ import annotations

import pytest
import torch

from worker.model.fused import UniPCPlan, UniPCState, dpmsolver_plan, dpmsolver_step, unipc_plan, unipc_step
from worker.model.samplers import SAMPLERS, fused_plan, make_scheduler, plan_timesteps, sample_paths
from worker.model.schedule import NoiseSchedule

CPU = torch.device("cpu")


def _nonlinear_denoiser(seed: int = 0) -> object:
    """A fixed, smooth, t-dependent function of x: enough to make every coefficient matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 6, generator=g) * 0.4

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t[:, None] / 200.0).float()
        return torch.tanh(x @ w[: x.shape[1], : x.shape[1]]) * (1 - s) + 0.3 * x * s + 0.1 * torch.sin(3 * x)

    return denoise


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 14, 20, 50])
def test_every_step_matches_diffusers(prediction: str, steps: int) -> None:
    schedule = NoiseSchedule.cosine(200, prediction_type=prediction)  # type: ignore[arg-type]
    plan = fused_plan("dpmpp", schedule, steps)
    ref = make_scheduler("dpmpp-diffusers", schedule)
    ref.set_timesteps(steps)  # type: ignore[attr-defined]
    assert plan.timesteps == tuple(int(t) for t in ref.timesteps)  # type: ignore[attr-defined]
    den = _nonlinear_denoiser()
    x0 = torch.randn(64, 6, generator=torch.Generator().manual_seed(steps))
    x_ref, x_fused, prev = x0.clone(), x0.clone(), None
    for k, t in enumerate(ref.timesteps):  # type: ignore[attr-defined]
        t_batch = t.float().expand(x0.shape[0])
        x_ref = ref.step(den(x_ref, t_batch), t, x_ref, return_dict=False)[0]  # type: ignore[attr-defined]
        x_fused, prev = dpmsolver_step(plan, k, x_fused, den(x_fused, t_batch), prev)
        scale = max(1.0, float(x_ref.abs().max()))
        diff = float((x_fused - x_ref).abs().max())
        assert diff <= 1e-5 * scale, f"step {k} (t={int(t)}): max abs diff {diff:.2e}"


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 20, 50])
def test_every_unipc_step_matches_diffusers(prediction: str, steps: int) -> None:
    """Predictor and corrector at every step, including the first-order warm-up, the second-order
    corrector from step 2 on, and the final first-order step to σ = 0."""
    schedule = NoiseSchedule.cosine(200, prediction_type=prediction)  # type: ignore[arg-type]
    plan = fused_plan("unipc", schedule, steps)
    assert isinstance(plan, UniPCPlan)
    ref = make_scheduler("unipc-diffusers", schedule)
    ref.set_timesteps(steps)  # type: ignore[attr-defined]
    assert plan.timesteps == tuple(int(t) for t in ref.timesteps)  # type: ignore[attr-defined]
    den = _nonlinear_denoiser(2)
    x0 = torch.randn(64, 6, generator=torch.Generator().manual_seed(steps))
    x_ref, x_fused, state = x0.clone(), x0.clone(), UniPCState()
    for k, t in enumerate(ref.timesteps):  # type: ignore[attr-defined]
        t_batch = t.float().expand(x0.shape[0])
        x_ref = ref.step(den(x_ref, t_batch), t, x_ref, return_dict=False)[0]  # type: ignore[attr-defined]
        x_fused = unipc_step(plan, k, x_fused, den(x_fused, t_batch), state)
        scale = max(1.0, float(x_ref.abs().max()))
        diff = float((x_fused - x_ref).abs().max())
        assert diff <= 1e-5 * scale, f"step {k} (t={int(t)}): max abs diff {diff:.2e}"
    if steps >= 3:  # the second-order corrector and predictor took part
        assert any(c != 0.0 for c in plan.corr_c) and any(c != 0.0 for c in plan.c)


def test_unipc_is_not_dpmsolver() -> None:
    """The corrector matters: the two fused loops differ on the same denoiser (a shared bug in the
    test harness would otherwise pass both)."""
    schedule = NoiseSchedule.cosine(200)
    den = _nonlinear_denoiser(3)
    kw = {"schedule": schedule, "steps": 5, "groups": 1, "samples": 32, "horizon": 6, "device": CPU}
    a = sample_paths(den, scheduler="unipc", generators=[torch.Generator().manual_seed(4)], **kw)  # type: ignore[arg-type]
    b = sample_paths(den, scheduler="dpmpp", generators=[torch.Generator().manual_seed(4)], **kw)  # type: ignore[arg-type]
    assert float((a.paths - b.paths).abs().max()) > 1e-3


@pytest.mark.parametrize("sampler", ["dpmpp", "unipc"])
def test_sample_paths_fused_equals_diffusers_loop(sampler: str) -> None:
    schedule = NoiseSchedule.cosine(200)
    den = _nonlinear_denoiser(1)
    kw = {"schedule": schedule, "steps": 10, "groups": 3, "samples": 40, "horizon": 6, "device": CPU}
    fused = sample_paths(den, scheduler=sampler, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                         **kw)  # type: ignore[arg-type]
    ref = sample_paths(den, scheduler=f"{sampler}-diffusers",
                       generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)  # type: ignore[arg-type]
    assert fused.nfe == ref.nfe == 10
    assert float((fused.paths - ref.paths).abs().max()) <= 1e-5


def test_plan_is_built_once_per_schedule_and_steps() -> None:
    schedule = NoiseSchedule.cosine(200)
    assert fused_plan("dpmpp", schedule, 10) is fused_plan("dpmpp", schedule, 10)
    assert fused_plan("dpmpp", schedule, 10) is not fused_plan("dpmpp", schedule, 12)
    plan = fused_plan("dpmpp", schedule, 10)
    assert plan_timesteps(plan, CPU) is plan_timesteps(plan, CPU)
    assert plan_timesteps(plan, CPU).tolist() == [float(t) for t in plan.timesteps]


def test_only_the_configuration_it_reproduces_is_fused() -> None:
    assert [n for n, s in SAMPLERS.items() if s.fused] == ["dpmpp", "unipc"]
    schedule = NoiseSchedule.cosine(200)
    sde = SAMPLERS["dpmpp"].scheduler_cls(num_train_timesteps=200, trained_betas=list(schedule.betas),
                                          algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="algorithm_type"):
        dpmsolver_plan(sde, 10)

    flow = SAMPLERS["dpmpp"].scheduler_cls(num_train_timesteps=200, trained_betas=list(schedule.betas),
                                           use_flow_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        dpmsolver_plan(flow, 10)


@pytest.mark.parametrize("override", [
    {"solver_type": "bh1"}, {"solver_order": 3}, {"predict_x0": False}, {"lower_order_final": False},
    {"disable_corrector": [2]}, {"final_sigmas_type": "sigma_min"}, {"use_flow_sigmas": True},
    {"thresholding": True}, {"use_karras_sigmas": True},
])
def test_a_unipc_configuration_the_table_does_not_reproduce_is_refused(override: dict[str, object]) -> None:
    schedule = NoiseSchedule.cosine(200)
    config = {**SAMPLERS["unipc"].config, **override}
    scheduler = SAMPLERS["unipc"].scheduler_cls(num_train_timesteps=200, trained_betas=list(schedule.betas),
                                                prediction_type=schedule.prediction_type, **config)
    with pytest.raises(ValueError, match=next(iter(override))):
        unipc_plan(scheduler, 10)


@pytest.mark.parametrize("spacing", [{"timestep_spacing": "linspace"},
                                     {"timestep_spacing": "leading", "steps_offset": 1},
                                     {"rescale_betas_zero_snr": True}])
def test_unipc_table_follows_the_schedulers_own_timesteps(spacing: dict[str, object]) -> None:
    """Spacing options change the timesteps and σs, which the table reads from the scheduler."""
    schedule = NoiseSchedule.cosine(200)
    config = {**SAMPLERS["unipc"].config, **spacing}

    def build() -> object:
        return SAMPLERS["unipc"].scheduler_cls(num_train_timesteps=200, trained_betas=list(schedule.betas),
                                               prediction_type=schedule.prediction_type, **config)

    plan, ref = unipc_plan(build(), 8), build()
    ref.set_timesteps(8)  # type: ignore[attr-defined]
    den = _nonlinear_denoiser(5)
    x_ref = torch.randn(32, 6, generator=torch.Generator().manual_seed(9))
    x_fused, state = x_ref.clone(), UniPCState()
    for k, t in enumerate(ref.timesteps):  # type: ignore[attr-defined]
        t_batch = t.float().expand(x_ref.shape[0])
        x_ref = ref.step(den(x_ref, t_batch), t, x_ref, return_dict=False)[0]  # type: ignore[attr-defined]
        x_fused = unipc_step(plan, k, x_fused, den(x_fused, t_batch), state)
    assert float((x_fused - x_ref).abs().max()) <= 1e-5 * max(1.0, float(x_ref.abs().max()))


def test_a_unipc_step_without_the_earlier_steps_state_is_refused() -> None:
    plan = fused_plan("unipc", NoiseSchedule.cosine(200), 6)
    assert isinstance(plan, UniPCPlan)
    x = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="state of the steps before it"):
        unipc_step(plan, 2, x, x, UniPCState())

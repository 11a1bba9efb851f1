"""The training schedule is the sampling schedule, and it ends near pure noise."""

from __future__ import annotations

import math

import pytest
import torch

from worker.model.samplers import SAMPLERS, make_scheduler
from worker.model.schedule import MAX_FINAL_ALPHA_BAR, NoiseSchedule, noisy_and_target

SCHEDULES = {
    "cosine-v": NoiseSchedule.cosine(200),
    "cosine-eps": NoiseSchedule.cosine(200, prediction_type="epsilon"),
    "cosine-v-1000": NoiseSchedule.cosine(1000),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_scheduler_alphas_cumprod_equal_trainings(sampler: str, sched_name: str) -> None:
    schedule = SCHEDULES[sched_name]
    sched = make_scheduler(sampler, schedule)
    assert torch.equal(sched.alphas_cumprod, schedule.alphas_cumprod())
    assert sched.config.prediction_type == schedule.prediction_type
    assert sched.config.num_train_timesteps == schedule.num_train_timesteps
    for flag in ("clip_sample", "thresholding", "use_karras_sigmas"):
        if flag in sched.config:
            assert sched.config[flag] is False, f"{sampler}: {flag} must be off"


@pytest.mark.parametrize("sampler", [s for s, spec in SAMPLERS.items() if not spec.full_schedule])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_sampling_starts_at_the_last_training_step(sampler: str, steps: int) -> None:
    """'trailing' spacing: the first model call is at t = T-1, where the data is (almost) pure noise."""
    schedule = NoiseSchedule.cosine(200)
    sched = make_scheduler(sampler, schedule)
    sched.set_timesteps(steps)
    assert float(sched.timesteps[0]) == pytest.approx(schedule.num_train_timesteps - 1)


def test_reference_sampler_visits_every_training_step() -> None:
    schedule = NoiseSchedule.cosine(200)
    sched = make_scheduler("reference", schedule)
    sched.set_timesteps(schedule.num_train_timesteps)
    assert sched.timesteps.tolist() == list(range(199, -1, -1))


def test_a_fresh_scheduler_object_per_call() -> None:
    schedule = NoiseSchedule.cosine(200)
    assert make_scheduler("dpmpp", schedule) is not make_scheduler("dpmpp", schedule)
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        make_scheduler("nope", schedule)


def test_cosine_ends_near_pure_noise() -> None:
    for timesteps in (50, 200, 1000):
        ab = NoiseSchedule.cosine(timesteps).alphas_cumprod()
        assert float(ab[-1]) <= MAX_FINAL_ALPHA_BAR
        assert float(ab[0]) > 0.99
        assert (ab[1:] < ab[:-1]).all()


def test_linear_200_is_rejected_far_from_pure_noise() -> None:
    """The original SSSD schedule: alpha_bar_T ≈ 0.13 after 200 steps of linspace(1e-4, 0.02)."""
    betas = torch.linspace(1e-4, 0.02, 200, dtype=torch.float64)
    assert math.isclose(float(torch.prod(1 - betas)), 0.134, abs_tol=0.005)
    with pytest.raises(ValueError, match=r"alpha_bar_T=0\.13\d*, far from pure noise"):
        NoiseSchedule.linear(200)
    # The same betas over 1000 steps do reach noise, and are accepted.
    assert float(NoiseSchedule.linear(1000).alphas_cumprod()[-1]) < MAX_FINAL_ALPHA_BAR


@pytest.mark.parametrize(
    ("betas", "match"),
    [
        ((0.1, float("nan")), "finite"),
        ((0.1, 1.0), "strictly between 0 and 1"),
        ((0.0, 0.5), "strictly between 0 and 1"),
        ((0.5,), "at least 2"),
    ],
)
def test_invalid_betas_are_refused(betas: tuple[float, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(betas=betas)


def test_unknown_prediction_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown prediction type"):
        NoiseSchedule(betas=NoiseSchedule.cosine(50).betas, prediction_type="sample")  # type: ignore[arg-type]


def test_cosine_matches_diffusers_squaredcos_cap_v2() -> None:
    from diffusers import DDPMScheduler

    ours = NoiseSchedule.cosine(200)
    theirs = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(torch.tensor(ours.betas, dtype=torch.float32), theirs.betas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_noisy_and_target_are_the_forward_process(prediction_type: str) -> None:
    schedule = NoiseSchedule.cosine(200, prediction_type=prediction_type)  # type: ignore[arg-type]
    ab = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    t = torch.randint(0, 200, (64,), generator=g)
    x_t, target = noisy_and_target(x0, noise, t, ab, prediction_type)  # type: ignore[arg-type]
    a = ab[t][:, None]
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    if prediction_type == "epsilon":
        torch.testing.assert_close(target, noise)
    else:  # v = sqrt(ab) eps - sqrt(1-ab) x0, so that x0 = sqrt(ab) x_t - sqrt(1-ab) v
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * target, x0, atol=1e-5, rtol=1e-5)

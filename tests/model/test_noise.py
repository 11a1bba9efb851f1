"""The sampler's initial noise: stratified along the horizons, still N(0, I) per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from worker.model.noise import initial_noise, segments, stratify


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _draw(groups: int, samples: int, path: int, seed: int = 0) -> torch.Tensor:
    gens = _gens(groups, seed)
    x = torch.stack([torch.randn(samples, path, generator=g) for g in gens])
    return stratify(x, [3, 12, 48], gens)


def test_segments_split_the_path_at_the_horizons() -> None:
    assert segments([3, 12, 48], 48) == [(0, 3), (3, 12), (12, 48)]
    assert segments([12, 3], 48) == [(0, 3), (3, 12), (12, 48)]  # order and the path end do not matter
    assert segments([1, 4], 4) == [(0, 1), (1, 4)]


def test_each_segment_sum_takes_one_value_per_stratum_in_every_group() -> None:
    samples = 64
    x = _draw(5, samples, 48)
    for a, b in segments([3, 12, 48], 48):
        proj = x[:, :, a:b].sum(dim=2) / (b - a) ** 0.5
        strata = torch.floor(torch.special.ndtr(proj.double()) * samples)
        for g in range(x.shape[0]):
            assert sorted(strata[g].tolist()) == list(range(samples))  # every stratum exactly once


def test_the_two_longest_segments_are_stratified_jointly() -> None:
    """What a Latin hypercube would not give: the 12- and 48-bar sums span several segments, so the
    segments' values must also be spread in pairs — each of the 8 x 8 equal-probability boxes of the
    two longest segments' components holds exactly one of the 64 samples."""
    x = _draw(4, 64, 48)
    proj = {seg: torch.special.ndtr((x[:, :, seg[0]:seg[1]].sum(dim=2) / (seg[1] - seg[0]) ** 0.5).double())
            for seg in ((12, 48), (3, 12))}
    boxes = torch.floor(proj[(12, 48)] * 8) * 8 + torch.floor(proj[(3, 12)] * 8)
    for g in range(4):
        assert sorted(boxes[g].tolist()) == list(range(64))


def test_every_sample_is_still_standard_normal_and_independent_across_bars() -> None:
    x = _draw(400, 16, 48).reshape(-1, 48).double().numpy()  # 6,400 paths
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    for j in (0, 5, 30):  # one bar of each segment: N(0, 1) by a KS test
        assert stats.kstest(x[:, j], "norm").pvalue > 1e-3
    cov = np.cov(x, rowvar=False)
    assert np.abs(cov - np.eye(48)).max() < 0.08  # the bars stay uncorrelated with unit variance
    sums = x[:, :12].sum(1) / np.sqrt(12)
    assert stats.kstest(sums, "norm").pvalue > 1e-3


def test_stratified_quantiles_of_the_horizon_sums_have_far_less_monte_carlo_error() -> None:
    """What it is for: the 90 % quantile of the 15m sum from 64 samples, over many groups."""
    groups, samples = 300, 64
    gens = _gens(groups, 7)
    iid = torch.stack([torch.randn(samples, 48, generator=g) for g in gens])
    strat = stratify(iid, [3, 12, 48], gens)
    q = stats.norm.ppf(0.9)
    for bars, gain in ((3, 5), (12, 2)):
        errs = {}
        for name, x in (("iid", iid), ("strat", strat)):
            s = (x[:, :, :bars].sum(2) / bars**0.5).double().numpy()
            errs[name] = float(np.mean((np.quantile(s, 0.9, axis=1) - q) ** 2))
        assert errs["strat"] < errs["iid"] / gain, bars


def test_the_noise_depends_on_the_seed_only_and_iid_is_left_alone() -> None:
    a = _draw(3, 32, 48, seed=5)
    b = _draw(3, 32, 48, seed=5)
    assert torch.equal(a, b)
    gens = _gens(2)
    x = torch.randn(2, 8, 48)
    assert initial_noise("iid", x, [3, 12, 48], gens) is x
    with pytest.raises(ValueError, match="unknown initial noise"):
        initial_noise("sobol", x, [3], gens)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one generator per group"):
        stratify(x, [3], _gens(1))

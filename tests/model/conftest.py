"""Fixtures for the model tests.

``tiny_ckpt_dir`` is a real checkpoint directory written by ``save_checkpoint`` with a manifest built
the way ``training.train`` builds it (real normalisation fitted on the shipped EURUSD year, the cosine
schedule), around a tiny random-weights network. The output projection is re-initialised with random
weights (training zero-initialises it, which would make the network ignore its inputs), so the forecasts
depend on the context, the noise and the step: the batch-independence tests would prove nothing otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import worker
from worker.features.candles import CandleSeries, iso, load_csv
from worker.features.transform import BAR_FEATURES, FeatureSpec, fit_normalization, origin_ok
from worker.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.schedule import NoiseSchedule

HOUR_MS = 3_600_000
HORIZONS_MS = [HOUR_MS, 4 * HOUR_MS]
TINY = NetworkConfig(bar_features=len(BAR_FEATURES), horizon=4, channels=8, state=4, encoder_blocks=1,
                     denoiser_blocks=1)


@pytest.fixture(scope="session")
def eurusd() -> CandleSeries:
    return load_csv(Path(worker.__file__).parent / "data" / "eurusd_h1_2017_ask.csv")


def tiny_model(seed: int = 0, cfg: NetworkConfig = TINY) -> SSSDDenoiser:
    torch.manual_seed(seed)
    model = SSSDDenoiser(cfg)
    torch.nn.init.normal_(model.proj.weight, std=0.5)
    torch.nn.init.normal_(model.proj.bias, std=0.1)
    return model.eval()


@pytest.fixture(scope="session")
def manifest_fields(eurusd: CandleSeries) -> dict[str, Any]:
    """Every manifest field except those save_checkpoint fills in, as training.train writes them."""
    spec = FeatureSpec(HOUR_MS)
    horizon = TINY.horizon
    split = 4000
    ok = [i for i in range(spec.window_bars - 1, len(eurusd) - horizon) if origin_ok(eurusd, i, spec) is None]
    train_idx = np.array([i for i in ok if i < split - horizon])
    val_idx = np.array([i for i in ok if i >= split])
    norm = fit_normalization(eurusd, train_idx, spec, horizon)
    schedule = NoiseSchedule.cosine(200)
    return {
        "created_at": "2024-01-01T00:00:00Z",
        "network": TINY.to_dict(),
        "diffusion": {"schedule": schedule.name, "prediction_type": schedule.prediction_type,
                      "betas": list(schedule.betas)},
        "features": {
            "timeframe_ms": HOUR_MS, "context_bars": spec.context_bars, "vol_lookback": spec.vol_lookback,
            "vol_lambda": spec.vol_lambda, "max_missing_fraction": spec.max_missing_fraction,
            "bar_features": list(BAR_FEATURES), "feature_mean": [float(v) for v in norm.feature_mean],
            "feature_std": [float(v) for v in norm.feature_std], "target_mean": norm.target_mean,
            "target_std": norm.target_std, "horizons_ms": HORIZONS_MS, "horizon_bars": horizon,
        },
        "data": {
            "source": "eurusd_h1_2017_ask.csv", "sha256": "0" * 64, "rows": len(eurusd),
            "train_period": (iso(int(eurusd.open_time[train_idx[0]])), iso(int(eurusd.open_time[train_idx[-1]]))),
            "validation_period": (iso(int(eurusd.open_time[val_idx[0]])), iso(int(eurusd.open_time[val_idx[-1]]))),
        },
        "training": {"epochs": 0, "note": "random weights for tests"},
        "validation_metrics": {},
    }


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory: pytest.TempPathFactory, manifest_fields: dict[str, Any]) -> Path:
    out = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(out, tiny_model(), manifest_fields)
    return out


@pytest.fixture
def ckpt_copy(tiny_ckpt_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpt_dir: Path) -> Checkpoint:
    """Loaded once and shared: tests must not modify it (load their own when they need to)."""
    return load_checkpoint(tiny_ckpt_dir)

"""`calibrate` on a checkpoint stored in the diffusers pipeline layout (as the shipped ones are)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from worker.features.candles import load_csv
from worker.model.calibration import calibrate_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.model_card import CARD_FILE, read_model_card_metadata
from worker.model.registry import CHECKPOINTS

DATA = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"


def test_a_pipeline_checkpoint_is_calibrated_in_its_own_layout(tmp_path: Path) -> None:
    series = load_csv(DATA)
    windows = {"EURUSD": (series, np.arange(4000, 4400, 10))}
    pipe_dir = tmp_path / "eurusd-1h"
    shutil.copytree(CHECKPOINTS["eurusd-1h"], pipe_dir)
    before = read_model_card_metadata(pipe_dir / CARD_FILE)

    from_pipeline = calibrate_checkpoint(pipe_dir, windows, windows_total=40, num_samples=16)
    # The same weights in the manifest layout, calibrated on the same windows: the same factors.
    from_manifest = calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "plain",
                                         windows_total=40, num_samples=16)

    assert from_pipeline.calibration == from_manifest.calibration
    assert (pipe_dir / "model_index.json").exists() and not (pipe_dir / "manifest.json").exists()
    fc = Forecaster.load(pipe_dir, device="cpu")
    assert fc.model_version == from_pipeline.model_version
    assert fc.checkpoint.manifest.calibration == from_pipeline.calibration
    after = read_model_card_metadata(pipe_dir / CARD_FILE)
    assert after["training_command"] == before["training_command"]

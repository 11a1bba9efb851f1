"""Training smoke test: a tiny model, one epoch on the shipped EURUSD year, a checkpoint that loads and
forecasts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.errors import TimeframeError
from worker.features.candles import CandleSeries, to_ms
from worker.model.checkpoint import load_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.model_card import read_model_card_metadata
from worker.model.pipeline import SPEC_FILE
from worker.model.schedule import NoiseSchedule
from worker.model.training import TrainConfig, resolve_horizons, train

HOUR_MS = 3_600_000


@pytest.mark.slow  # 2-3 s on an idle 2-core box, over 10 s when it is shared
def test_train_one_epoch_writes_a_checkpoint_that_loads_and_forecasts(eurusd: CandleSeries, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, channels=8, state=4, encoder_blocks=1, denoiser_blocks=1, batch_size=256)
    command = "signal-worker train --candles eurusd_h1_2017_ask.csv --out DIR --epochs 1"
    manifest = train(eurusd, cfg, tmp_path, source="eurusd_h1_2017_ask.csv", sha256="abc", progress=False,
                     command=command, data_licence="MIT")

    # The diffusers layout with its model card; no manifest layout beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "denoiser", "feature_spec.json", "model_index.json", "scheduler"]
    card = read_model_card_metadata(tmp_path / "README.md")
    assert card["model_version"] == manifest.model_version and card["training_command"] == command
    assert command in (tmp_path / "README.md").read_text()
    raw = json.loads((tmp_path / SPEC_FILE).read_text())
    assert raw["model_version"] == manifest.model_version
    assert raw["features"]["timeframe_ms"] == HOUR_MS  # inferred from the data
    assert raw["features"]["horizons_ms"] == [HOUR_MS, 4 * HOUR_MS]  # 15m is not a whole 1h bar: dropped
    assert raw["training"]["epochs_run"] == 1
    assert np.isfinite(raw["validation_metrics"]["val_loss"])
    # No training target path reaches into the validation period (which starts at val_start).
    split = int(np.searchsorted(eurusd.open_time, to_ms(cfg.val_start)))
    last_train_origin = int(np.searchsorted(eurusd.open_time, to_ms(raw["data"]["train_period"][1])))
    assert last_train_origin + 4 < split
    assert to_ms(raw["data"]["validation_period"][0]) >= to_ms(cfg.val_start)

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.model_version == manifest.model_version
    assert ckpt.schedule == NoiseSchedule.cosine(cfg.timesteps)  # exactly the schedule it was trained with
    fc = Forecaster(ckpt, device="cpu")
    out = fc.forecast({"EURUSD": eurusd[:5000]}, num_samples=32, num_steps=4, seed=0)["EURUSD"]
    assert [h.horizon_ms for h in out.horizons] == [HOUR_MS, 4 * HOUR_MS]
    assert all(np.isfinite(h.quantiles).all() and h.std > 0 for h in out.horizons)


def test_explicit_horizons_must_be_whole_bars() -> None:
    assert resolve_horizons("4h,1h", HOUR_MS) == ([HOUR_MS, 4 * HOUR_MS], [])
    with pytest.raises(TimeframeError, match="shorter than one 1h bar"):
        resolve_horizons("15m,1h", HOUR_MS)
    with pytest.raises(TimeframeError, match="not a whole number"):
        resolve_horizons("90m", HOUR_MS)
    assert resolve_horizons(None, HOUR_MS) == ([HOUR_MS, 4 * HOUR_MS], ["15m"])


@pytest.mark.slow
def test_fine_tuning_starts_from_the_parents_loss(eurusd: CandleSeries, tmp_path: Path) -> None:
    """``train --init-from``: on a small series, the child's loss before its first step is the
    parent's level (a fresh network starts far higher), and the child keeps the parent's features."""
    parent = load_checkpoint("eurusd-1h-v1")  # the shipped hourly model: val loss 0.836 on Oct-Dec 2017
    small = eurusd[4200:]  # about 2,000 bars, September-December 2017
    fresh = train(small, TrainConfig(epochs=1, val_start="2017-11-01", channels=8, state=4, encoder_blocks=1,
                                     denoiser_blocks=1), tmp_path / "fresh", progress=False)
    child = train(small, TrainConfig(epochs=1, val_start="2017-11-01", lr=1e-5, init_from="eurusd-1h-v1"),
                  tmp_path / "child", progress=False)
    start = child.validation_metrics["initial_val_loss"]
    assert start < fresh.validation_metrics["initial_val_loss"] - 0.05
    assert abs(start - parent.manifest.validation_metrics["val_loss"]) < 0.05  # the parent's level
    assert child.features.feature_mean == parent.manifest.features.feature_mean  # normalisation inherited
    assert child.network == parent.manifest.network
    assert child.training["init_from"] == "eurusd-1h-v1"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("worker.data.fx", fromlist=["available"]).available(),
                    reason="tradetide not installed")
def test_the_5_minute_recipe_is_deterministic_scale_free_and_calibrated(tmp_path: Path) -> None:
    """The fx-5m preset, shrunk: two real pairs, one model, the same command twice gives the same
    model_version; the checkpoint carries the profile and a calibration fitted on validation."""
    from dataclasses import replace

    from worker.data import fx
    from worker.model.training import PRESETS

    data = {p: fx.load_pair(p, start_ms=to_ms("2023-12-11T00:00:00Z")) for p in ("EURUSD", "USDJPY")}
    cfg = replace(PRESETS["fx-5m"], epochs=1, train_stride=20, val_windows=200, channels=8, state=4,
                  encoder_blocks=1, denoiser_blocks=1, calibration_windows=40, calibration_samples=16,
                  threads=1)
    a = train(data, cfg, tmp_path / "a", progress=False)
    b = train(data, cfg, tmp_path / "b", progress=False)
    assert a.model_version == b.model_version  # the same command reproduces the same weights
    assert a.features.feature_set == "seasonal" and a.features.profile and a.features.horizons_ms == [
        15 * 60_000, HOUR_MS, 4 * HOUR_MS]
    assert a.calibration is not None and set(a.calibration) == {str(h) for h in a.features.horizons_ms}
    assert to_ms(a.data.validation_period[1]) < fx.RESERVED_FROM
    assert to_ms(a.data.train_period[1]) < fx.TRAIN_END
    fc = Forecaster(load_checkpoint(tmp_path / "a"), device="cpu")
    jpy = data["USDJPY"]
    scaled = CandleSeries(jpy.open_time, jpy.ohlcv * np.array([0.01, 0.01, 0.01, 0.01, 1]))  # prices x 0.01
    f1 = fc.forecast({"USDJPY": jpy}, num_samples=16, num_steps=2, seed=1)["USDJPY"]
    f2 = fc.forecast({"USDJPY": scaled}, num_samples=16, num_steps=2, seed=1)["USDJPY"]
    np.testing.assert_allclose([h.quantiles for h in f1.horizons], [h.quantiles for h in f2.horizons],
                               rtol=1e-4, atol=1e-9)  # prices do not matter: inputs are scale-free


def test_an_unknown_initial_noise_is_refused_before_any_training(eurusd: CandleSeries, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="initial_noise must be one of"):
        train(eurusd, TrainConfig(initial_noise="sobol"), tmp_path / "never")
    assert not (tmp_path / "never").exists()

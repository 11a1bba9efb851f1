"""Training smoke test: a tiny model, one epoch on the shipped EURUSD year, a checkpoint that loads and
forecasts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.errors import TimeframeError
from worker.features.candles import CandleSeries, to_ms
from worker.model.checkpoint import MANIFEST, load_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.schedule import NoiseSchedule
from worker.model.training import TrainConfig, resolve_horizons, train

HOUR_MS = 3_600_000


@pytest.mark.slow  # 2-3 s on an idle 2-core box, over 10 s when it is shared
def test_train_one_epoch_writes_a_checkpoint_that_loads_and_forecasts(eurusd: CandleSeries, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, channels=8, state=4, encoder_blocks=1, denoiser_blocks=1, batch_size=256)
    manifest = train(eurusd, cfg, tmp_path, source="eurusd_h1_2017_ask.csv", sha256="abc", progress=False)

    raw = json.loads((tmp_path / MANIFEST).read_text())
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

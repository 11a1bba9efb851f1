"""The spread calibration is fitted for one sampling setting (scheduler, steps), recorded in the
checkpoint as ``calibration_sampler``; a forecaster that samples otherwise says so."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from worker.data import fx
from worker.errors import CheckpointError
from worker.features.candles import load_csv
from worker.model.calibration import calibrate_checkpoint, calibration_samples, fit_spread
from worker.model.checkpoint import LEGACY_CALIBRATION_SAMPLER, MANIFEST, load_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.pipeline import SPEC_FILE, SSSDForecastPipeline
from worker.model.registry import CHECKPOINTS
from worker.model.samplers import SAMPLERS, algorithm_of

DATA = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"


@pytest.fixture(scope="module")
def windows() -> dict[str, tuple[object, np.ndarray]]:
    return {"EURUSD": (load_csv(DATA), np.arange(4000, 4400, 10))}


def _uncalibrated_pinball(windows: dict, scheduler: str, steps: int) -> list[float]:  # type: ignore[type-arg]
    plain = Forecaster.load("eurusd-1h-v1", scheduler=scheduler, device="cpu")  # the same weights, no factors
    samples, y = calibration_samples(plain, windows, windows_total=40, num_samples=16, num_steps=steps)  # type: ignore[arg-type]
    return [fit_spread(samples[:, :, k], y[:, k])[1]["pinball_uncalibrated"] for k in range(y.shape[1])]


def test_calibration_samples_with_the_sampler_it_is_fitted_for_and_records_it(
        tmp_path: Path, windows: dict) -> None:  # type: ignore[type-arg]
    pipe_dir = tmp_path / "unipc5"
    shutil.copytree(CHECKPOINTS["eurusd-1h"], pipe_dir)
    manifest = calibrate_checkpoint(pipe_dir, windows, windows_total=40, num_samples=16,  # type: ignore[arg-type]
                                    scheduler="unipc", num_steps=5)

    assert manifest.calibration_sampler.scheduler == "unipc" and manifest.calibration_sampler.steps == 5
    assert json.loads((pipe_dir / SPEC_FILE).read_text())["calibration_sampler"] == {"scheduler": "unipc", "steps": 5}
    # What was fitted came from UniPC 5-step samples, not from the default's.
    fitted = manifest.validation_metrics["calibration"]
    got = [fitted[str(h)]["pinball_uncalibrated"] for h in load_checkpoint(pipe_dir).horizons_ms]
    assert got == pytest.approx(_uncalibrated_pinball(windows, "unipc", 5), rel=1e-9)
    assert got != pytest.approx(_uncalibrated_pinball(windows, "dpmpp", 10), rel=1e-6)

    # The pipeline's own scheduler is the one it was fitted for, and so is its default step count.
    pipe = SSSDForecastPipeline.from_pretrained(pipe_dir)
    assert pipe.sampler == "unipc"
    series = load_csv(DATA)[:4000]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to say at the fitted setting
        out = pipe({"EURUSD": series}, num_samples=8, seed=3).forecasts["EURUSD"]  # type: ignore[union-attr]
    assert out.steps == 5 and out.scheduler == "unipc"
    with pytest.warns(UserWarning, match="fitted with unipc 5 steps"):
        pipe({"EURUSD": series}, num_samples=8, seed=3, num_inference_steps=10)

    fc = Forecaster.load(pipe_dir, scheduler="unipc", device="cpu")
    assert fc.calibration_mismatch(5) is None
    assert Forecaster.load(pipe_dir, scheduler="unipc-diffusers", device="cpu").calibration_mismatch(5) is None
    why = Forecaster.load(pipe_dir, scheduler="dpmpp", device="cpu").calibration_mismatch(10)
    assert why is not None and "unipc 5 steps" in why and "dpmpp 10 steps" in why
    assert "--scheduler dpmpp --steps 10" in why  # how to fit one for the setting served
    assert fc.calibration_mismatch(6) is not None


def test_the_default_setting_is_not_written_so_earlier_checkpoints_keep_their_files(
        tmp_path: Path, windows: dict) -> None:  # type: ignore[type-arg]
    for name in CHECKPOINTS:  # the setting is in a shipped file exactly when it is not the default one
        legacy = load_checkpoint(name).manifest.calibration_sampler == LEGACY_CALIBRATION_SAMPLER
        assert legacy == (name != "fx-5m-unipc5")
        spec = CHECKPOINTS[name] / SPEC_FILE
        assert (spec.exists() and "calibration_sampler" in json.loads(spec.read_text())) == (not legacy)
    plain = calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "plain",  # type: ignore[arg-type]
                                 windows_total=40, num_samples=16)
    assert "calibration_sampler" not in json.loads((tmp_path / "plain" / MANIFEST).read_text())
    assert plain.calibration_sampler == LEGACY_CALIBRATION_SAMPLER
    # A calibrated hourly forecaster at the default setting has nothing to say; at another, it does.
    fc = Forecaster.load("eurusd-1h", device="cpu")
    assert fc.calibration_mismatch(10) is None and fc.calibration_mismatch(5) is not None
    assert Forecaster.load("eurusd-1h-v1", scheduler="unipc", device="cpu").calibration_mismatch(5) is None  # none


def test_the_manifest_layout_keeps_the_setting_too(tmp_path: Path, windows: dict) -> None:  # type: ignore[type-arg]
    calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "m",  # type: ignore[arg-type]
                         windows_total=40, num_samples=16, scheduler="euler", num_steps=7)
    raw = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert raw["calibration_sampler"] == {"scheduler": "euler", "steps": 7}
    assert load_checkpoint(tmp_path / "m").manifest.calibration_sampler.label() == "euler 7 steps"


@pytest.mark.parametrize(("setting", "needle"), [({"scheduler": "nope", "steps": 5}, "nope"),
                                                 ({"scheduler": "dpmpp-diffusers", "steps": 5}, "dpmpp-diffusers"),
                                                 ({"scheduler": "unipc", "steps": 0}, "calibration_sampler.steps")])
def test_a_bad_recorded_setting_is_refused_naming_it(tmp_path: Path, windows: dict, setting: dict,  # type: ignore[type-arg]
                                                     needle: str) -> None:
    calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "m",  # type: ignore[arg-type]
                         windows_total=40, num_samples=16)
    raw = json.loads((tmp_path / "m" / MANIFEST).read_text())
    raw["calibration_sampler"] = setting
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="calibration_sampler") as err:
        load_checkpoint(tmp_path / "m")
    assert needle in str(err.value)


def test_a_format_1_manifest_may_not_carry_it(tmp_path: Path) -> None:
    shutil.copytree(CHECKPOINTS["eurusd-1h-v1"], tmp_path / "v1")
    raw = json.loads((tmp_path / "v1" / MANIFEST).read_text())
    raw["calibration_sampler"] = {"scheduler": "dpmpp", "steps": 10}
    (tmp_path / "v1" / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="calibration_sampler: not a format-1 field"):
        load_checkpoint(tmp_path / "v1")


def test_a_fused_loop_and_its_diffusers_reference_are_one_algorithm(tmp_path: Path, windows: dict) -> None:  # type: ignore[type-arg]
    assert {name: algorithm_of(name) for name in SAMPLERS} == {
        "dpmpp": "dpmpp", "dpmpp-diffusers": "dpmpp", "ddim": "ddim", "euler": "euler", "kdpm2": "kdpm2",
        "unipc": "unipc", "unipc-diffusers": "unipc", "reference": "reference"}
    assert algorithm_of("nope-diffusers") == "nope-diffusers"
    m = calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "m",  # type: ignore[arg-type]
                             windows_total=40, num_samples=16, scheduler="unipc-diffusers", num_steps=5)
    assert m.calibration_sampler.scheduler == "unipc"
    with pytest.raises(ValueError, match="not a sampler name"):
        calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "x",  # type: ignore[arg-type]
                             scheduler="nope", num_steps=5)


@pytest.mark.slow
@pytest.mark.skipif(not fx.available(), reason=f"tradetide not installed ({fx.INSTALL_HINT})")
def test_the_command_in_the_model_card_reproduces_the_shipped_capacity_checkpoint(tmp_path: Path) -> None:
    """fx-5m-unipc5's card records the command that refitted its calibration; run as written (to
    another directory) it gives the shipped factors and model_version (~30 s here)."""
    from worker.cli.main import main
    from worker.model.model_card import CARD_FILE, read_model_card_metadata

    shipped = CHECKPOINTS["fx-5m-unipc5"]
    command = read_model_card_metadata(shipped / CARD_FILE)["calibration_command"].split()
    assert command[:2] == ["signal-worker", "calibrate"] and command[-2] == "--out"
    assert main([*command[1:-1], str(tmp_path / "again")]) == 0
    again, ship = load_checkpoint(tmp_path / "again"), load_checkpoint(shipped)
    assert again.manifest.calibration == ship.manifest.calibration
    assert again.manifest.calibration_sampler == ship.manifest.calibration_sampler
    assert again.model_version == ship.model_version
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["scheduler"][1] == "UniPCMultistepScheduler"


def test_for_the_reference_sampler_only_the_name_counts(tmp_path: Path, windows: dict) -> None:  # type: ignore[type-arg]
    """The ancestral reference runs every training step whatever ``steps`` says."""
    calibrate_checkpoint(CHECKPOINTS["eurusd-1h-v1"], windows, out=tmp_path / "m",  # type: ignore[arg-type]
                         windows_total=20, num_samples=8, scheduler="reference", num_steps=10)
    fc = Forecaster.load(tmp_path / "m", scheduler="reference", device="cpu")
    assert fc.calibration_mismatch(10) is None and fc.calibration_mismatch(3) is None
    assert fc.with_scheduler("dpmpp").calibration_mismatch(10) is not None


def test_the_fitted_setting_is_part_of_the_version_unless_it_is_the_default(tmp_path: Path) -> None:
    """Two settings can give the same factors (a 0.01 grid): the version still tells them apart."""
    from worker.model.checkpoint import model_version

    raw = load_checkpoint("fx-5m").manifest.model_dump(mode="json")
    assert "calibration_sampler" not in raw
    shipped = model_version(raw["weights_sha256"], raw)
    assert shipped == "sssd-cf78a1daf717"
    assert model_version(raw["weights_sha256"], {**raw, "calibration_sampler": {"scheduler": "dpmpp", "steps": 10}}) \
        == shipped  # the default written out is still the default
    assert model_version(raw["weights_sha256"], {**raw, "calibration_sampler": {"scheduler": "dpmpp", "steps": 20}}) \
        != shipped


def test_a_recorded_setting_without_a_calibration_is_refused(tmp_path: Path) -> None:
    src = CHECKPOINTS["eurusd-1h-v1"]
    shutil.copytree(src, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / MANIFEST).read_text())
    raw.update(format_version=2, calibration_sampler={"scheduler": "unipc", "steps": 5})
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="calibration_sampler is set but there is no calibration"):
        load_checkpoint(tmp_path / "m")


def test_the_python_api_warns_when_it_samples_otherwise_than_calibrated() -> None:
    """A notebook calling Forecaster.forecast sees no start-up log: it gets a warning instead."""
    series = load_csv(DATA)[:4000]
    fc = Forecaster.load("eurusd-1h", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fc.forecast({"EURUSD": series}, num_samples=8, num_steps=10)  # as fitted
    with pytest.warns(UserWarning, match="fitted with dpmpp 10 steps, and this samples with unipc 5 steps"):
        fc.with_scheduler("unipc").forecast({"EURUSD": series}, num_samples=8, num_steps=5)


def test_a_horizon_ending_after_the_weekend_close_is_left_out_of_the_fit() -> None:
    """At Friday 14:00 New York the hourly model serves 1h but not 4h (it would end after the 17:00
    close, across the weekend gap no sample holds): that 4h outcome is NaN, so the 4h factor is not
    fitted on it — unless the forecaster forecasts across the close (``weekend_close=False``)."""
    series = load_csv(DATA)
    t = series.open_time
    thursday, friday = (int(np.searchsorted(t, fx_ms)) for fx_ms in (1513278000000, 1513364400000))
    assert (int(t[thursday]), int(t[friday])) == (1513278000000, 1513364400000)  # 2017-12-14/15 19:00Z
    windows = {"EURUSD": (series, np.array([thursday, friday]))}
    for weekend_close, friday_4h in ((True, False), (False, True)):
        fc = Forecaster.load("eurusd-1h", weekend_close=weekend_close)
        assert fc.horizons_ms == [3_600_000, 14_400_000]
        samples, y = calibration_samples(fc, windows, windows_total=2, num_samples=8, num_steps=2)
        assert samples.shape == (2, 8, 2) and np.isfinite(y[0]).all() and np.isfinite(y[1, 0])
        assert bool(np.isfinite(y[1, 1])) is friday_4h

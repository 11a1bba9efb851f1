"""Named checkpoints, the default switch, format-1 compatibility and the shipped calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.timeframe import parse_horizons
from worker.errors import InsufficientHistory
from worker.features.candles import CandleSeries, load_csv
from worker.model.checkpoint import CHECKPOINTS, DEFAULT_CHECKPOINT_NAME, load_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.pipeline import SSSDForecastPipeline
from worker.settings import SamplingSettings, load_settings

DATA = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"
HOUR_MS = 3_600_000

# Forecast of the format-1 hourly checkpoint for bar 3999 of the shipped file (32 samples, 5 steps,
# seed 7), computed with the code as it was before format 2 existed (commit ad789da).
GOLDEN_V1 = {
    "model_version": "sssd-25f873e791e6",
    "q": [[-0.0013680766569450498, -0.0008201212040148675, -0.0002717667957767844, -8.472379704471678e-07,
           0.000549839052837342, 0.0008198951254598796, 0.0013234674697741866],
          [-0.0016018233727663755, -0.0009223938686773181, 0.00021702137019019574, 0.0006227651610970497,
           0.001955475891008973, 0.0030307371634989977, 0.004280653782188892]],
    "mean": [7.547121640527621e-05, 0.0010322267189621925],
}


def _forecast(name: str) -> tuple[Forecaster, object]:
    fc = Forecaster.load(name, device="cpu")
    out = fc.forecast({"EURUSD": load_csv(DATA)[:4000]}, num_samples=32, num_steps=5, seed=7)["EURUSD"]
    return fc, out


def test_a_format_1_checkpoint_loads_and_forecasts_exactly_as_before() -> None:
    fc, out = _forecast("eurusd-1h-v1")
    assert fc.checkpoint.manifest.format_version == 1 and fc.checkpoint.manifest.calibration is None
    assert out.model_version == GOLDEN_V1["model_version"]  # type: ignore[attr-defined]
    for h, q, m in zip(out.horizons, GOLDEN_V1["q"], GOLDEN_V1["mean"], strict=True):  # type: ignore[attr-defined]
        np.testing.assert_allclose(h.quantiles, q, rtol=1e-6, atol=1e-10)
        # the mean of ±1e-3 samples lies near zero: float rounding is bounded relative to their scale
        assert h.mean == pytest.approx(m, rel=1e-6, abs=1e-6 * float(np.max(np.abs(q))))


def test_the_calibrated_hourly_checkpoint_widens_the_same_samples_by_its_factor() -> None:
    fc_cal, cal = _forecast("eurusd-1h")
    _, raw = _forecast("eurusd-1h-v1")
    assert fc_cal.checkpoint.manifest.format_version == 2
    assert cal.model_version != raw.model_version  # type: ignore[attr-defined]
    for hc, hr in zip(cal.horizons, raw.horizons, strict=True):  # type: ignore[attr-defined]
        factor = fc_cal.checkpoint.spread_factor(hc.horizon_ms)
        assert factor is not None and factor != 1.0
        assert hc.mean == pytest.approx(hr.mean, rel=1e-5, abs=1e-9)  # about the mean
        np.testing.assert_allclose(np.subtract(hc.quantiles, hc.mean), factor * np.subtract(hr.quantiles, hr.mean),
                                   rtol=1e-4, atol=1e-8)
        assert hc.std == pytest.approx(factor * hr.std, rel=1e-4)
    fitted = fc_cal.checkpoint.manifest.validation_metrics["calibration"]
    assert all(0.88 <= v["coverage90"] <= 0.92 for v in fitted.values())  # on its own validation quarter


def test_the_capacity_checkpoint_is_the_default_refitted_for_unipc_at_5_steps() -> None:
    """fx-5m-unipc5: fx-5m's weights, features and noise; only the spread factors differ, fitted on the
    same validation windows with the sampler it is meant to be served with."""
    fast, base = load_checkpoint("fx-5m-unipc5"), load_checkpoint("fx-5m")
    assert fast.manifest.weights_sha256 == base.manifest.weights_sha256
    assert fast.manifest.features == base.manifest.features and fast.manifest.diffusion == base.manifest.diffusion
    assert fast.manifest.calibration_sampler.label() == "unipc 5 steps"
    assert fast.model_version != base.model_version
    series = _series_for("fx-5m")[:4000]
    kw = {"num_samples": 32, "num_steps": 5, "seed": 7}
    f_fast = Forecaster.load("fx-5m-unipc5", scheduler="unipc", device="cpu", weekend_close=False)  # restamped
    f_base = Forecaster.load("fx-5m", scheduler="unipc", device="cpu", weekend_close=False)
    assert f_fast.calibration_mismatch(5) is None and f_base.calibration_mismatch(5) is not None
    out_fast = f_fast.forecast({"EURUSD": series}, **kw)["EURUSD"]  # type: ignore[arg-type]
    out_base = f_base.forecast({"EURUSD": series}, **kw)["EURUSD"]  # type: ignore[arg-type]
    for hf, hb in zip(out_fast.horizons, out_base.horizons, strict=True):
        ratio = fast.spread_factor(hf.horizon_ms) / base.spread_factor(hf.horizon_ms)  # type: ignore[operator]
        assert ratio > 1.0  # at 5 steps UniPC's paths are narrower than DPM-Solver++'s at 10: widened more
        assert hf.mean == pytest.approx(hb.mean, rel=1e-5, abs=1e-9)
        np.testing.assert_allclose(np.subtract(hf.quantiles, hf.mean), ratio * np.subtract(hb.quantiles, hb.mean),
                                   rtol=1e-4, atol=1e-8)
    fitted = fast.manifest.validation_metrics["calibration"]
    assert all(0.89 <= v["coverage90"] <= 0.91 for v in fitted.values())  # on the validation windows


def test_the_default_is_the_5_minute_model() -> None:
    assert DEFAULT_CHECKPOINT_NAME == "fx-5m"
    ckpt = load_checkpoint(None)
    assert ckpt.timeframe_ms == 300_000
    assert ckpt.horizons_ms == parse_horizons("15m,1h,4h")
    assert ckpt.network.horizon == 48  # one 48-bar path
    assert ckpt.spec.feature_set == "seasonal" and ckpt.manifest.calibration
    assert ckpt.spec.profile is not None
    assert [m for m, _ in ckpt.spec.profile.by_offset] == [-300, -240]  # New York winter and summer time
    assert Forecaster.load(device="cpu").model_version == ckpt.model_version


def test_names_and_directories_are_both_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_checkpoint("eurusd-1h").model_version == load_checkpoint(CHECKPOINTS["eurusd-1h"]).model_version
    assert SamplingSettings(checkpoint="eurusd-1h").checkpoint == CHECKPOINTS["eurusd-1h"]  # type: ignore[arg-type]
    monkeypatch.setenv("SIGNAL_WORKER_SAMPLING__CHECKPOINT", "eurusd-1h-v1")
    assert load_settings().sampling.checkpoint == CHECKPOINTS["eurusd-1h-v1"]
    assert SamplingSettings().checkpoint == CHECKPOINTS[DEFAULT_CHECKPOINT_NAME]


def test_horizons_parse_the_same_way_in_the_api_and_the_settings() -> None:
    fc = Forecaster.load("eurusd-1h", device="cpu", horizons="60")  # bare numbers are minutes, as in settings
    assert fc.horizons_ms == [HOUR_MS] == parse_horizons(SamplingSettings(horizons="60").horizons or "")


def test_a_gappy_window_names_the_missing_bars_and_an_origin_that_works() -> None:
    import re

    from worker.features.candles import to_ms

    candles = load_csv(DATA)  # its last window spans Christmas 2017
    fc = Forecaster.load("eurusd-1h", device="cpu")
    with pytest.raises(InsufficientHistory) as info:
        fc.forecast({"EURUSD": candles}, num_samples=8, num_steps=2)
    msg = str(info.value)
    assert info.value.reason == "too_many_missing_bars"
    assert "misses 15 bars" in msg and "2017-12-25T08:00:00Z..2017-12-25T21:00:00Z (14 bars)" in msg
    hint = re.search(r'candles\.upto\(to_ms\("([^"]+)"\)\)', msg)
    assert hint is not None
    out = fc.forecast({"EURUSD": candles.upto(to_ms(hint.group(1)))}, num_samples=8, num_steps=2)  # as told
    assert out["EURUSD"].open_time == to_ms(hint.group(1))


@pytest.mark.parametrize("name", ["eurusd-1h-v1", "fx-5m"])
def test_every_context_field_is_an_array_over_the_batch(name: str) -> None:
    """The service's out-of-memory retry slices every ContextBatch field in half: none may be None."""
    from worker.data import fx
    from worker.model.forecaster import ForecastRequest

    fc = Forecaster.load(name, device="cpu")
    if fc.timeframe_ms == HOUR_MS:
        series = load_csv(DATA)[:2990]  # bar 2999 is a week's last: not forecast
    elif fx.available():
        series = fx.load_pair("EURUSD", end_ms=fx.TRAIN_END)[:-12]  # ditto its last bar, Friday 16:55
    else:
        pytest.skip("tradetide not installed")
    w = fc.window_bars
    batch = fc.prepare([ForecastRequest(f"S{i}", series[len(series) - w - i : len(series) - i]) for i in range(3)])
    assert batch.contexts is not None and not batch.rejected
    for field in batch.contexts.__dataclass_fields__:
        value = getattr(batch.contexts, field)
        assert isinstance(value, np.ndarray) and len(value) == 3, field


# Forecasts for bar 3999 of the shipped hourly file (the 5-minute models: the same prices restamped as
# consecutive 5-minute bars), 32 samples, 5 steps, seed 7. fx-5m-v1 (shipped as fx-5m until
# 2026-12-02) and eurusd-1h: computed from their manifest layout (format 2, commit d00be24) before they
# were converted in place to the pipeline layout; fx-5m-v2 and fx-5m: computed when each was shipped.
GOLDEN_SHIPPED = {
    # fx-5m as shipped on 2026-12-02, second revision (one intraday profile per New York season)
    "fx-5m": {
        "model_version": "sssd-cf78a1daf717",
        "q": [
            [
                -0.0013586536515504122,
                -0.0008488770690746605,
                -0.0004592363256961107,
                7.340228330576792e-05,
                0.0006311413017101586,
                0.0013472835998982191,
                0.001662965165451169
            ],
            [
                -0.00442655012011528,
                -0.0038673283997923136,
                -0.0026097246445715427,
                -0.0007949466817080975,
                0.001128707081079483,
                0.0021968695800751448,
                0.004171565640717745
            ],
            [
                -0.007699707522988319,
                -0.006721497047692537,
                -0.003625574754551053,
                -0.0010914562735706568,
                0.002274795202538371,
                0.005977298133075237,
                0.007619648706167936
            ]
        ],
        "mean": [
            0.00012779285316355526,
            -0.0006632092408835888,
            -0.000470629776827991
        ]
    },
    # fx-5m-v2, shipped as fx-5m on 2026-12-02 (range-EWMA scaling, horizon-stratified noise), commit
    # 6b00b7c's code
    "fx-5m-v2": {
        "model_version": "sssd-e62906b5e6ce",
        "q": [
            [-0.0013949417043477297, -0.0008648706716485322, -0.00047475885367020965, 0.0001073992025339976,
             0.0006907456554472446, 0.0013769532088190317, 0.001787453657016158],
            [-0.005112393759191036, -0.004067291971296072, -0.0025678928941488266, -0.0005804206593893468,
             0.0012960658641532063, 0.0027558014262467623, 0.004804634023457766],
            [-0.007816050201654434, -0.005100221373140812, -0.0036579379811882973, -0.0007988826837390661,
             0.0017669424414634705, 0.006072725169360638, 0.007444737479090691],
        ],
        "mean": [0.00016038210014812648, -0.000559758860617876, -0.000485773547552526],
    },
    "fx-5m-v1": {
        "model_version": "sssd-e290abb1d050",
        "q": [
            [
                -0.0014319152105599642,
                -0.0012969275703653693,
                -0.0006577804451808333,
                -0.00018981736502610147,
                0.0002055959776043892,
                0.0008039426174946129,
                0.0014422228559851646
            ],
            [
                -0.004312912467867136,
                -0.00398566760122776,
                -0.0020619884599000216,
                0.0004843506612814963,
                0.002534599741920829,
                0.003736143931746483,
                0.003980088513344526
            ],
            [
                -0.007487857714295387,
                -0.004951301030814648,
                -0.002602291526272893,
                -0.00045726762618869543,
                0.0021835234947502613,
                0.0060101402923464775,
                0.006723091006278992
            ]
        ],
        "mean": [
            -5.634699482470751e-05,
            0.00020764849614351988,
            -0.0002620884624775499
        ]
    },
    "eurusd-1h": {
        "model_version": "sssd-2b72886af845",
        "q": [
            [
                -0.0015124310739338398,
                -0.000909680500626564,
                -0.00030649060499854386,
                -8.479088137391955e-06,
                0.0005972759099677205,
                0.0008943374268710613,
                0.0014482670230790973
            ],
            [
                -0.0018388876924291253,
                -0.0010983091779053211,
                0.00014365281094796956,
                0.0005859134835191071,
                0.0020385687239468098,
                0.0032106032595038414,
                0.004573012702167034
            ]
        ],
        "mean": [
            7.547123095719144e-05,
            0.0010322268353775144
        ]
    }
}


def _series_for(name: str) -> object:
    """The golden input. The 5-minute one restamps the hourly prices as consecutive 5-minute bars from
    2017-01-02, through weekends: its last bar lies in a weekend closure, so it is forecast as a feed
    trading through the weekend would be (``weekend_close=False``)."""
    hourly = load_csv(DATA)[:4000]
    if name.startswith("eurusd-1h"):
        return hourly
    return CandleSeries(np.int64(1483315200000) + np.arange(len(hourly), dtype=np.int64) * 300_000, hourly.ohlcv)


@pytest.mark.parametrize("name", ["fx-5m", "fx-5m-v2", "fx-5m-v1", "eurusd-1h"])
def test_the_shipped_checkpoints_are_pipelines_that_forecast_as_before(name: str) -> None:
    root = CHECKPOINTS[name]
    assert (root / "model_index.json").is_file() and not (root / "manifest.json").exists()
    assert (root / "README.md").is_file()  # the model card
    restamped = not name.startswith("eurusd-1h")
    fc = Forecaster.load(name, device="cpu", weekend_close=not restamped)
    out = fc.forecast({"EURUSD": _series_for(name)}, num_samples=32, num_steps=5, seed=7)["EURUSD"]  # type: ignore[dict-item]
    golden = GOLDEN_SHIPPED[name]
    assert out.model_version == golden["model_version"] == fc.model_version
    for h, q, m in zip(out.horizons, golden["q"], golden["mean"], strict=True):
        np.testing.assert_allclose(h.quantiles, q, rtol=1e-6, atol=1e-10)
        # the mean of ±1e-3 samples lies near zero: float rounding is bounded relative to their scale
        assert h.mean == pytest.approx(m, rel=1e-6, abs=1e-6 * float(np.max(np.abs(q))))
    # The pipeline API gives the same forecasts for the same seed.
    pipe = SSSDForecastPipeline.from_pretrained(root)
    assert pipe({"EURUSD": _series_for(name)}, num_inference_steps=5, num_samples=32,  # type: ignore[union-attr,dict-item]
                generator=torch.Generator().manual_seed(7), weekend_close=not restamped).forecasts["EURUSD"] == out
    if restamped:
        with pytest.raises(InsufficientHistory, match="weekend close"):
            Forecaster.load(name, device="cpu").forecast({"EURUSD": _series_for(name)},  # type: ignore[dict-item]
                                                         num_samples=8, num_steps=2)


def test_the_format_1_checkpoint_stays_a_manifest_directory() -> None:
    root = CHECKPOINTS["eurusd-1h-v1"]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "model.safetensors"]


def test_metadata_of_a_pipeline_directory_reads_without_the_weights(tmp_path: Path) -> None:
    """What `signal-worker state` reads to learn the default checkpoint's timeframe (no weights loaded)."""
    from worker.model.checkpoint import MANIFEST, _read_manifest

    manifest = _read_manifest(CHECKPOINTS["fx-5m"] / MANIFEST)
    assert manifest.features.timeframe_ms == 300_000
    assert manifest.model_version == load_checkpoint("fx-5m").model_version


def test_forecaster_load_keeps_the_weights_hash_check_for_a_pipeline_directory(tmp_path: Path) -> None:
    import shutil

    from worker.errors import CheckpointError

    root = tmp_path / "fx"
    shutil.copytree(CHECKPOINTS["fx-5m"], root)
    weights = root / "denoiser" / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: sha256 does not match"):
        Forecaster.load(root, device="cpu")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: {"summer": p["-240"]}, "'summer' is not a UTC offset in minutes"),
        (lambda p: {"-240": p["-240"][:-1], "-300": p["-300"]}, "UTC-240min needs 288 values, got 287"),
        (lambda p: {"-240": [0.0] * 288}, "finite and positive"),
    ],
)
def test_a_broken_per_season_profile_is_refused_naming_it(tmp_path: Path, edit: object, match: str) -> None:
    import json
    import shutil

    from worker.errors import CheckpointError

    root = tmp_path / "fx"
    shutil.copytree(CHECKPOINTS["fx-5m"], root)
    spec_file = root / "feature_spec.json"
    spec = json.loads(spec_file.read_text())
    spec["features"]["profile_by_utc_offset"] = edit(spec["features"]["profile_by_utc_offset"])  # type: ignore[operator]
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(root)

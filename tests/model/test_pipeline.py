"""The model the diffusers way: SSSDDenoiserModel, SSSDForecastPipeline, the v1 converters, the model card.

Equality with the Forecaster is shown on the shipped hourly checkpoint and the real EURUSD year; the
damage tests run on a pipeline converted from the tiny random-weights checkpoint (fast), each breaking
one file the way a bad copy, a hand edit or a swapped file would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file, save_file

import worker
from worker.errors import CheckpointError
from worker.features.candles import CandleSeries
from worker.model.checkpoint import FeatureManifest, load_checkpoint, save_checkpoint
from worker.model.forecaster import Forecaster
from worker.model.model_card import (
    CARD_FILE,
    card_inputs_from_spec,
    read_model_card_metadata,
    render_model_card,
    rewrite_model_card,
    write_model_card,
)
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.pipeline import (
    SPEC_FILE,
    ForecastSpec,
    SSSDDenoiserModel,
    SSSDForecastPipeline,
    convert_checkpoint,
    load_pipeline_checkpoint,
    weights_model_version,
    write_checkpoint,
)
from worker.model.samplers import SAMPLERS, SamplerSpec, make_scheduler
from worker.model.schedule import NoiseSchedule

from .conftest import TINY, tiny_model

ROOT = Path(worker.__file__).parent.parent
# The shipped hourly checkpoint, format v1 (the one trained on worker/data/eurusd_h1_2017_ask.csv).
HOURLY_CKPT = Path(worker.__file__).parent / "model" / "checkpoints" / "eurusd-1h-v1"
HOUR_MS = 3_600_000
WEIGHTS = Path("denoiser") / "diffusion_pytorch_model.safetensors"
DENOISER_CONFIG = Path("denoiser") / "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
TRAIN_COMMAND = ("signal-worker train --candles worker/data/eurusd_h1_2017_ask.csv "
                 "--out worker/model/checkpoints/eurusd-1h-v1 --threads 2")


@pytest.fixture(scope="module")
def hourly_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = json.loads((HOURLY_CKPT / "manifest.json").read_text())
    assert manifest["features"]["timeframe_ms"] == HOUR_MS, "point HOURLY_CKPT at the shipped hourly checkpoint"
    out = tmp_path_factory.mktemp("hourly_pipeline")
    convert_checkpoint(HOURLY_CKPT, out)
    return out


@pytest.fixture(scope="module")
def hourly_fc() -> Forecaster:
    return Forecaster.load(HOURLY_CKPT, device="cpu")


@pytest.fixture(scope="module")
def books(eurusd: CandleSeries) -> dict[str, CandleSeries]:
    return {"EURUSD": eurusd[:5000], "EURUSD.b": eurusd[1000:2000]}


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny_pipeline")
    convert_checkpoint(tiny_ckpt_dir, out)
    return out


@pytest.fixture
def damaged(tiny_pipeline_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, dst)
    return dst


# -- the denoiser as a diffusers model ---------------------------------------------------------------


def test_denoiser_model_has_the_networks_module_tree_and_config() -> None:
    cfg = NetworkConfig(channels=16, state=8, encoder_blocks=1, denoiser_blocks=2)
    torch.manual_seed(0)
    plain = SSSDDenoiser(cfg).state_dict()
    model = SSSDDenoiserModel.from_network_config(cfg)
    assert isinstance(model, SSSDDenoiser)
    ours = model.state_dict()
    assert list(ours) == list(plain)
    assert all(ours[k].shape == plain[k].shape and ours[k].dtype == plain[k].dtype for k in plain)
    fields = [f.name for f in dataclasses.fields(NetworkConfig)]
    params = [p for p in inspect.signature(SSSDDenoiserModel.__init__).parameters if p != "self"]
    assert sorted(params) == sorted(fields)  # the config is exactly NetworkConfig, nothing more
    assert {k: v for k, v in model.config.items() if not k.startswith("_")} == cfg.to_dict()
    assert model.network_config == cfg


def test_shipped_weights_load_unchanged_and_compute_the_same() -> None:
    ckpt = load_checkpoint(HOURLY_CKPT)
    model = SSSDDenoiserModel.from_network_config(ckpt.network)
    model.load_state_dict(ckpt.model.state_dict(), strict=True)
    model.eval()
    g = torch.Generator().manual_seed(0)
    feats, ctime = torch.randn(3, 64, 7, generator=g), torch.randn(3, 64, 4, generator=g)
    x, t, ftime = torch.randn(3, 4, generator=g), torch.tensor([0.0, 99.0, 199.0]), torch.randn(3, 4, 4, generator=g)
    with torch.no_grad():
        ref = ckpt.model.denoise(x, t, ckpt.model.encode(feats, ctime), ftime)
        out = model.denoise(x, t, model.encode(feats, ctime), ftime)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_model_version_is_the_one_training_gives_in_either_layout() -> None:
    # fx-5m was written by training (save_checkpoint): its version is recomputed from the weights and
    # the spec alone, whatever the layout the weights are stored in.
    ckpt = load_checkpoint("fx-5m")
    model = SSSDDenoiserModel.from_network_config(ckpt.network)
    model.load_state_dict(ckpt.model.state_dict(), strict=True)
    assert weights_model_version(model, ForecastSpec.from_manifest(ckpt.manifest)) == ckpt.model_version


def test_denoiser_save_pretrained_is_safetensors_only_and_round_trips(tmp_path: Path) -> None:
    model = SSSDDenoiserModel.from_network_config(NetworkConfig(channels=8, state=4, encoder_blocks=1,
                                                                denoiser_blocks=1))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    back = SSSDDenoiserModel.from_pretrained(tmp_path / "m")
    assert back.network_config == model.network_config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "p", safe_serialization=False)
    assert not (tmp_path / "p").exists()
    back2 = SSSDDenoiserModel.from_pretrained(tmp_path, subfolder="m", local_files_only=True)
    assert back2.network_config == model.network_config


@pytest.mark.parametrize("where", ["does/not/exist", "someone/some-model"])
def test_only_local_directories_load(where: str) -> None:
    with pytest.raises(CheckpointError, match=r"not found.*nothing is fetched"):
        SSSDForecastPipeline.from_pretrained(where)
    with pytest.raises(CheckpointError, match=r"not found.*nothing is fetched"):
        SSSDDenoiserModel.from_pretrained(where)


def test_remote_loading_options_are_refused(tiny_pipeline_dir: Path) -> None:
    with pytest.raises(TypeError, match="local_files_only"):
        SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=False)
    with pytest.raises(TypeError, match="revision"):
        SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir, revision="main")
    SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)  # the diffusers spelling


# -- the pipeline forecasts as the Forecaster --------------------------------------------------------


def test_pipeline_forecasts_equal_forecaster_on_shipped_hourly_checkpoint(
    hourly_dir: Path, hourly_fc: Forecaster, books: dict[str, CandleSeries]
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(hourly_dir)
    out = pipe(books, num_inference_steps=10, num_samples=64, generator=torch.Generator().manual_seed(7))
    ref = hourly_fc.forecast(books, num_samples=64, num_steps=10, seed=7)
    assert out.forecasts == ref  # frozen dataclasses of floats: exact equality, model_version included
    assert out.forecasts["EURUSD"].model_version == "sssd-25f873e791e6" == pipe.model_version
    # The generator's seed is the base seed; its state is not consumed: the same call, the same forecasts.
    gen = torch.Generator().manual_seed(7)
    assert pipe(books, generator=gen).forecasts == pipe(books, generator=gen).forecasts == ref
    (again,) = pipe(books, seed=7, return_dict=False)
    assert again == ref
    assert pipe(books, seed=8).forecasts != ref


def test_unipc_from_config_samples_on_the_training_schedule(
    hourly_dir: Path, hourly_fc: Forecaster, books: dict[str, CandleSeries]
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(hourly_dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.sampler == "unipc"
    assert pipe.config.scheduler == ("diffusers", "UniPCMultistepScheduler")
    out = pipe(books, num_inference_steps=10, num_samples=64, generator=torch.Generator().manual_seed(3))
    assert out.forecasts == hourly_fc.with_scheduler("unipc").forecast(books, num_samples=64, num_steps=10, seed=3)
    assert {f.scheduler for f in out.forecasts.values()} == {"unipc"}


def _perturbed_betas(config: Any) -> Any:
    betas = list(config["trained_betas"])
    betas[10] *= 1.01
    return UniPCMultistepScheduler.from_config(config, trained_betas=betas)


@pytest.mark.parametrize(("make", "match"), [
    (lambda c: UniPCMultistepScheduler(), "num_train_timesteps=1000.*trained_betas is not set"),
    (_perturbed_betas, r"trained_betas differ .*index 10"),
    (lambda c: UniPCMultistepScheduler.from_config(c, num_train_timesteps=100, trained_betas=c["trained_betas"][:100]),
     "num_train_timesteps=100, trained with 200"),
    (lambda c: DPMSolverMultistepScheduler.from_config(c, prediction_type="epsilon"),
     "prediction_type='epsilon', trained with 'v_prediction'"),
])
def test_scheduler_off_the_training_schedule_is_refused(
    tiny_pipeline_dir: Path, make: Callable[[Any], Any], match: str
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    before = pipe.scheduler
    with pytest.raises(ValueError, match="disagrees with the training schedule") as info:
        pipe.scheduler = make(pipe.scheduler.config)
    assert re.search(match, str(info.value)), str(info.value)
    assert pipe.scheduler is before and pipe.sampler == "dpmpp"
    assert pipe.config.scheduler == ("diffusers", "DPMSolverMultistepScheduler")


def test_any_scheduler_on_the_training_schedule_is_served(
    tiny_pipeline_dir: Path, books: dict[str, CandleSeries]
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    kw: dict[str, Any] = {"num_inference_steps": 4, "num_samples": 8, "seed": 3}
    fused = pipe(books, **kw).forecasts  # type: ignore[union-attr]
    # A configuration outside samplers.SAMPLERS runs as a SamplerSpec of its own config, through the
    # same Forecaster code: equal to a Forecaster given that spec.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    assert isinstance(pipe.sampler, SamplerSpec) and pipe.sampler.config["use_karras_sigmas"] is True
    karras = pipe(books, **kw).forecasts  # type: ignore[union-attr]
    direct = Forecaster(pipe.to_checkpoint(), scheduler=pipe.sampler, device="cpu").forecast(
        books, num_samples=8, num_steps=4, seed=3)
    assert karras == direct and karras != fused
    assert {f.scheduler for f in karras.values()} == {"custom:DPMSolverMultistepScheduler"}
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.sampler, SamplerSpec) and pipe.sampler.scheduler_cls is HeunDiscreteScheduler
    heun = pipe(books, **kw).forecasts  # type: ignore[union-attr]
    assert all(np.isfinite(h.mean) for f in heun.values() for h in f.horizons)
    # Back on dpmpp's configuration: the fused loop again, the same forecasts as before.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **SAMPLERS["dpmpp"].config)
    assert pipe.sampler == "dpmpp" and pipe(books, **kw).forecasts == fused  # type: ignore[union-attr]
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False, variance_type="fixed_small",
                                               timestep_spacing="leading")
    assert pipe.sampler == "reference"


def test_a_sampler_spec_equal_to_dpmpp_runs_the_fused_loop(tiny_pipeline_dir: Path,
                                                          books: dict[str, CandleSeries]) -> None:
    ckpt = load_pipeline_checkpoint(tiny_pipeline_dir)
    spec = SamplerSpec(SAMPLERS["dpmpp"].scheduler_cls, dict(SAMPLERS["dpmpp"].config),
                       SAMPLERS["dpmpp"].description, fused=True)
    fc = Forecaster(ckpt, scheduler=spec, device="cpu")
    assert fc.scheduler == "dpmpp" and fc.sampler == "dpmpp"
    assert fc.forecast(books, num_samples=8, num_steps=4, seed=1) == Forecaster(ckpt, device="cpu").forecast(
        books, num_samples=8, num_steps=4, seed=1)
    with pytest.raises(ValueError, match="fused loop"):
        Forecaster(ckpt, scheduler=SamplerSpec(spec.scheduler_cls, {**spec.config, "solver_order": 3}, fused=True))


def test_generator_list_and_seed_with_generator_are_refused(
    tiny_pipeline_dir: Path, books: dict[str, CandleSeries]
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"one torch\.Generator"):
        pipe(books, generator=[torch.Generator(), torch.Generator()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        pipe(books, generator=torch.Generator(), seed=1)


# -- converters and round trips ----------------------------------------------------------------------


def test_v1_round_trip_gives_the_same_files_and_forecasts(
    hourly_dir: Path, hourly_fc: Forecaster, books: dict[str, CandleSeries], tmp_path: Path
) -> None:
    ckpt = load_pipeline_checkpoint(hourly_dir)
    fc = Forecaster(ckpt, device="cpu")
    assert fc.forecast(books, num_samples=64, num_steps=10, seed=11) == hourly_fc.forecast(
        books, num_samples=64, num_steps=10, seed=11)
    # Written back in the manifest layout: the current format (2), the same tensors and forecasts.
    manifest = write_checkpoint(SSSDForecastPipeline.from_pretrained(hourly_dir), tmp_path / "v1")
    assert manifest.format_version == 2
    back = load_checkpoint(tmp_path / "v1")
    assert all(torch.equal(v, ckpt.model.state_dict()[k]) for k, v in back.model.state_dict().items())
    again = Forecaster(back, device="cpu").forecast(books, num_samples=64, num_steps=10, seed=11)
    assert {k: dataclasses.replace(v, model_version="") for k, v in again.items()} == {
        k: dataclasses.replace(v, model_version="") for k, v in fc.forecast(
            books, num_samples=64, num_steps=10, seed=11).items()}
    spec = json.loads((hourly_dir / SPEC_FILE).read_text())
    original = json.loads((HOURLY_CKPT / "manifest.json").read_text())
    assert spec["converted_from"] == {"format_version": 1, "weights_sha256": original["weights_sha256"]}
    assert spec["weights_sha256"] == hashlib.sha256((hourly_dir / WEIGHTS).read_bytes()).hexdigest()
    assert {k: spec[k] for k in ("diffusion", "data", "model_version")} == {
        k: original[k] for k in ("diffusion", "data", "model_version")}
    assert spec["features"] == FeatureManifest.model_validate(original["features"]).model_dump(mode="json")


def test_save_pretrained_round_trips_the_scheduler_and_forecasts(
    tiny_pipeline_dir: Path, books: dict[str, CandleSeries], tmp_path: Path
) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "p")
    names = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert names == [str(DENOISER_CONFIG), str(WEIGHTS), SPEC_FILE, "model_index.json", str(SCHEDULER_CONFIG)]
    back = SSSDForecastPipeline.from_pretrained(tmp_path / "p")
    assert back.sampler == "unipc" and back.model_version == pipe.model_version
    kw: dict[str, Any] = {"num_inference_steps": 5, "num_samples": 16, "seed": 2}
    assert back(books, **kw).forecasts == pipe(books, **kw).forecasts
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "q", safe_serialization=False)


def test_changed_weights_are_saved_as_another_model(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    old = pipe.model_version
    with torch.no_grad():
        pipe.denoiser.proj.bias.add_(0.5)
    pipe.save_pretrained(tmp_path / "p")
    back = SSSDForecastPipeline.from_pretrained(tmp_path / "p")
    assert back.model_version != old
    assert back.model_version == weights_model_version(pipe.denoiser, pipe.feature_spec)


# -- strict validation of every file -----------------------------------------------------------------


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _rewrite_weights(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors and re-pin them in the spec, so the hash check passes and the tensor checks run."""
    tensors = load_file(str(root / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(root / WEIGHTS), metadata={"format": "pt"})
    digest = hashlib.sha256((root / WEIGHTS).read_bytes()).hexdigest()
    _edit_json(root / SPEC_FILE, lambda s: s.update(weights_sha256=digest))


def _first_key(t: dict[str, torch.Tensor]) -> str:
    return sorted(t)[0]


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights flipped byte": (lambda r: (r / WEIGHTS).write_bytes(
        (r / WEIGHTS).read_bytes()[:-1] + bytes([(r / WEIGHTS).read_bytes()[-1] ^ 1])), "sha256 does not match"),
    "spec hash swapped": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s.update(weights_sha256="0" * 64)),
                          "sha256 does not match"),
    "weights missing": (lambda r: (r / WEIGHTS).unlink(), "weights missing"),
    "weights truncated": (lambda r: _rewrite_truncated(r), "corrupt or truncated"),
    "tensor dtype": (lambda r: _rewrite_weights(r, lambda t: t.update({_first_key(t): t[_first_key(t)].double()})),
                     "has dtype torch.float64, expected torch.float32"),
    "tensor shape": (lambda r: _rewrite_weights(r, lambda t: t.update({_first_key(t): t[_first_key(t)][..., :1]})),
                     "has shape"),
    "tensor NaN": (lambda r: _rewrite_weights(r, lambda t: t[_first_key(t)].view(-1)[0].fill_(float("nan"))),
                   "NaN or inf"),
    "tensor extra": (lambda r: _rewrite_weights(r, lambda t: t.update(extra=torch.zeros(1))), "unexpected.*extra"),
    "tensor missing": (lambda r: _rewrite_weights(r, lambda t: t.pop(_first_key(t))), "do not fit the network"),
    "spec missing": (lambda r: (r / SPEC_FILE).unlink(), f"{SPEC_FILE}: missing"),
    "spec not json": (lambda r: (r / SPEC_FILE).write_text("{"), "not valid JSON"),
    "spec unknown key": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s.update(surprise=1)), "surprise"),
    "spec missing key": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s.pop("data")), "data: Field required"),
    "spec format": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s.update(format_version=2)), "format_version 2"),
    "spec wrong type": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s["features"].update(context_bars="64")),
                        "context_bars"),
    "spec betas": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s["diffusion"]["betas"].__setitem__(5, 0.5)),
                   "trained_betas differ"),
    "spec norm": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s["features"]["feature_std"].__setitem__(0, 0.0)),
                  "positive std"),
    "spec horizons": (lambda r: _edit_json(r / SPEC_FILE, lambda s: s["features"].update(horizon_bars=8)),
                      "horizon_bars does not match"),
    "config unknown key": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.update(width=3)),
                           r"unknown keys \['width'\]"),
    "config missing key": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.pop("state")),
                           r"missing keys \['state'\]"),
    "config wrong type": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.update(channels=8.0)),
                          "channels=8.0 is not a valid int"),
    "config bool": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.update(state=True)), "state=True"),
    "config class": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.update(_class_name="UNet2DModel")),
                     "UNet2DModel"),
    "config shape": (lambda r: _edit_json(r / DENOISER_CONFIG, lambda c: c.update(channels=16)), "has shape"),
    "index class": (lambda r: _edit_json(r / "model_index.json", lambda c: c.update(_class_name="DDPMPipeline")),
                    "DDPMPipeline"),
    "index denoiser module": (lambda r: _edit_json(r / "model_index.json",
                                                   lambda c: c.update(denoiser=["os", "SSSDDenoiserModel"])),
                              "denoiser"),
    "index scheduler": (lambda r: _edit_json(r / "model_index.json",
                                             lambda c: c.update(scheduler=["diffusers", "LMSDiscreteScheduler"])),
                        "LMSDiscreteScheduler"),
    "index unknown key": (lambda r: _edit_json(r / "model_index.json", lambda c: c.update(vae=["diffusers", "X"])),
                          r"unknown keys \['vae'\]"),
    "scheduler prediction": (lambda r: _edit_json(r / SCHEDULER_CONFIG, lambda c: c.update(prediction_type="epsilon")),
                             "scheduler_config.json: .*prediction_type='epsilon'"),
    "scheduler unknown key": (lambda r: _edit_json(r / SCHEDULER_CONFIG, lambda c: c.update(warp=9)),
                              r"unknown keys \['warp'\]"),
    "scheduler off schedule": (
        lambda r: _edit_json(r / SCHEDULER_CONFIG, lambda c: c.update(prediction_type="epsilon")),
        r"prediction_type='epsilon', trained with 'v_prediction'"),
    "scheduler class": (lambda r: _edit_json(r / SCHEDULER_CONFIG, lambda c: c.update(_class_name="PNDMScheduler")),
                        "PNDMScheduler"),
    "pickle beside": (lambda r: (r / "denoiser" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04."),
                      "pickle-format file refused"),
}


def _rewrite_truncated(root: Path) -> None:
    blob = (root / WEIGHTS).read_bytes()[:100]
    (root / WEIGHTS).write_bytes(blob)
    _edit_json(root / SPEC_FILE, lambda s: s.update(weights_sha256=hashlib.sha256(blob).hexdigest()))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_file_is_validated_with_a_clear_error(damaged: Path, case: str) -> None:
    damage, match = DAMAGE[case]
    SSSDForecastPipeline.from_pretrained(damaged)  # loads before the damage
    damage(damaged)
    with pytest.raises(CheckpointError, match=match):
        SSSDForecastPipeline.from_pretrained(damaged)


def test_saving_into_a_directory_holding_a_pickle_is_refused(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="pickle"):
        pipe.save_pretrained(tmp_path)


# -- model card --------------------------------------------------------------------------------------


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "no YAML front matter"
    data: dict[str, Any] = yaml.safe_load(match.group(1))
    return data


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "docs" / "results" / "evaluate_report.json").read_text())
    return data


def test_model_card_is_hub_format_with_data_licence_use_validation_and_command(
    hourly_dir: Path, report: dict[str, Any]
) -> None:
    spec = json.loads((hourly_dir / SPEC_FILE).read_text())
    inputs = card_inputs_from_spec(spec, licence="apache-2.0", data_licence="MIT (gym-anytrading 2.0.0)",
                                   training_command=TRAIN_COMMAND, validation_report=report,
                                   evaluation_command="make evaluate")
    path = write_model_card(hourly_dir, inputs)
    assert path == hourly_dir / CARD_FILE
    text = path.read_text()
    meta = _front_matter(text)
    assert meta == read_model_card_metadata(path)
    assert meta["library_name"] == "sssd-signal-worker" and meta["license"] == "apache-2.0"
    assert {"diffusers", "time-series-forecasting"} <= set(meta["tags"])
    assert meta["datasets"] == ["eurusd_h1_2017_ask.csv"]
    assert meta["model_version"] == "sssd-25f873e791e6" and meta["timeframe"] == "1h"
    assert meta["horizons"] == ["1h", "4h"]
    assert meta["training_data"][0]["train_period"] == list(spec["data"]["train_period"])
    assert meta["training_data"][0]["validation_period"] == list(spec["data"]["validation_period"])
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["CRPS 1h"] == report["horizons"]["1h"]["model"]["crps"]
    assert metrics["90% coverage 4h"] == report["horizons"]["4h"]["model"]["coverage"]["90"]
    body = text[text.index("\n---\n", 4):]
    for section in ("## Data and periods", "## Licence", "## Intended use", "## Limits", "## Validation",
                    "## Training command"):
        assert section in body, section
    assert "MIT (gym-anytrading 2.0.0)" in body and "2017-01-09T06:00:00Z .. 2017-09-29T16:00:00Z" in body
    h1 = report["horizons"]["1h"]
    row = next(line for line in body.splitlines() if line.startswith("| 1h |"))
    assert f"| {h1['n']} | {h1['model']['crps']:.4e} | {h1['ewma_normal']['crps']:.4e} |" in row
    assert f"{h1['model']['coverage']['90']:.1%}" in row
    assert f"```bash\n{TRAIN_COMMAND}\n```" in body
    SSSDForecastPipeline.from_pretrained(hourly_dir)  # a card in the directory does not disturb loading


def test_model_card_refuses_another_models_report_and_says_when_there_is_none(
    hourly_dir: Path, report: dict[str, Any]
) -> None:
    spec = json.loads((hourly_dir / SPEC_FILE).read_text())
    other = {**report, "model_version": "sssd-000000000000"}
    with pytest.raises(ValueError, match="another model's scores"):
        render_model_card(card_inputs_from_spec(spec, licence="apache-2.0", data_licence="MIT",
                                                training_command=TRAIN_COMMAND, validation_report=other))
    text = render_model_card(card_inputs_from_spec(spec, licence="apache-2.0", data_licence="MIT",
                                                   training_command=TRAIN_COMMAND))
    assert "No validation report was supplied" in text and "model-index" not in _front_matter(text)
    with pytest.raises(ValueError, match="training_command"):
        render_model_card(card_inputs_from_spec(spec, licence="apache-2.0", data_licence="MIT", training_command=" "))


def test_evaluate_rewrites_the_card_with_its_table_and_keeps_the_training_command(
    hourly_dir: Path, report: dict[str, Any], tmp_path: Path
) -> None:
    """What ``signal-worker evaluate --write-card`` does to a pipeline directory trained with a card."""
    root = tmp_path / "pipe"
    shutil.copytree(hourly_dir, root)
    spec = json.loads((root / SPEC_FILE).read_text())
    write_model_card(root, card_inputs_from_spec(spec, licence="apache-2.0", data_licence="MIT (gym-anytrading)",
                                                 training_command=TRAIN_COMMAND))
    assert "No validation report was supplied" in (root / CARD_FILE).read_text()
    rewrite_model_card(root, report, evaluation_command="signal-worker evaluate --write-card")
    text = (root / CARD_FILE).read_text()
    meta = read_model_card_metadata(root / CARD_FILE)
    assert meta["training_command"] == TRAIN_COMMAND and f"```bash\n{TRAIN_COMMAND}\n```" in text
    assert meta["training_data"][0]["licence"] == "MIT (gym-anytrading)"
    assert "signal-worker evaluate --write-card" in text and "No validation report" not in text
    assert next(line for line in text.splitlines() if line.startswith("| 1h |"))
    with pytest.raises(ValueError, match="another model's scores"):
        rewrite_model_card(root, {**report, "model_version": "sssd-000000000000"}, evaluation_command="x")


# -- docs --------------------------------------------------------------------------------------------


def test_docs_pipeline_example_runs() -> None:
    text = (ROOT / "docs" / "pipeline.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/pipeline.md has no python example"
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(blocks), "docs/pipeline.md", "exec"), namespace)


def test_diffusers_pipeline_api_components_and_to(tiny_pipeline_dir: Path, books: dict[str, CandleSeries]) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(tiny_pipeline_dir)
    assert set(pipe.components) == {"denoiser", "scheduler"}
    rebuilt = SSSDForecastPipeline(**pipe.components, feature_spec=pipe.feature_spec)
    kw: dict[str, Any] = {"num_inference_steps": 5, "num_samples": 16, "seed": 4}
    assert rebuilt(books, **kw).forecasts == pipe(books, **kw).forecasts
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    with pytest.raises(TypeError, match="feature_spec"):
        SSSDForecastPipeline(**pipe.components)
    with pytest.raises(ValueError, match="float32"):
        pipe.to(torch.float64)(books, **kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_equals_forecaster_on_cuda(hourly_dir: Path, books: dict[str, CandleSeries]) -> None:
    pipe = SSSDForecastPipeline.from_pretrained(hourly_dir).to("cuda")
    assert pipe.device.type == "cuda"
    out = pipe(books, num_inference_steps=10, num_samples=64, generator=torch.Generator().manual_seed(7))
    ref = Forecaster.load(HOURLY_CKPT, device="cuda").forecast(books, num_samples=64, num_steps=10, seed=7)
    assert out.forecasts == ref


def test_new_weights_are_named_as_save_checkpoint_names_them(manifest_fields: dict[str, Any], tmp_path: Path,
                                                             books: dict[str, CandleSeries]) -> None:
    """The path training will take: a fresh model and a spec without model_version, saved as a pipeline."""
    model = SSSDDenoiserModel.from_network_config(TINY)
    model.load_state_dict(tiny_model(seed=3).state_dict())
    spec = ForecastSpec.model_validate({k: v for k, v in manifest_fields.items() if k != "network"})
    assert spec.model_version is None
    pipe = SSSDForecastPipeline(denoiser=model, scheduler=make_scheduler("dpmpp", NoiseSchedule.cosine(200)),
                                feature_spec=spec)
    pipe.save_pretrained(tmp_path / "p")
    v1 = save_checkpoint(tmp_path / "v1", tiny_model(seed=3), manifest_fields)
    back = SSSDForecastPipeline.from_pretrained(tmp_path / "p")
    assert back.model_version == pipe.model_version == v1.model_version
    kw: dict[str, Any] = {"num_inference_steps": 5, "num_samples": 16, "seed": 1}
    assert back(books, **kw).forecasts == Forecaster(load_checkpoint(tmp_path / "v1"), device="cpu").forecast(
        books, num_samples=16, num_steps=5, seed=1)

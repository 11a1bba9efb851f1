"""Checkpoints: a faithful round trip, and a CheckpointError naming the file and field for everything
wrong with one. Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.errors import CheckpointError
from worker.features.transform import BAR_FEATURES
from worker.model.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    load_checkpoint,
    model_version,
    save_checkpoint,
)
from worker.model.schedule import NoiseSchedule

from .conftest import TINY, tiny_model


def _edit_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((ckpt / MANIFEST).read_text())
    edit(raw)
    (ckpt / MANIFEST).write_text(json.dumps(raw))


def _pin_weights(ckpt: Path, weights: Path) -> None:
    """Make the manifest's sha256 match ``weights`` (an attacker or a careless copy can do that too)."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_manifest(ckpt, lambda m: m.update(weights_sha256=digest))


def _load_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    return str(info.value)


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_gives_identical_weights_and_outputs(tiny_ckpt_dir: Path, manifest_fields: dict[str, Any]) -> None:
    original = tiny_model()
    ckpt = load_checkpoint(tiny_ckpt_dir)
    assert ckpt.network == TINY
    loaded_sd, original_sd = ckpt.model.state_dict(), original.state_dict()
    assert set(loaded_sd) == set(original_sd)
    for key, value in original_sd.items():
        assert torch.equal(loaded_sd[key], value), key
    assert not ckpt.model.training

    g = torch.Generator().manual_seed(0)
    feats, ctime = torch.randn(3, 64, len(BAR_FEATURES), generator=g), torch.randn(3, 64, 4, generator=g)
    x, ftime, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, 4, generator=g), torch.tensor([0.0, 57.0, 199.0])
    with torch.no_grad():
        a = original.denoise(x, t, original.encode(feats, ctime), ftime)
        b = ckpt.model.denoise(x, t, ckpt.model.encode(feats, ctime), ftime)
    assert torch.equal(a, b)
    assert a.abs().max() > 0  # the random output layer makes the network non-trivial

    # Everything else survives JSON exactly.
    assert ckpt.schedule == NoiseSchedule.cosine(200)
    assert list(ckpt.norm.feature_mean) == manifest_fields["features"]["feature_mean"]
    assert ckpt.spec.timeframe_ms == 3_600_000 and ckpt.spec.window_bars == 129
    assert ckpt.horizons_ms == [3_600_000, 14_400_000]


def test_manifest_pins_the_weights(tiny_ckpt_dir: Path) -> None:
    manifest = json.loads((tiny_ckpt_dir / MANIFEST).read_text())
    digest = hashlib.sha256((tiny_ckpt_dir / WEIGHTS).read_bytes()).hexdigest()
    assert manifest["weights_sha256"] == digest
    # Format 2: the version pins the weights and everything else that changes a forecast.
    assert manifest["model_version"] == model_version(digest, manifest)
    assert manifest["format_version"] == 2
    assert manifest["format_version"] == FORMAT_VERSION
    assert load_checkpoint(tiny_ckpt_dir).model_version == manifest["model_version"]


def test_save_refuses_an_invalid_manifest(tmp_path: Path, manifest_fields: dict[str, Any]) -> None:
    fields = {**manifest_fields, "surprise": 1}
    with pytest.raises(ValueError, match="surprise"):
        save_checkpoint(tmp_path / "x", tiny_model(), fields)


# -- damaged files ---------------------------------------------------------------------------------


def test_flipped_bytes_fail_the_sha_check(ckpt_copy: Path) -> None:
    weights = ckpt_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    msg = _load_error(ckpt_copy)
    assert str(weights) in msg and "sha256" in msg


def test_truncated_weights_are_refused(ckpt_copy: Path) -> None:
    weights = ckpt_copy / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    msg = _load_error(ckpt_copy)
    assert str(weights) in msg and "sha256" in msg
    _pin_weights(ckpt_copy, weights)  # even with a matching sha, the file itself is refused
    msg = _load_error(ckpt_copy)
    assert str(weights) in msg and "corrupt or truncated" in msg


def test_nan_weights_are_refused(ckpt_copy: Path) -> None:
    weights = ckpt_copy / WEIGHTS
    tensors = load_file(str(weights))
    tensors["proj.weight"] = tensors["proj.weight"].clone()
    tensors["proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    _pin_weights(ckpt_copy, weights)
    msg = _load_error(ckpt_copy)
    assert str(weights) in msg and "proj.weight" in msg and "NaN" in msg


def test_missing_manifest(ckpt_copy: Path) -> None:
    (ckpt_copy / MANIFEST).unlink()
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "missing" in msg


def test_manifest_not_json(ckpt_copy: Path) -> None:
    (ckpt_copy / MANIFEST).write_text("{not json")
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "not valid JSON" in msg


def test_missing_weights(ckpt_copy: Path) -> None:
    (ckpt_copy / WEIGHTS).unlink()
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / WEIGHTS) in msg and "missing" in msg


def test_missing_directory(tmp_path: Path) -> None:
    msg = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "not found" in msg


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_wrong_format_version(ckpt_copy: Path, version: object) -> None:
    _edit_manifest(ckpt_copy, lambda m: m.update(format_version=version))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "format_version" in msg


# -- manifest contents -----------------------------------------------------------------------------


def test_network_config_that_does_not_fit_the_weights(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["network"].update(channels=16))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / WEIGHTS) in msg and "has shape" in msg and "expected" in msg


def test_network_with_other_block_count(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["network"].update(denoiser_blocks=2))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / WEIGHTS) in msg and "missing" in msg and "blocks.1" in msg


def test_network_horizon_must_match_features(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["network"].update(horizon=6))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "network shape does not match" in msg


def test_unknown_network_key(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["network"].update(heads=4))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "network" in msg and "heads" in msg


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("features", "vol_lambda"), "features.vol_lambda"),
        (("diffusion", "betas"), "diffusion.betas"),
        (("data", "sha256"), "data.sha256"),
        (("weights_sha256",), "weights_sha256"),
        (("created_at",), "created_at"),
    ],
)
def test_manifest_missing_a_field(ckpt_copy: Path, path: tuple[str, ...], field: str) -> None:
    def drop(m: dict[str, Any]) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    _edit_manifest(ckpt_copy, drop)
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and field in msg and "Field required" in msg


@pytest.mark.parametrize(("where", "field"), [((), "tokenizer"), (("features",), "features.lookahead")])
def test_manifest_with_an_extra_field(ckpt_copy: Path, where: tuple[str, ...], field: str) -> None:
    def add(m: dict[str, Any]) -> None:
        node = m
        for key in where:
            node = node[key]
        node[field.split(".")[-1]] = 1

    _edit_manifest(ckpt_copy, add)
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and field in msg and "Extra inputs" in msg


def test_wrong_type_is_refused_not_coerced(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["features"].update(context_bars="64"))
    msg = _load_error(ckpt_copy)
    assert "features.context_bars" in msg


def test_nan_in_betas(ckpt_copy: Path) -> None:
    def poison(m: dict[str, Any]) -> None:
        m["diffusion"]["betas"][17] = float("nan")  # json writes NaN, and reads it back

    _edit_manifest(ckpt_copy, poison)
    assert "NaN" in (ckpt_copy / MANIFEST).read_text()
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "diffusion" in msg and "finite" in msg


def test_linear_schedule_is_far_from_pure_noise(ckpt_copy: Path) -> None:
    betas = [float(b) for b in torch.linspace(1e-4, 0.02, 200, dtype=torch.float64)]
    _edit_manifest(ckpt_copy, lambda m: m["diffusion"].update(schedule="linear", betas=betas))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and "diffusion" in msg and "far from pure noise" in msg


def test_unknown_prediction_type(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["diffusion"].update(prediction_type="sample"))
    msg = _load_error(ckpt_copy)
    assert "diffusion.prediction_type" in msg


def test_feature_set_of_other_code(ckpt_copy: Path) -> None:
    _edit_manifest(ckpt_copy, lambda m: m["features"].update(bar_features=[*BAR_FEATURES[:-1], "spread"]))
    msg = _load_error(ckpt_copy)
    assert "features" in msg and "spread" in msg and "does not match" in msg


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f.update(feature_mean=f["feature_mean"][:-1]), "normalisation vectors"),
        (lambda f: f["feature_std"].__setitem__(2, 0.0), "positive std"),
        (lambda f: f["feature_mean"].__setitem__(0, float("inf")), "finite"),
        (lambda f: f.update(horizon_bars=3), "horizon_bars"),
        (lambda f: f.update(target_std=0.0), "features.target_std"),
    ],
)
def test_inconsistent_features(ckpt_copy: Path, edit: Callable[[dict[str, Any]], None], match: str) -> None:
    _edit_manifest(ckpt_copy, lambda m: edit(m["features"]))
    msg = _load_error(ckpt_copy)
    assert str(ckpt_copy / MANIFEST) in msg and match in msg


def test_keys_added_later_are_not_written_at_their_defaults(tiny_ckpt_dir: Path,
                                                          manifest_fields: dict[str, Any]) -> None:
    """initial_noise and vol_estimator came after checkpoints had shipped: at their defaults they are
    left out of the file and of the model_version, so every earlier checkpoint reads and hashes as before."""
    raw = json.loads((tiny_ckpt_dir / MANIFEST).read_text())
    assert "initial_noise" not in raw["diffusion"] and "vol_estimator" not in raw["features"]
    explicit = {**manifest_fields, "diffusion": {**manifest_fields["diffusion"], "initial_noise": "iid"}}
    assert model_version("ab" * 32, explicit) != model_version("ab" * 32, {**explicit, "diffusion": {
        **manifest_fields["diffusion"], "initial_noise": "horizon_stratified"}})
    ckpt = load_checkpoint(tiny_ckpt_dir)
    assert ckpt.manifest.diffusion.initial_noise == "iid" and ckpt.spec.vol_estimator == "returns"
    assert ckpt.manifest.model_dump(mode="json")["diffusion"] == manifest_fields["diffusion"]


def test_stratified_noise_is_saved_pinned_and_loaded(tmp_path: Path, manifest_fields: dict[str, Any]) -> None:
    fields = {**manifest_fields, "diffusion": {**manifest_fields["diffusion"], "initial_noise": "horizon_stratified"}}
    plain = save_checkpoint(tmp_path / "iid", tiny_model(), manifest_fields)
    strat = save_checkpoint(tmp_path / "strat", tiny_model(), fields)
    assert strat.model_version != plain.model_version  # it changes the forecasts, so the version
    assert load_checkpoint(tmp_path / "strat").manifest.diffusion.initial_noise == "horizon_stratified"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["features"].update(vol_estimator="range", range_bias=1.1), "seasonal feature set"),
        (lambda m: m["features"].update(vol_estimator="parkinson"), "vol_estimator"),
        (lambda m: m["diffusion"].update(initial_noise="sobol"), "initial_noise"),
        (lambda m: m["features"].update(profile_by_utc_offset={"-300": [1.0] * 288}), "seasonal feature set"),
    ],
)
def test_later_keys_with_bad_values_are_refused(ckpt_copy: Path, edit: Callable[[dict[str, Any]], None],
                                                match: str) -> None:
    _edit_manifest(ckpt_copy, edit)
    assert match in _load_error(ckpt_copy)


# -- nothing is ever unpickled ---------------------------------------------------------------------


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the crafted payload really runs code when unpickled, so the tests below mean something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_bearing_pt_file_is_refused_and_never_run(ckpt_copy: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    (ckpt_copy / WEIGHTS).unlink()
    evil = ckpt_copy / "model.pt"
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:
        torch.save({"proj.weight": _RunsCode(marker)}, evil)
    _pin_weights(ckpt_copy, evil)
    msg = _load_error(ckpt_copy)
    assert not marker.exists(), "the checkpoint loader executed pickled code"
    assert str(evil) in msg and "refused" in msg


def test_pickle_named_safetensors_is_refused_and_never_run(ckpt_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = ckpt_copy / WEIGHTS
    weights.write_bytes(pickle.dumps(_RunsCode(marker)))
    msg = _load_error(ckpt_copy)  # the sha check catches the swap first
    assert str(weights) in msg and "sha256" in msg
    _pin_weights(ckpt_copy, weights)  # and with a matching sha the parser refuses it
    msg = _load_error(ckpt_copy)
    assert str(weights) in msg and "corrupt or truncated" in msg
    assert not marker.exists()


def test_legacy_pt_of_plain_tensors_loads_when_pinned(ckpt_copy: Path) -> None:
    """A legacy ``.pt`` state dict (tensors only) is accepted when the manifest's sha256 pins it."""
    tensors = load_file(str(ckpt_copy / WEIGHTS))
    (ckpt_copy / WEIGHTS).unlink()
    legacy = ckpt_copy / "model.pt"
    torch.save(tensors, legacy)
    _pin_weights(ckpt_copy, legacy)
    ckpt = load_checkpoint(ckpt_copy)
    for key, value in tensors.items():
        assert torch.equal(ckpt.model.state_dict()[key], value)


def test_legacy_pt_is_checked_against_the_manifest_sha(ckpt_copy: Path) -> None:
    """The manifest's weights_sha256 (and the model_version derived from it) pins the weights; a ``.pt``
    with other weights must not load under that model_version. The loader only checks the sha for
    ``model.safetensors``; the legacy branch skips it."""
    tensors = {k: v + 0.01 for k, v in load_file(str(ckpt_copy / WEIGHTS)).items()}
    (ckpt_copy / WEIGHTS).unlink()
    legacy = ckpt_copy / "model.pt"
    torch.save(tensors, legacy)
    msg = _load_error(ckpt_copy)
    assert str(legacy) in msg and "sha256" in msg

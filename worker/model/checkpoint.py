"""Checkpoints: ``model.safetensors`` (weights) + ``manifest.json`` (everything else).

Loading validates strictly and fails with a :class:`CheckpointError` naming what is wrong. Nothing is
ever unpickled: weights come from safetensors; a legacy ``.pt`` file is read only with
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worker.errors import CheckpointError
from worker.features.seasonal import SeasonalProfile
from worker.features.transform import FEATURE_SETS, FeatureSpec, Normalization
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.noise import InitialNoise
from worker.model.registry import (  # re-exported: callers may import them from here
    CHECKPOINTS,
    DEFAULT_CHECKPOINT,
    DEFAULT_CHECKPOINT_NAME,
    resolve_checkpoint,
)
from worker.model.schedule import NoiseSchedule

# Format 2 adds the seasonal feature set (profile in the manifest) and the validation-fitted
# spread calibration. Format 1 (the hourly EURUSD checkpoint) still loads and forecasts unchanged.
FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
PIPELINE_INDEX = "model_index.json"  # a directory holding it is a pipeline (worker/model/pipeline.py)


__all__ = ["CHECKPOINTS", "DEFAULT_CHECKPOINT", "DEFAULT_CHECKPOINT_NAME", "LATER_MANIFEST_DEFAULTS",
           "LEGACY_CALIBRATION_SAMPLER",
           "CalibrationSampler", "Checkpoint", "Manifest",
           "build_checkpoint", "check_tensors", "load_checkpoint", "model_version",
           "resolve_checkpoint", "save_checkpoint"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _LaterKeys(_Strict):
    """A section that gained keys after checkpoints had shipped: a key at its default is not written,
    so earlier checkpoints' files and model_version (a digest of these sections) stay what they were."""

    _later_defaults: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key, default in self._later_defaults.items():
            if key in data and data[key] == default:
                del data[key]
        return data


class DiffusionManifest(_LaterKeys):
    _later_defaults: ClassVar[dict[str, Any]] = {"initial_noise": "iid"}

    schedule: str
    prediction_type: Literal["epsilon", "v_prediction"]
    betas: list[float] = Field(min_length=2)
    initial_noise: InitialNoise = "iid"  # worker/model/noise.py; checkpoints before it: i.i.d.


class FeatureManifest(_LaterKeys):
    _later_defaults: ClassVar[dict[str, Any]] = {"vol_estimator": "returns", "range_bias": None,
                                                 "profile_by_utc_offset": None}

    timeframe_ms: int = Field(gt=0)
    context_bars: int = Field(gt=0)
    vol_lookback: int = Field(gt=0)
    vol_lambda: float = Field(gt=0, lt=1)
    max_missing_fraction: float = Field(ge=0, le=1)
    bar_features: list[str]
    feature_mean: list[float]
    feature_std: list[float]
    target_mean: float
    target_std: float = Field(gt=0)
    horizons_ms: list[int] = Field(min_length=1)
    horizon_bars: int = Field(gt=0)
    feature_set: Literal["ohlc_ewma", "seasonal"] = "ohlc_ewma"
    profile: list[float] | None = None  # seasonal: per-slot multipliers of the trading day
    week_open_factor: float | None = None
    # The volatility the seasonal set scales by: an EWMA of squared deseasonalised returns, or of the
    # Parkinson range variance times range_bias (features/seasonal.py). Earlier checkpoints: returns.
    vol_estimator: Literal["returns", "range"] = "returns"
    range_bias: float | None = Field(None, gt=0)
    # Seasonal set: per-season slots keyed by New York's UTC offset in minutes ("-240" summer time,
    # "-300" winter time; features/seasonal.py); bars at other offsets use ``profile``.
    profile_by_utc_offset: dict[str, list[float]] | None = None

    @model_validator(mode="after")
    def _names(self) -> FeatureManifest:
        expected = FEATURE_SETS[self.feature_set]
        if tuple(self.bar_features) != expected:
            raise ValueError(f"feature set {self.bar_features} does not match this code's {list(expected)}")
        if self.feature_set == "seasonal" and (self.profile is None or self.week_open_factor is None):
            raise ValueError("the seasonal feature set needs profile and week_open_factor")
        if self.vol_estimator == "range" and (self.feature_set != "seasonal" or self.range_bias is None):
            raise ValueError("vol_estimator 'range' needs the seasonal feature set and range_bias")
        if self.profile_by_utc_offset is not None:
            if self.feature_set != "seasonal":
                raise ValueError("profile_by_utc_offset needs the seasonal feature set")
            for key in self.profile_by_utc_offset:
                if not key.lstrip("-+").isdigit() or not -720 <= int(key) <= 840:
                    raise ValueError(f"profile_by_utc_offset key {key!r} is not a UTC offset in minutes")
        return self


class DataManifest(_Strict):
    source: str
    sha256: str
    rows: int
    train_period: tuple[str, str]
    validation_period: tuple[str, str]


class CalibrationSampler(_Strict):
    """The sampling setting a checkpoint's spread factors were fitted under: spread is a property of
    the sampled paths, and a sampler with fewer steps samples a (slightly) different distribution."""

    scheduler: str  # a SAMPLERS name, by its fused loop's name (samplers.algorithm_of)
    steps: int = Field(ge=1)

    @model_validator(mode="after")
    def _known(self) -> CalibrationSampler:
        from worker.model.samplers import SAMPLERS, algorithm_of

        if self.scheduler not in SAMPLERS or algorithm_of(self.scheduler) != self.scheduler:
            raise ValueError(f"scheduler {self.scheduler!r} is not a sampler name "
                             f"(one of {sorted({algorithm_of(n) for n in SAMPLERS})})")
        return self

    def label(self) -> str:
        return f"{self.scheduler} {self.steps} steps"


# What every calibration was fitted under before the setting was recorded (calibration_samples'
# defaults then): the checkpoints calibrated before it keep their files and model_version. Built
# unvalidated: validating imports the sampler registry (diffusers), which reading a manifest must not.
LEGACY_CALIBRATION_SAMPLER = CalibrationSampler.model_construct(scheduler="dpmpp", steps=10)
_LEGACY_CALIBRATION_SAMPLER_JSON = LEGACY_CALIBRATION_SAMPLER.model_dump()
# The keys a manifest (and a pipeline's feature spec, which shares them) leaves out at their default.
LATER_MANIFEST_DEFAULTS: dict[str, Any] = {"calibration_sampler": _LEGACY_CALIBRATION_SAMPLER_JSON}


class Manifest(_LaterKeys):
    _later_defaults: ClassVar[dict[str, Any]] = LATER_MANIFEST_DEFAULTS

    format_version: int
    model_version: str
    created_at: str
    network: dict[str, int | float]
    diffusion: DiffusionManifest
    features: FeatureManifest
    data: DataManifest
    training: dict[str, Any]
    validation_metrics: dict[str, Any]
    weights_sha256: str
    # Format 2: per-horizon spread factor (key: horizon in ms), fitted on the validation period and
    # applied to the sampled paths by Forecaster.sample, so backtest and worker share it.
    calibration: dict[str, float] | None = None
    # The sampler and step count ``calibration`` was fitted with (Forecaster.calibration_mismatch).
    calibration_sampler: CalibrationSampler = LEGACY_CALIBRATION_SAMPLER
    name: str | None = None  # the registry name the checkpoint is shipped under, if any

    def fitted_sampler(self) -> CalibrationSampler | None:
        """The sampler setting ``calibration`` was fitted for; None for an uncalibrated checkpoint."""
        return self.calibration_sampler if self.calibration else None

    @model_validator(mode="after")
    def _calibration_sampler_needs_calibration(self) -> Manifest:
        if self.calibration is None and self.calibration_sampler != LEGACY_CALIBRATION_SAMPLER:
            raise ValueError("calibration_sampler is set but there is no calibration it describes")
        return self


@dataclass(frozen=True)
class Checkpoint:
    manifest: Manifest
    network: NetworkConfig
    schedule: NoiseSchedule
    spec: FeatureSpec
    norm: Normalization
    model: SSSDDenoiser

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def horizons_ms(self) -> list[int]:
        return list(self.manifest.features.horizons_ms)

    @property
    def timeframe_ms(self) -> int:
        return self.manifest.features.timeframe_ms

    def spread_factor(self, horizon_ms: int) -> float | None:
        cal = self.manifest.calibration
        if not cal:
            return None
        return cal.get(str(int(horizon_ms)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(out_dir: str | Path, model: SSSDDenoiser, manifest_fields: dict[str, Any]) -> Manifest:
    """Write weights, then a manifest whose ``weights_sha256`` and ``model_version`` pin them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
    digest = _sha256(out / WEIGHTS)
    fields = dict(manifest_fields)
    fields.update(format_version=FORMAT_VERSION, weights_sha256=digest, model_version="")
    manifest = Manifest.model_validate(fields)
    # The version is computed from the manifest as written (defaults filled in), as a reader sees it.
    manifest = manifest.model_copy(update={"model_version": model_version(digest, manifest.model_dump(mode="json"))})
    (out / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def model_version(weights_sha256: str, fields: dict[str, Any]) -> str:
    """Format 2: a digest of the weights *and* of everything else that changes a forecast (features,
    profile, normalisation, calibration, schedule), so recalibrating gives a new version while
    retraining with the same command gives the same one, and a calibration fitted for another sampler
    setting is another version. (Format 1 used the weights digest alone.)"""
    pinned = {k: fields.get(k) for k in ("features", "calibration", "diffusion", "network")}
    # The sampler setting the calibration was fitted for is part of what it means (two settings may
    # give the same factors on their 0.01 grid); pinned only where it is not the legacy default, so
    # every earlier version stays what it was.
    sampler = fields.get("calibration_sampler")
    if sampler is not None and sampler != _LEGACY_CALIBRATION_SAMPLER_JSON:
        pinned["calibration_sampler"] = sampler
    blob = weights_sha256 + json.dumps(pinned, sort_keys=True, separators=(",", ":"))
    return f"sssd-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _read_manifest(path: Path) -> Manifest:
    if not path.exists() and (path.parent / PIPELINE_INDEX).exists():  # the pipeline layout: no weights read
        from worker.model.pipeline import read_pipeline_manifest

        return read_pipeline_manifest(path.parent)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: manifest missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: manifest must be a JSON object")
    if raw.get("format_version") not in SUPPORTED_FORMATS:
        raise CheckpointError(
            f"{path}: format_version {raw.get('format_version')!r} is not supported (expected one of "
            f"{list(SUPPORTED_FORMATS)})"
        )
    if raw.get("format_version") == 1:
        for key in ("calibration", "calibration_sampler", "name"):
            if key in raw:
                raise CheckpointError(f"{path}: invalid manifest: {key}: not a format-1 field")
    for key in ("train_period", "validation_period"):  # JSON has no tuples
        if isinstance(raw.get("data"), dict) and isinstance(raw["data"].get(key), list):
            raw["data"][key] = tuple(raw["data"][key])
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{path}: invalid manifest: {where}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code: say so, never fall back
            raise CheckpointError(f"{path}: refused to load (not a plain tensor file: {exc})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        return obj
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint (a name from :data:`CHECKPOINTS` or a directory): a pipeline
    directory (``model_index.json``, read by worker/model/pipeline.py) or a format-1/2 manifest
    directory. Every mismatch is a :class:`CheckpointError`."""
    root = resolve_checkpoint(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found (names: {', '.join(CHECKPOINTS)})")
    if (root / PIPELINE_INDEX).exists():
        from worker.model.pipeline import load_pipeline_checkpoint  # diffusers: only for that layout

        return load_pipeline_checkpoint(root, device=device)
    manifest = _read_manifest(root / MANIFEST)
    weights_path = root / WEIGHTS
    if not weights_path.exists():
        legacy = sorted(root.glob("*.pt"))
        if not legacy:
            raise CheckpointError(f"{weights_path}: weights missing")
        weights_path = legacy[0]
    if _sha256(weights_path) != manifest.weights_sha256:
        raise CheckpointError(f"{weights_path}: sha256 does not match the manifest (corrupt or swapped weights)")
    tensors = _read_weights(weights_path)
    return build_checkpoint(manifest, tensors, root / MANIFEST, weights_where=weights_path, device=device)


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Names, dtypes, shapes and finiteness of ``tensors`` against ``model``'s, then load them (strict)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the network (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for key, value in tensors.items():
        want = expected[key]
        if value.shape != want.shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        if value.dtype != want.dtype:
            raise CheckpointError(f"{where}: {key} has dtype {value.dtype}, expected {want.dtype}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: {key} contains NaN or inf")
    model.load_state_dict(tensors, strict=True)


def build_checkpoint(manifest: Manifest, tensors: dict[str, torch.Tensor], where: str | Path, *,
                     weights_where: str | Path | None = None, model: SSSDDenoiser | None = None,
                     device: torch.device | str = "cpu") -> Checkpoint:
    """The one validator of both layouts: cross-checks a manifest (schedule, normalisation, horizons,
    network shape, seasonal profile, calibration) and the tensors against the network it describes,
    then assembles the :class:`Checkpoint`. ``where`` names the manifest's file in errors,
    ``weights_where`` the weights'; ``model``: the module to load into (default a new ``SSSDDenoiser``;
    its config must be the manifest's). Every mismatch is a :class:`CheckpointError`."""
    weights_where = where if weights_where is None else weights_where
    try:
        schedule = NoiseSchedule(
            betas=tuple(manifest.diffusion.betas),
            prediction_type=manifest.diffusion.prediction_type,
            name=manifest.diffusion.schedule,
        )
    except ValueError as exc:
        raise CheckpointError(f"{where}: diffusion: {exc}") from None
    f = manifest.features
    n_feat = len(FEATURE_SETS[f.feature_set])
    if len(f.feature_mean) != n_feat or len(f.feature_std) != n_feat:
        raise CheckpointError(f"{where}: normalisation vectors must have {n_feat} entries")
    if not all(np.isfinite(f.feature_mean)) or not all(s > 0 and np.isfinite(s) for s in f.feature_std):
        raise CheckpointError(f"{where}: normalisation must be finite with positive std")
    if max(f.horizons_ms) != f.horizon_bars * f.timeframe_ms:
        raise CheckpointError(f"{where}: horizon_bars does not match the longest horizon")
    try:
        net_cfg = NetworkConfig(**manifest.network)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CheckpointError(f"{where}: network: {exc}") from None
    if net_cfg.horizon != f.horizon_bars or net_cfg.bar_features != n_feat:
        raise CheckpointError(f"{where}: network shape does not match the feature manifest (network: horizon "
                              f"{net_cfg.horizon}, bar_features {net_cfg.bar_features}; features: horizon_bars "
                              f"{f.horizon_bars}, {n_feat} bar features)")
    profile = None
    if f.feature_set == "seasonal":
        assert f.profile is not None and f.week_open_factor is not None
        try:
            seasons = tuple(sorted((int(k), tuple(v)) for k, v in (f.profile_by_utc_offset or {}).items()))
            profile = SeasonalProfile(f.timeframe_ms, tuple(f.profile), f.week_open_factor, seasons)
        except ValueError as exc:
            raise CheckpointError(f"{where}: features.profile: {exc}") from None
    for key, factor in (manifest.calibration or {}).items():
        if not key.isdigit() or int(key) not in f.horizons_ms or not (np.isfinite(factor) and 0 < factor < 10):
            raise CheckpointError(f"{where}: calibration[{key!r}] = {factor!r}: needs a trained "
                                  "horizon (ms) and a finite factor in (0, 10)")

    if model is None:
        model = SSSDDenoiser(net_cfg)
    elif model.cfg != net_cfg:
        raise CheckpointError(f"{where}: network {net_cfg} does not match the denoiser's {model.cfg}")
    check_tensors(model, tensors, weights_where)
    model.eval().to(device)
    spec = FeatureSpec(f.timeframe_ms, f.context_bars, f.vol_lookback, f.vol_lambda, f.max_missing_fraction,
                       feature_set=f.feature_set, profile=profile, vol_estimator=f.vol_estimator,
                       range_bias=f.range_bias or 1.0)
    norm = Normalization(np.asarray(f.feature_mean), np.asarray(f.feature_std), f.target_mean, f.target_std)
    return Checkpoint(manifest, net_cfg, schedule, spec, norm, model)

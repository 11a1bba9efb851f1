"""The model the diffusers way: a ``ModelMixin`` denoiser, a ``DiffusionPipeline``, and converters
from and to checkpoint format v1.

    pipe = SSSDForecastPipeline.from_pretrained(DIR)          # a local directory; nothing is fetched
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe({"EURUSD": candles}, num_inference_steps=10, num_samples=64,
               generator=torch.Generator().manual_seed(7))
    out.forecasts["EURUSD"]                                   # a forecaster.Forecast
    pipe.save_pretrained(DIR2)                                # safetensors only

A pipeline directory::

    model_index.json                               diffusers: the pipeline class and its components
    denoiser/config.json                           the network's NetworkConfig fields (ModelMixin config)
    denoiser/diffusion_pytorch_model.safetensors   the weights; never a pickle
    scheduler/scheduler_config.json                the sampler, as diffusers writes it (trained betas)
    feature_spec.json                              features, normalisation, training schedule, data,
                                                   model_version and the weights' sha256
    README.md                                      model card (optional, see model_card.py)

The feature spec is a file of its own, not pipeline config in ``model_index.json``: it has its own
strict schema and format version, it can be read without diffusers, and ``model_index.json`` stays
exactly what diffusers writes.

Loading keeps the v1 guarantees: every file is validated strictly (unknown or missing keys, types,
tensor names, shapes, dtypes, finiteness), the weights' sha256 recorded in the spec is checked, any
pickle-format file in the directory is refused, and each mismatch is a ``CheckpointError`` naming the
file and what is wrong.

The weights have one identity in both layouts: ``weights_v1_sha256`` is the sha256 of the v1 file
``save_checkpoint`` would write for them (computed in memory), and a model_version is ``sssd-`` + its
first 12 hex digits. A converted checkpoint keeps its model_version; ``feature_spec.json`` pins the
pipeline's own weights file by its sha256 and records the v1 hash it was converted from.

Sampling is the Forecaster's, not a second implementation: the pipeline assembles its ``Checkpoint``
with ``checkpoint.build_checkpoint`` (the validator the manifest layout uses too; the denoiser's weights
are shared) and calls ``Forecaster.forecast``, so features, contexts, seeds, the sampling loop and the
summary are the same code and the forecasts are equal. ``checkpoint.load_checkpoint`` (so
``Forecaster.load``) reads a pipeline directory through this module. Any scheduler on the training
schedule is served (one off it is refused when assigned, naming what differs): a validated configuration
of ``samplers.SAMPLERS`` runs under its name (dpmpp and unipc through their fused loops), any other as a
``samplers.SamplerSpec`` of its own config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, BaseOutput
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from worker.errors import CheckpointError
from worker.features.candles import CandleSeries
from worker.features.transform import FeatureSpec
from worker.model.checkpoint import (
    FORMAT_VERSION,
    LATER_MANIFEST_DEFAULTS,
    LEGACY_CALIBRATION_SAMPLER,
    CalibrationSampler,
    Checkpoint,
    DataManifest,
    DiffusionManifest,
    FeatureManifest,
    Manifest,
    _LaterKeys,
    build_checkpoint,
    check_tensors,
    load_checkpoint,
    save_checkpoint,
)
from worker.model.checkpoint import model_version as checkpoint_model_version
from worker.model.forecaster import Forecast, Forecaster
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.samplers import SAMPLERS, Sampler, SamplerSpec, make_scheduler
from worker.model.schedule import NoiseSchedule

PIPELINE_FORMAT_VERSION = 1
MODEL_INDEX = DiffusionPipeline.config_name  # model_index.json
SPEC_FILE = "feature_spec.json"
DENOISER = "denoiser"
SCHEDULER = "scheduler"
SCHEDULER_CONFIG = SchedulerMixin.config_name  # scheduler_config.json
DEFAULT_SAMPLER = "dpmpp"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Keys diffusers itself adds to the configs it writes.
_DIFFUSERS_PRIVATE_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
# Under ``trained_betas`` diffusers ignores these; a scheduler built ``from_config`` of another class
# may carry any value for them.
_IGNORED_UNDER_TRAINED_BETAS = frozenset({"beta_start", "beta_end", "beta_schedule"})
# Checked against the training schedule, before (and with a clearer message than) the sampler config.
_TRAINING_SCHEDULE_KEYS = frozenset({"trained_betas", "num_train_timesteps", "prediction_type"})
# The scheduler classes a pipeline directory may name: those of the validated samplers and the diffusers
# schedulers compatible with them (``from_config`` of one another: KarrasDiffusionSchedulers).
def _scheduler_classes() -> dict[str, type[Any]]:
    diffusers = importlib.import_module("diffusers")
    found: dict[str, type[Any]] = {s.scheduler_cls.__name__: s.scheduler_cls for s in SAMPLERS.values()}
    for spec in SAMPLERS.values():
        for name in getattr(spec.scheduler_cls, "_compatibles", []):
            cls = getattr(diffusers, name, None) if isinstance(name, str) else name
            if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
                found[cls.__name__] = cls
    return dict(sorted(found.items()))


SCHEDULER_CLASSES: dict[str, type[Any]] = _scheduler_classes()


# -- the denoiser as a diffusers model ---------------------------------------------------------------


class SSSDDenoiserModel(SSSDDenoiser, ModelMixin, ConfigMixin):
    """``SSSDDenoiser`` as a diffusers ``ModelMixin``: the same module tree and parameter names (it is a
    subclass), so v1 weights load unchanged; the config is exactly ``NetworkConfig``'s fields."""

    config_name = CONFIG_NAME  # type: ignore[assignment]

    # No defaults here: NetworkConfig owns them (build with ``from_network_config``).
    @register_to_config
    def __init__(self, *, bar_features: int, time_features: int, horizon: int, channels: int, state: int,
                 encoder_blocks: int, denoiser_blocks: int, step_embedding: int, dropout: float) -> None:
        SSSDDenoiser.__init__(self, NetworkConfig(
            bar_features=bar_features, time_features=time_features, horizon=horizon, channels=channels,
            state=state, encoder_blocks=encoder_blocks, denoiser_blocks=denoiser_blocks,
            step_embedding=step_embedding, dropout=dropout,
        ))

    @classmethod
    def from_network_config(cls, cfg: NetworkConfig) -> SSSDDenoiserModel:
        return cls(**cfg.to_dict())

    @property
    def network_config(self) -> NetworkConfig:
        return self.cfg

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike[str], safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        """diffusers' writer, safetensors only, one file (the loader reads exactly one)."""
        _refuse_pickle_output(safe_serialization)
        _refuse_kwargs("SSSDDenoiserModel.save_pretrained", kwargs, allowed={"is_main_process": True})
        super().save_pretrained(save_directory, safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *,  # type: ignore[override]
                        subfolder: str | None = None, **kwargs: Any) -> SSSDDenoiserModel:
        """Load a local directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), validated
        strictly; a path that is not a local directory is a ``CheckpointError`` (nothing is fetched)."""
        _refuse_kwargs("SSSDDenoiserModel.from_pretrained", kwargs, allowed=_LOCAL_LOAD_KWARGS)
        root = Path(pretrained_model_name_or_path)
        if subfolder:
            root = root / subfolder
        return _load_denoiser(root, expected_sha256=None)


# -- the feature spec --------------------------------------------------------------------------------


class ForecastSpec(_LaterKeys):
    """What the Forecaster needs besides weights and sampler: the v1 manifest's fields, less the network
    (``denoiser/config.json`` holds it) and the weights hash (recorded when saved)."""

    _later_defaults: ClassVar[dict[str, Any]] = LATER_MANIFEST_DEFAULTS

    model_version: str | None = None  # None for new weights: derived from them (``weights_model_version``)
    created_at: str
    diffusion: DiffusionManifest
    features: FeatureManifest
    data: DataManifest
    training: dict[str, Any]
    validation_metrics: dict[str, Any]
    calibration: dict[str, float] | None = None  # format 2: the per-horizon spread factors
    calibration_sampler: CalibrationSampler = LEGACY_CALIBRATION_SAMPLER  # what they were fitted with
    name: str | None = None  # the registry name it is shipped under, if any

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ForecastSpec:
        return cls(model_version=manifest.model_version, created_at=manifest.created_at,
                   diffusion=manifest.diffusion, features=manifest.features, data=manifest.data,
                   training=manifest.training, validation_metrics=manifest.validation_metrics,
                   calibration=manifest.calibration, calibration_sampler=manifest.calibration_sampler,
                   name=manifest.name)

    @property
    def window_bars(self) -> int:
        f = self.features
        return FeatureSpec(f.timeframe_ms, f.context_bars, f.vol_lookback).window_bars


class SpecFile(ForecastSpec):
    """``feature_spec.json``: every key required."""

    format_version: int
    model_version: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of denoiser/diffusion_pytorch_model.safetensors
    converted_from: dict[str, Any] | None  # provenance of a converted checkpoint, else null

    def forecast_spec(self) -> ForecastSpec:
        return ForecastSpec.model_validate(self.model_dump(include=set(ForecastSpec.model_fields)))


def weights_v1_sha256(model: torch.nn.Module) -> str:
    """The sha256 of the format-v1 weights file ``checkpoint.save_checkpoint`` would write for these
    weights, computed without writing it: the weights' identity, whatever the layout they are stored in."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(tensors, metadata={"format_version": str(FORMAT_VERSION)})
    return hashlib.sha256(blob).hexdigest()


def weights_model_version(model: SSSDDenoiserModel, spec: ForecastSpec) -> str:
    """The model_version ``save_checkpoint`` gives these weights with this spec: equal inputs, equal name."""
    digest = weights_v1_sha256(model)
    return _manifest(spec, model.network_config, weights_sha256=digest, model_version=None).model_version


# -- validation of the training schedule and the sampler ---------------------------------------------


def _schedule_of(spec: ForecastSpec) -> NoiseSchedule:
    d = spec.diffusion
    return NoiseSchedule(betas=tuple(d.betas), prediction_type=d.prediction_type, name=d.schedule)


def _config_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def sampler_name(scheduler: object, schedule: NoiseSchedule) -> Sampler:
    """What ``Forecaster`` runs for ``scheduler`` on this training schedule: the ``samplers.SAMPLERS`` name
    of a validated configuration (so dpmpp and unipc run their fused loops), else a ``SamplerSpec`` of its own config.

    Raises ``ValueError`` naming what differs from the training schedule (betas, number of training
    timesteps, prediction type): a scheduler off it would sample another model."""
    if not isinstance(scheduler, SchedulerMixin):
        raise ValueError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    cls_name = type(scheduler).__name__
    cfg = scheduler.config  # type: ignore[attr-defined]
    problems = []
    if cfg.get("num_train_timesteps") != schedule.num_train_timesteps:
        problems.append(f"num_train_timesteps={cfg.get('num_train_timesteps')!r}, trained with "
                        f"{schedule.num_train_timesteps}")
    betas = cfg.get("trained_betas")
    if betas is None:
        problems.append(f"trained_betas is not set, so it would build its own {cfg.get('beta_schedule')!r} "
                        f"schedule instead of the training one")
    else:
        got = [float(b) for b in betas]
        want = list(schedule.betas)
        if got != want:
            where = "length" if len(got) != len(want) else next(
                f"index {i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            problems.append(f"trained_betas differ from the training schedule ({where})")
    if cfg.get("prediction_type") != schedule.prediction_type:
        problems.append(f"prediction_type={cfg.get('prediction_type')!r}, trained with {schedule.prediction_type!r}")
    if problems:
        raise ValueError(f"{cls_name} disagrees with the training schedule: {'; '.join(problems)}. Build it from "
                         f"the pipeline's own config: {cls_name}.from_config(pipe.scheduler.config)")
    params = [p for p in inspect.signature(type(scheduler).__init__).parameters if p not in ("self", "kwargs")]
    own = {k: _config_value(cfg.get(k)) for k in params
           if k not in _IGNORED_UNDER_TRAINED_BETAS | _TRAINING_SCHEDULE_KEYS and k in cfg}
    for name, registered in SAMPLERS.items():  # dict order: a fused loop ("dpmpp", "unipc") before its reference
        if type(scheduler) is not registered.scheduler_cls:
            continue
        ref = make_scheduler(name, schedule).config  # type: ignore[attr-defined]
        if all(v == _config_value(ref.get(k)) for k, v in own.items()):
            return name
    # Any other configuration is served as configured: the training schedule is checked above, and the
    # generic loop of samplers.sample_paths runs any diffusers scheduler (not each tested against a reference).
    return SamplerSpec(type(scheduler), own, f"{cls_name} as configured on the pipeline")


# -- assembling what the Forecaster needs ------------------------------------------------------------


def _manifest(spec: ForecastSpec, net: NetworkConfig, *, weights_sha256: str, model_version: str | None) -> Manifest:
    """The format-2 manifest these parts amount to; ``model_version`` None: the one ``save_checkpoint``
    gives them (weights and everything else that changes a forecast). Raises ``ValueError``."""
    fields = {
        "format_version": FORMAT_VERSION, "model_version": model_version or "", "created_at": spec.created_at,
        "network": net.to_dict(), "diffusion": spec.diffusion, "features": spec.features, "data": spec.data,
        "training": spec.training, "validation_metrics": spec.validation_metrics, "weights_sha256": weights_sha256,
        "calibration": spec.calibration, "calibration_sampler": spec.calibration_sampler, "name": spec.name,
    }
    try:
        manifest = Manifest.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(f"spec: {_pydantic_errors(exc)}") from None
    if model_version is None:
        version = checkpoint_model_version(weights_sha256, manifest.model_dump(mode="json"))
        manifest = manifest.model_copy(update={"model_version": version})
    return manifest


# -- the pipeline ------------------------------------------------------------------------------------


@dataclass
class SSSDForecastPipelineOutput(BaseOutput):
    forecasts: dict[str, Forecast]


class SSSDForecastPipeline(DiffusionPipeline):
    """Denoiser + scheduler + feature spec; ``__call__`` forecasts exactly as ``Forecaster.forecast``."""

    denoiser: SSSDDenoiserModel
    scheduler: SchedulerMixin
    sampler: Sampler  # what the Forecaster runs for ``scheduler``: a SAMPLERS name or a SamplerSpec
    _checkpoint: Checkpoint
    _weights_digest: str

    def __init__(self, denoiser: SSSDDenoiserModel, scheduler: SchedulerMixin,
                 feature_spec: ForecastSpec | None = None) -> None:
        super().__init__()
        if feature_spec is None:  # optional in the signature only so diffusers does not take it for a module
            raise TypeError("SSSDForecastPipeline needs feature_spec (the features, normalisation and training "
                            "schedule the weights were trained with)")
        if not isinstance(feature_spec, ForecastSpec):
            raise TypeError(f"feature_spec must be a ForecastSpec, got {type(feature_spec).__name__}")
        self._forecasters: dict[str, Forecaster] = {}
        self.converted_from: dict[str, Any] | None = None  # provenance recorded in feature_spec.json
        self.feature_spec = feature_spec
        self.schedule = _schedule_of(feature_spec)
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    def __setattr__(self, name: str, value: Any) -> None:
        # Every way a component is set (register_modules, ``pipe.scheduler = ...``) is checked here,
        # so a pipeline never holds a scheduler off the training schedule or a denoiser off the spec.
        if name == SCHEDULER:
            sampler = sampler_name(value, self.schedule)
            super().__setattr__("sampler", sampler)
            self._forecasters = {}
        elif name == DENOISER:
            if not isinstance(value, SSSDDenoiserModel):
                raise TypeError(f"denoiser must be an SSSDDenoiserModel, got {type(value).__name__}")
            digest = weights_v1_sha256(value)
            # The spec names the weights it came with; a replacement denoiser is another model.
            named = self.feature_spec.model_version if DENOISER not in self.__dict__ else None
            manifest = _manifest(self.feature_spec, value.network_config, weights_sha256=digest, model_version=named)
            try:  # the one validator of both layouts (the tensors are the denoiser's own: loaded in place)
                checkpoint = build_checkpoint(manifest, dict(value.state_dict()), SPEC_FILE, weights_where=DENOISER,
                                              model=value, device=value.device)
            except CheckpointError as exc:
                raise ValueError(str(exc)) from None
            super().__setattr__("_checkpoint", checkpoint)
            super().__setattr__("_weights_digest", digest)
            self._forecasters = {}
        super().__setattr__(name, value)

    # -- what the Forecaster needs ---------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self._checkpoint.model_version

    def to_checkpoint(self) -> Checkpoint:
        """The objects ``Forecaster`` is built from (the denoiser's weights are shared, not copied)."""
        return self._checkpoint

    def forecaster(self, *, weekend_close: bool = True) -> Forecaster:
        """The ``Forecaster`` over this pipeline's weights, sampler and device (cached)."""
        device = self.device
        key = f"{device}|{weekend_close}"  # the cache is emptied whenever the scheduler or the denoiser changes
        fc = self._forecasters.get(key)
        if fc is None:
            fc = Forecaster(self._checkpoint, scheduler=self.sampler, device=device, weekend_close=weekend_close)
            self._forecasters[key] = fc
        return fc

    def __call__(
        self,
        candles_by_symbol: Mapping[str, CandleSeries],
        *,
        num_inference_steps: int | None = None,
        num_samples: int = 64,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        horizons: Sequence[int] | str | None = None,
        weekend_close: bool = True,
        return_dict: bool = True,
    ) -> SSSDForecastPipelineOutput | tuple[dict[str, Forecast]]:
        """Forecast the newest bar of every symbol, as ``Forecaster.forecast(..., seed=s)`` does.

        ``generator`` gives the base seed ``s`` through ``generator.initial_seed()``; its state is not
        consumed. Each symbol and bar draws from its own generator seeded from (s, symbol, bar open time),
        which is what keeps a forecast independent of the batch it is in; a list of generators (diffusers'
        one-per-sample convention) would break that and is refused. ``seed`` may be given instead.

        ``num_inference_steps`` defaults to the step count the checkpoint's calibration was fitted for (10
        for every calibration before that was recorded); sampling otherwise, or with another scheduler,
        warns (``Forecaster.forecast``). ``weekend_close``: as ``Forecaster``'s (horizons ending after
        the FX weekend close are left out)."""
        if self.denoiser.dtype != torch.float32:
            raise ValueError(f"the denoiser must be float32 (the Forecaster samples in float32), "
                             f"got {self.denoiser.dtype}")
        fc = self.forecaster(weekend_close=weekend_close)
        if num_inference_steps is None:
            num_inference_steps = self._checkpoint.manifest.calibration_sampler.steps
        forecasts = fc.forecast(  # warns if the setting is not the calibration's
            candles_by_symbol, horizons=horizons, num_samples=num_samples, num_steps=num_inference_steps,
            seed=_base_seed(generator, seed),
        )
        if not return_dict:
            return (forecasts,)
        return SSSDForecastPipelineOutput(forecasts=forecasts)

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike[str], safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        """diffusers' layout (``model_index.json``, ``denoiser/``, ``scheduler/``) plus ``feature_spec.json``,
        written last and pinning the weights by sha256. Safetensors only."""
        _refuse_pickle_output(safe_serialization)
        _refuse_kwargs("SSSDForecastPipeline.save_pretrained", kwargs, allowed={})
        out = Path(save_directory)
        if out.is_dir():
            _refuse_pickles(out)  # the directory would not load afterwards
        super().save_pretrained(out, safe_serialization=True)
        weights = out / DENOISER / SAFETENSORS_WEIGHTS_NAME
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        current = weights_v1_sha256(self.denoiser)
        # Weights changed in place since they were set (fine-tuning): they are another model.
        version = self.model_version if current == self._weights_digest else _manifest(
            self.feature_spec, self.denoiser.network_config, weights_sha256=current, model_version=None).model_version
        spec = SpecFile.model_validate({
            **self.feature_spec.model_dump(), "model_version": version, "format_version": PIPELINE_FORMAT_VERSION,
            "weights_sha256": digest, "converted_from": self.converted_from,
        })
        (out / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        **kwargs: Any) -> SSSDForecastPipeline:
        """Load a local pipeline directory, validating every file; a ``CheckpointError`` names what is
        wrong. Nothing is fetched from a network: a path that is not a local directory is an error."""
        _refuse_kwargs("SSSDForecastPipeline.from_pretrained", kwargs, allowed=_LOCAL_LOAD_KWARGS)
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: pipeline directory not found (only local directories load; "
                                  f"nothing is fetched from a network)")
        _refuse_pickles(root)
        scheduler_class = _read_model_index(root / MODEL_INDEX)
        spec_file = _read_spec(root / SPEC_FILE)
        spec = spec_file.forecast_spec()
        try:
            schedule = _schedule_of(spec)
        except ValueError as exc:
            raise CheckpointError(f"{root / SPEC_FILE}: diffusion: {exc}") from None
        denoiser = _load_denoiser(root / DENOISER, expected_sha256=spec_file.weights_sha256)
        scheduler = _load_scheduler(root / SCHEDULER / SCHEDULER_CONFIG, schedule, scheduler_class)
        try:
            pipe = cls(denoiser=denoiser, scheduler=scheduler, feature_spec=spec)
        except (ValueError, TypeError) as exc:  # the spec's cross-checks, and the spec against the denoiser
            raise CheckpointError(f"{root / SPEC_FILE}: {exc}") from None
        pipe.converted_from = spec_file.converted_from
        return pipe

    # -- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, scheduler: Sampler = DEFAULT_SAMPLER) -> SSSDForecastPipeline:
        """A pipeline over a loaded v1 checkpoint (weights copied into an ``SSSDDenoiserModel``)."""
        denoiser = SSSDDenoiserModel.from_network_config(checkpoint.network)
        denoiser.load_state_dict(checkpoint.model.state_dict(), strict=True)
        denoiser.eval()
        spec = ForecastSpec.from_manifest(checkpoint.manifest)
        pipe = cls(denoiser=denoiser, scheduler=make_scheduler(scheduler, checkpoint.schedule), feature_spec=spec)
        pipe.converted_from = {"format_version": checkpoint.manifest.format_version,
                               "weights_sha256": checkpoint.manifest.weights_sha256}
        return pipe


def _base_seed(generator: object, seed: int | None) -> int:
    if generator is not None and seed is not None:
        raise ValueError("give generator or seed, not both")
    if isinstance(generator, (list, tuple)):
        raise ValueError("pass one torch.Generator (its seed is the base seed): each symbol and bar gets its own "
                         "noise stream derived from it, so a forecast does not depend on its batch")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return int(generator.initial_seed())
    return 0 if seed is None else int(seed)


# -- converters --------------------------------------------------------------------------------------


def convert_checkpoint(checkpoint_dir: str | Path, pipeline_dir: str | Path, *,
                       scheduler: Sampler = DEFAULT_SAMPLER) -> SSSDForecastPipeline:
    """Checkpoint format v1 (``model.safetensors`` + ``manifest.json``, validated by ``load_checkpoint``)
    -> a pipeline directory. The model_version is kept; the tensors are the same."""
    pipe = SSSDForecastPipeline.from_checkpoint(load_checkpoint(checkpoint_dir), scheduler=scheduler)
    pipe.save_pretrained(pipeline_dir)
    return pipe


def load_pipeline_checkpoint(pipeline_dir: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """A pipeline directory -> the objects ``Forecaster`` is built from; ``checkpoint.load_checkpoint`` (so
    ``Forecaster.load``) calls this for a directory holding ``model_index.json``."""
    ckpt = SSSDForecastPipeline.from_pretrained(pipeline_dir).to_checkpoint()
    ckpt.model.to(device)
    return ckpt


def read_pipeline_manifest(pipeline_dir: str | Path) -> Manifest:
    """The manifest a pipeline directory amounts to, from its JSON files alone (no weights are read):
    for callers that need only the metadata, e.g. the timeframe it serves."""
    root = Path(pipeline_dir)
    _read_model_index(root / MODEL_INDEX)
    spec_file = _read_spec(root / SPEC_FILE)
    net = _network_config(root / DENOISER / CONFIG_NAME)
    try:
        return _manifest(spec_file.forecast_spec(), net, weights_sha256=spec_file.weights_sha256,
                         model_version=spec_file.model_version)
    except ValueError as exc:
        raise CheckpointError(f"{root / SPEC_FILE}: {exc}") from None


def write_checkpoint(pipe: SSSDForecastPipeline, checkpoint_dir: str | Path) -> Manifest:
    """A pipeline -> checkpoint format v1 through ``save_checkpoint``; for unchanged weights the files are
    the ones the pipeline was converted from (same bytes, same model_version)."""
    ckpt = pipe.to_checkpoint()
    fields = ckpt.manifest.model_dump(exclude={"format_version", "weights_sha256", "model_version"})
    return save_checkpoint(checkpoint_dir, pipe.denoiser, fields)


# -- reading and validating files --------------------------------------------------------------------

_LOCAL_LOAD_KWARGS: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "torch_dtype": torch.float32}


def _refuse_kwargs(where: str, kwargs: Mapping[str, Any], *, allowed: Mapping[str, Any]) -> None:
    bad = {k: v for k, v in kwargs.items() if k not in allowed or v != allowed[k]}
    if bad:
        accepted = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise TypeError(f"{where}: unsupported arguments {bad} (this loads and saves local safetensors "
                        f"directories only; accepted: {accepted})")


def _refuse_pickle_output(safe_serialization: bool) -> None:
    if not safe_serialization:
        raise ValueError("weights are written as safetensors only (safe_serialization=False would write a pickle)")


def _refuse_pickles(root: Path) -> None:
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise CheckpointError(f"{found[0]}: pickle-format file refused (a pipeline directory holds safetensors "
                              f"only; remove {', '.join(str(p.relative_to(root)) for p in found)})")


def _pydantic_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    return raw


def _check_keys(path: Path, raw: Mapping[str, Any], expected: set[str], optional: frozenset[str] = frozenset()) -> None:
    missing = sorted(expected - set(raw))
    unknown = sorted(set(raw) - expected - optional)
    if missing or unknown:
        raise CheckpointError(f"{path}: missing keys {missing}, unknown keys {unknown}")


def _read_model_index(path: Path) -> str:
    """Validates ``model_index.json``; returns the scheduler class it names."""
    raw = _read_json_object(path)
    _check_keys(path, raw, {"_class_name", "_diffusers_version", DENOISER, SCHEDULER},
                optional=frozenset({"_name_or_path"}))
    if raw["_class_name"] != SSSDForecastPipeline.__name__:
        raise CheckpointError(f"{path}: _class_name {raw['_class_name']!r} is not {SSSDForecastPipeline.__name__!r}")
    want = [SSSDDenoiserModel.__module__, SSSDDenoiserModel.__name__]
    if raw[DENOISER] != want:
        raise CheckpointError(f"{path}: denoiser {raw[DENOISER]!r}, expected {want!r}")
    sched = raw[SCHEDULER]
    if not (isinstance(sched, list) and len(sched) == 2 and sched[0] == "diffusers" and sched[1] in SCHEDULER_CLASSES):
        raise CheckpointError(f"{path}: scheduler {sched!r} is not one of "
                              f"{[['diffusers', n] for n in sorted(SCHEDULER_CLASSES)]}")
    return str(sched[1])


def _read_spec(path: Path) -> SpecFile:
    raw = _read_json_object(path)
    if raw.get("format_version") != PIPELINE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw.get('format_version')!r} is not supported "
                              f"(expected {PIPELINE_FORMAT_VERSION})")
    try:
        return SpecFile.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise CheckpointError(f"{path}: invalid feature spec: {_pydantic_errors(exc)}") from None


def _network_config(path: Path) -> NetworkConfig:
    raw = _read_json_object(path)
    types = typing.get_type_hints(NetworkConfig)
    fields = {f.name for f in dataclasses.fields(NetworkConfig)}
    _check_keys(path, raw, fields | {"_class_name", "_diffusers_version"}, optional=_DIFFUSERS_PRIVATE_KEYS)
    if raw["_class_name"] != SSSDDenoiserModel.__name__:
        raise CheckpointError(f"{path}: _class_name {raw['_class_name']!r} is not {SSSDDenoiserModel.__name__!r}")
    values: dict[str, Any] = {}
    for name in sorted(fields):
        v = raw[name]
        if types[name] is int:
            ok = type(v) is int and v > 0
        else:  # dropout, the one float: a probability
            ok = type(v) in (int, float) and math.isfinite(v) and 0 <= v < 1
        if not ok:
            raise CheckpointError(f"{path}: {name}={v!r} is not a valid {types[name].__name__}")
        values[name] = types[name](v)
    return NetworkConfig(**values)


def _load_denoiser(root: Path, *, expected_sha256: str | None) -> SSSDDenoiserModel:
    if not root.is_dir():
        raise CheckpointError(f"{root}: denoiser directory not found (only local directories load; nothing is "
                              f"fetched from a network)")
    _refuse_pickles(root)
    cfg = _network_config(root / CONFIG_NAME)
    path = root / SAFETENSORS_WEIGHTS_NAME
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights missing") from None
    if expected_sha256 is not None and hashlib.sha256(blob).hexdigest() != expected_sha256:
        raise CheckpointError(f"{path}: sha256 does not match {SPEC_FILE} (corrupt or swapped weights)")
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    model = SSSDDenoiserModel.from_network_config(cfg)
    check_tensors(model, tensors, path)
    return model.eval()


def _load_scheduler(path: Path, schedule: NoiseSchedule, expected_class: str) -> SchedulerMixin:
    raw = _read_json_object(path)
    name = raw.get("_class_name")
    cls = SCHEDULER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CheckpointError(f"{path}: _class_name {name!r} is not one of {sorted(SCHEDULER_CLASSES)}")
    if name != expected_class:
        raise CheckpointError(f"{path}: _class_name {name!r} but {MODEL_INDEX} names {expected_class!r}")
    # diffusers keeps the keys of compatible schedulers in a config built from_config of another class.
    diffusers = importlib.import_module("diffusers")
    known = set(_DIFFUSERS_PRIVATE_KEYS)
    for c in (cls, *getattr(cls, "_compatibles", [])):
        compatible = getattr(diffusers, c, None) if isinstance(c, str) else c
        if compatible is not None:
            known |= set(inspect.signature(compatible.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown} for {name}")
    try:
        scheduler = cls.from_config(raw)
        sampler_name(scheduler, schedule)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return scheduler


__all__ = [
    "PIPELINE_FORMAT_VERSION",
    "SPEC_FILE",
    "ForecastSpec",
    "SSSDDenoiserModel",
    "SSSDForecastPipeline",
    "SSSDForecastPipelineOutput",
    "SpecFile",
    "convert_checkpoint",
    "load_pipeline_checkpoint",
    "read_pipeline_manifest",
    "sampler_name",
    "weights_model_version",
    "weights_v1_sha256",
    "write_checkpoint",
]

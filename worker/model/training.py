"""Training: v-prediction (or epsilon) denoising on the exact schedule that is then saved.

Windows come from the same ``compute_features``/``build_contexts`` the worker uses. The training
split ends where validation begins; a training target path never reaches into the validation
period. Validation loss uses fixed noise and steps, so it is comparable between epochs and drives
early stopping.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from schemas.timeframe import format_duration, horizon_bars, parse_duration_ms
from worker.errors import TimeframeError
from worker.features.candles import CandleSeries, iso, to_ms
from worker.features.seasonal import fit_profile, fit_range_bias
from worker.features.transform import (
    ContextBatch,
    FeatureSpec,
    Normalization,
    build_contexts,
    compute_features,
    fit_normalization,
    future_targets,
    origin_ok,
    path_is_contiguous,
)
from worker.model.checkpoint import Manifest, load_checkpoint, save_checkpoint
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.noise import INITIAL_NOISE
from worker.model.schedule import NoiseSchedule, noisy_and_target

DEFAULT_HORIZONS = "15m,1h,4h"


@dataclass(frozen=True)
class TrainConfig:
    timeframe: str | None = None  # None: inferred from the data (median bar spacing)
    horizons: str | None = None  # None: DEFAULT_HORIZONS that are whole bars of the timeframe
    val_start: str = "2017-10-01"
    val_end: str | None = None  # exclusive; None: the end of the data
    context_bars: int = 64
    vol_lookback: int = 64
    vol_lambda: float = 0.94
    feature_set: str = "ohlc_ewma"  # "seasonal": the 5-minute model's scale-free inputs (features/seasonal.py)
    vol_estimator: str = "returns"  # seasonal set: "range" scales by a Parkinson-range EWMA instead
    initial_noise: str = "iid"  # "horizon_stratified": the sampler's noise (worker/model/noise.py)
    # Seasonal set: one intraday profile per New York UTC offset (summer, winter time), because
    # Tokyo's session moves an hour on the New York clock when New York changes its clocks.
    profile_by_offset: bool = False
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-3
    patience: int = 15
    timesteps: int = 200
    prediction_type: str = "v_prediction"
    channels: int = 48
    state: int = 32
    encoder_blocks: int = 2
    denoiser_blocks: int = 3
    dropout: float = 0.2
    seed: int = 0
    max_minutes: float = 14.0
    threads: int = 0
    train_stride: int = 1  # use every k-th training origin (neighbouring 5-minute windows overlap)
    val_windows: int = 0  # 0: every validation window; else this many, evenly spaced
    init_from: str | None = None  # fine-tune: start from this checkpoint's weights, features, normalisation
    calibrate: bool = False  # fit the per-horizon spread factor on the validation period
    calibration_windows: int = 1500
    calibration_samples: int = 128


# The shipped 5-minute model: ``signal-worker train --dataset tradetide --out DIR --threads 2`` uses
# this preset, and the same command reproduces the same model_version (docs/quality.md).
# Every value was chosen on the January-2024 validation period (see docs/quality.md).
PRESETS: dict[str, TrainConfig] = {
    "fx-5m": TrainConfig(
        timeframe="5m", horizons="15m,1h,4h", val_start="2024-01-01", val_end="2024-02-01",
        feature_set="seasonal", context_bars=96, vol_lookback=96, vol_lambda=0.92, vol_estimator="range",
        initial_noise="horizon_stratified", profile_by_offset=True,
        epochs=10, patience=3, max_minutes=600.0, train_stride=2, val_windows=3000, batch_size=256,
        channels=32, denoiser_blocks=2, encoder_blocks=2, dropout=0.1, lr=2e-3,
        calibrate=True, calibration_windows=3000, calibration_samples=64,
    ),
}


def infer_timeframe_ms(series: CandleSeries) -> int:
    return int(np.median(np.diff(series.open_time)))


def resolve_horizons(text: str | None, timeframe_ms: int) -> tuple[list[int], list[str]]:
    """Explicit horizons must all be whole bars (else a clear error); defaults that are not are dropped."""
    if text:
        hz = sorted({parse_duration_ms(h.strip()) for h in text.split(",") if h.strip()})
        for h in hz:
            try:
                horizon_bars(h, timeframe_ms)
            except ValueError as exc:
                raise TimeframeError(str(exc)) from None
        return hz, []
    hz, dropped = [], []
    for h in (parse_duration_ms(x) for x in DEFAULT_HORIZONS.split(",")):
        try:
            horizon_bars(h, timeframe_ms)
            hz.append(h)
        except ValueError:
            dropped.append(format_duration(h))
    return hz, dropped


def _origins(series: CandleSeries, spec: FeatureSpec, lo: int, hi: int, horizon: int) -> np.ndarray:
    """Origin indices in [lo, hi) whose context is valid and whose whole target path is < hi. The
    seasonal set also requires a path without gaps (no weekend, holiday or outage inside it)."""
    keep = [i for i in range(max(lo, spec.window_bars - 1), hi - horizon) if origin_ok(series, i, spec) is None]
    out = np.asarray(keep, dtype=np.int64)
    if spec.feature_set == "seasonal" and len(out):
        out = out[path_is_contiguous(series, out, horizon, spec.timeframe_ms)]
    return out


def validation_origins(series: CandleSeries, spec: FeatureSpec, horizon: int, start_ms: int,
                       end_ms: int | None = None) -> np.ndarray:
    """The origins training validates (and calibration is fitted) on, in ``[start_ms, end_ms)``."""
    lo = int(np.searchsorted(series.open_time, start_ms))
    hi = len(series) if end_ms is None else int(np.searchsorted(series.open_time, end_ms))
    return _origins(series, spec, lo, hi, horizon)


def _tensors(ctx: ContextBatch, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "feats": torch.from_numpy(ctx.bar_features),
        "ctime": torch.from_numpy(ctx.context_time),
        "ftime": torch.from_numpy(ctx.future_time),
        "y": torch.from_numpy(y.astype(np.float32)),
    }


def _loss(model: SSSDDenoiser, batch: dict[str, torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
          ab: torch.Tensor, prediction_type: Any) -> torch.Tensor:
    x_t, target = noisy_and_target(batch["y"], noise, t, ab, prediction_type)
    cond = model.encode(batch["feats"], batch["ctime"])
    pred = model.denoise(x_t, t.float(), cond, batch["ftime"])
    return torch.mean((pred - target) ** 2)


def _evenly(idx: np.ndarray, n: int) -> np.ndarray:
    if n <= 0 or len(idx) <= n:
        return idx
    return idx[np.linspace(0, len(idx) - 1, n).round().astype(np.int64)]


@dataclass
class _Split:
    series: CandleSeries
    train: np.ndarray
    val: np.ndarray


def _pooled_normalization(splits: dict[str, _Split], spec: FeatureSpec, horizon: int) -> Normalization:
    """Feature statistics as the model sees them, pooled over every series' training origins."""
    if len(splits) == 1:
        only = next(iter(splits.values()))
        return fit_normalization(only.series, only.train, spec, horizon)
    n_feat = len(spec.bar_feature_names)
    ident = Normalization(np.zeros(n_feat), np.ones(n_feat), 0.0, 1.0)
    flats = []
    for sp in splits.values():
        idx = _evenly(sp.train, 4000)
        ctx = build_contexts(sp.series, idx, spec, ident, horizon)
        flats.append(ctx.bar_features.reshape(-1, n_feat).astype(np.float64))
    flat = np.concatenate(flats)
    std = flat.std(axis=0)
    std[std < 1e-8] = 1.0
    if spec.feature_set != "seasonal":
        raise ValueError("training on several series needs the scale-free 'seasonal' feature set")
    return Normalization(flat.mean(axis=0), std, 0.0, 1.0)


def train(series: CandleSeries | Mapping[str, CandleSeries], cfg: TrainConfig, out_dir: str | Path, *,
          source: str = "", sha256: str = "", progress: bool = True, command: str | None = None,
          data_licence: str = "see the data source") -> Manifest:
    """Train (or fine-tune, ``cfg.init_from``) on one series or several (one model for all), and write
    ``out_dir`` in the pipeline layout with its model card (``command``: the command line that ran)."""
    if cfg.initial_noise not in INITIAL_NOISE:  # before hours of training, not when the manifest is written
        raise ValueError(f"initial_noise must be one of {list(INITIAL_NOISE)}, got {cfg.initial_noise!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    all_series = {"SERIES": series} if isinstance(series, CandleSeries) else dict(series)
    parent = load_checkpoint(cfg.init_from) if cfg.init_from else None
    first = next(iter(all_series.values()))
    timeframe_ms = parse_duration_ms(cfg.timeframe) if cfg.timeframe else infer_timeframe_ms(first)
    if parent is not None:
        if parent.timeframe_ms != timeframe_ms:
            raise TimeframeError(f"--init-from checkpoint was trained on {format_duration(parent.timeframe_ms)} "
                                 f"bars; the data has {format_duration(timeframe_ms)} bars")
        horizons = parent.horizons_ms
    else:
        horizons, dropped = resolve_horizons(cfg.horizons, timeframe_ms)
        if dropped:
            print(f"note: default horizons {', '.join(dropped)} are not whole {format_duration(timeframe_ms)} bars; "
                  f"training for {', '.join(format_duration(h) for h in horizons)}")
    horizon = horizon_bars(max(horizons), timeframe_ms)
    val_ms = to_ms(cfg.val_start)
    end_ms = to_ms(cfg.val_end) if cfg.val_end else None

    def cut(s: CandleSeries) -> tuple[int, int]:
        hi = len(s) if end_ms is None else int(np.searchsorted(s.open_time, end_ms))
        return int(np.searchsorted(s.open_time, val_ms)), hi

    if parent is not None:
        spec, norm = parent.spec, parent.norm
    else:
        profile = None
        range_bias = 1.0
        if cfg.feature_set == "seasonal":
            training_part = [s[: cut(s)[0]] for s in all_series.values()]
            profile = fit_profile(training_part, timeframe_ms, by_offset=cfg.profile_by_offset)
            if cfg.vol_estimator == "range":
                range_bias = fit_range_bias(training_part, profile)
        spec = FeatureSpec(timeframe_ms, cfg.context_bars, cfg.vol_lookback, cfg.vol_lambda,
                           feature_set=cfg.feature_set, profile=profile, vol_estimator=cfg.vol_estimator,
                           range_bias=range_bias)
    schedule = parent.schedule if parent is not None else NoiseSchedule.cosine(
        cfg.timesteps, prediction_type=cfg.prediction_type)  # type: ignore[arg-type]
    ab = schedule.alphas_cumprod()

    splits: dict[str, _Split] = {}
    for name, s in all_series.items():
        split, hi = cut(s)
        tr_idx = _origins(s, spec, 0, split, horizon)[:: max(1, cfg.train_stride)]
        va_idx = _origins(s, spec, split, hi, horizon)
        splits[name] = _Split(s, tr_idx, va_idx)
    n_train = sum(len(sp.train) for sp in splits.values())
    n_val = sum(len(sp.val) for sp in splits.values())
    if n_train < 100 or n_val < 20:
        raise ValueError(f"too little data: {n_train} training and {n_val} validation windows")
    if parent is None:
        norm = _pooled_normalization(splits, spec, horizon)

    def data(which: str) -> dict[str, torch.Tensor]:
        parts = []
        for sp in splits.values():
            idx = getattr(sp, which)
            if which == "val" and cfg.val_windows:
                idx = _evenly(idx, max(1, cfg.val_windows // len(splits)))
            if not len(idx):
                continue
            feats = compute_features(sp.series, spec)
            ctx = build_contexts(sp.series, idx, spec, norm, horizon, feats)
            y = (future_targets(sp.series, idx, horizon, feats[1], spec) - norm.target_mean) / norm.target_std
            parts.append(_tensors(ctx, y))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    tr, va = data("train"), data("val")
    n_train = len(tr["y"])
    if parent is not None:
        net_cfg = parent.network
    else:
        net_cfg = NetworkConfig(
            bar_features=len(spec.bar_feature_names), time_features=len(spec.time_feature_names), horizon=horizon,
            channels=cfg.channels, state=cfg.state, encoder_blocks=cfg.encoder_blocks,
            denoiser_blocks=cfg.denoiser_blocks, dropout=cfg.dropout,
        )
    model = SSSDDenoiser(net_cfg)
    if parent is not None:
        model.load_state_dict(parent.model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # Warm-up over 5 % of the steps. Short runs (a one-epoch fine-tune) get a warm-up phase of 1.5
    # steps instead: torch divides by the phase length, which 5 % of exactly 20 steps makes zero.
    pct_start = 0.05 if total_steps >= 40 or total_steps < 2 else 1.5 / total_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    # Fixed validation noise: 2 draws per window so the loss is stable between epochs.
    vgen = torch.Generator().manual_seed(cfg.seed + 1)
    reps = 2
    va_rep = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in va.items()}
    v_t = torch.randint(0, schedule.num_train_timesteps, (len(va_rep["y"]),), generator=vgen)
    v_noise = torch.randn(va_rep["y"].shape, generator=vgen)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(_loss(model, va_rep, v_t, v_noise, ab, schedule.prediction_type))

    initial_val = val_loss()  # the parent's (or the untrained network's) level
    best: tuple[float, int, dict[str, torch.Tensor]] = (initial_val, -1, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    started = time.monotonic()
    timesteps = schedule.num_train_timesteps
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.from_numpy(rng.permutation(n_train))
        total = 0.0
        for s_ in range(steps_per_epoch):
            idx_t = perm[s_ * cfg.batch_size : (s_ + 1) * cfg.batch_size]
            batch = {k: v[idx_t] for k, v in tr.items()}
            t = torch.randint(0, timesteps, (len(idx_t),))
            loss = _loss(model, batch, t, torch.randn_like(batch["y"]), ab, schedule.prediction_type)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx_t)
        val = val_loss()
        train_loss = total / n_train
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val, 5)})
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{best[0]:.4f}@{best[1]}")
        if epoch - best[1] >= cfg.patience:
            bar.write(f"early stop at epoch {epoch}: no improvement for {cfg.patience} epochs")
            break
        if (time.monotonic() - started) / 60 > cfg.max_minutes:
            bar.write(f"stopping at epoch {epoch}: time budget of {cfg.max_minutes} min reached")
            break
    bar.close()
    model.load_state_dict(best[2])
    model.eval()
    train_times = [int(sp.series.open_time[sp.train[i]]) for sp in splits.values() if len(sp.train) for i in (0, -1)]
    val_times = [int(sp.series.open_time[sp.val[i]]) for sp in splits.values() if len(sp.val) for i in (0, -1)]
    features: dict[str, Any] = {
        "timeframe_ms": timeframe_ms, "context_bars": spec.context_bars, "vol_lookback": spec.vol_lookback,
        "vol_lambda": spec.vol_lambda, "max_missing_fraction": spec.max_missing_fraction,
        "bar_features": list(spec.bar_feature_names), "feature_mean": [float(v) for v in norm.feature_mean],
        "feature_std": [float(v) for v in norm.feature_std], "target_mean": norm.target_mean,
        "target_std": norm.target_std, "horizons_ms": list(horizons), "horizon_bars": horizon,
    }
    if spec.feature_set != "ohlc_ewma":
        assert spec.profile is not None
        features.update(feature_set=spec.feature_set, profile=[float(v) for v in spec.profile.slots],
                        week_open_factor=float(spec.profile.week_open_factor),
                        profile_by_utc_offset={str(m): [float(v) for v in slots]
                                               for m, slots in spec.profile.by_offset} or None)
    # Keys added after checkpoints had shipped are written as they are; the manifest leaves out the
    # ones at their defaults (checkpoint._LaterKeys), so earlier recipes keep their model_version.
    features.update(vol_estimator=spec.vol_estimator,
                    range_bias=float(spec.range_bias) if spec.vol_estimator == "range" else None)
    fields: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "network": net_cfg.to_dict(),
        "diffusion": {"schedule": schedule.name, "prediction_type": schedule.prediction_type,
                      "betas": list(schedule.betas),
                      "initial_noise": parent.manifest.diffusion.initial_noise if parent is not None
                      else cfg.initial_noise},
        "features": features,
        "data": {
            "source": source, "sha256": sha256, "rows": sum(len(s) for s in all_series.values()),
            "train_period": (iso(min(train_times)), iso(max(train_times))),
            "validation_period": (iso(min(val_times)), iso(max(val_times))),
        },
        "training": {**asdict(cfg), "epochs_run": len(history), "best_epoch": best[1],
                     "train_windows": n_train, "validation_windows": len(va["y"]),
                     "series": sorted(all_series), "initial_val_loss": round(initial_val, 6),
                     "minutes": round((time.monotonic() - started) / 60, 2)},
        "validation_metrics": {"val_loss": round(best[0], 6), "initial_val_loss": round(initial_val, 6),
                               "history": history[-5:]},
    }
    # Written in the manifest layout first (calibration reads and writes it), then converted: the
    # conversion keeps the model_version, which save_checkpoint computed from the weights and the spec.
    parent_dir = Path(out_dir).parent
    stage = Path(tempfile.mkdtemp(prefix=".train-", dir=parent_dir if parent_dir.is_dir() else None))
    try:
        manifest = save_checkpoint(stage, model, fields)
        if cfg.calibrate:
            from worker.model.calibration import calibrate_checkpoint

            windows = {name: (sp.series, sp.val) for name, sp in splits.items()}
            manifest = calibrate_checkpoint(stage, windows, windows_total=cfg.calibration_windows,
                                            num_samples=cfg.calibration_samples, seed=cfg.seed)
        write_pipeline_output(stage, out_dir, command=command, data_licence=data_licence)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


# What a checkpoint directory may hold, in either layout: replaced when training writes into it.
_LAYOUT_ENTRIES = ("manifest.json", "model.safetensors", "model_index.json", "feature_spec.json", "denoiser",
                   "scheduler", "README.md")


def write_pipeline_output(manifest_dir: str | Path, out_dir: str | Path, *, command: str | None,
                          data_licence: str) -> None:
    """``out_dir`` := the pipeline layout of the manifest-layout checkpoint ``manifest_dir`` + its model card.
    Files of an earlier checkpoint there are replaced (no mixed directory); other files are left alone."""
    from worker.model.model_card import card_inputs_from_spec, write_model_card
    from worker.model.pipeline import SPEC_FILE, convert_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _LAYOUT_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    convert_checkpoint(manifest_dir, out)
    spec = json.loads((out / SPEC_FILE).read_text())
    write_model_card(out, card_inputs_from_spec(spec, licence="apache-2.0", data_licence=data_licence,
                                                training_command=command or "(not recorded: train() called from code)"))

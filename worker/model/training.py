"""Training: v-prediction (or epsilon) denoising on the exact schedule that is then saved.

Windows come from the same ``compute_features``/``build_contexts`` the worker uses. The training
split ends where validation begins; a training target path never reaches into the validation
period. Validation loss uses fixed noise and steps, so it is comparable between epochs and drives
early stopping.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from schemas.timeframe import format_duration, horizon_bars, parse_duration_ms
from worker.errors import TimeframeError
from worker.features.candles import CandleSeries, iso, to_ms
from worker.features.transform import (
    BAR_FEATURES,
    ContextBatch,
    FeatureSpec,
    Normalization,
    build_contexts,
    compute_features,
    fit_normalization,
    future_targets,
    origin_ok,
)
from worker.model.checkpoint import Manifest, save_checkpoint
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.schedule import NoiseSchedule, noisy_and_target

DEFAULT_HORIZONS = "15m,1h,4h"


@dataclass(frozen=True)
class TrainConfig:
    timeframe: str | None = None  # None: inferred from the data (median bar spacing)
    horizons: str | None = None  # None: DEFAULT_HORIZONS that are whole bars of the timeframe
    val_start: str = "2017-10-01"
    context_bars: int = 64
    vol_lookback: int = 64
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
    """Origin indices in [lo, hi) whose context is valid and whose whole target path is < hi."""
    keep = [i for i in range(max(lo, spec.window_bars - 1), hi - horizon) if origin_ok(series, i, spec) is None]
    return np.asarray(keep, dtype=np.int64)


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


def train(series: CandleSeries, cfg: TrainConfig, out_dir: str | Path, *, source: str = "", sha256: str = "",
          progress: bool = True) -> Manifest:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    timeframe_ms = parse_duration_ms(cfg.timeframe) if cfg.timeframe else infer_timeframe_ms(series)
    horizons, dropped = resolve_horizons(cfg.horizons, timeframe_ms)
    if dropped:
        print(f"note: default horizons {', '.join(dropped)} are not whole {format_duration(timeframe_ms)} bars; "
              f"training for {', '.join(format_duration(h) for h in horizons)}")
    horizon = horizon_bars(max(horizons), timeframe_ms)
    spec = FeatureSpec(timeframe_ms, cfg.context_bars, cfg.vol_lookback)
    schedule = NoiseSchedule.cosine(cfg.timesteps, prediction_type=cfg.prediction_type)  # type: ignore[arg-type]
    ab = schedule.alphas_cumprod()

    split = int(np.searchsorted(series.open_time, to_ms(cfg.val_start)))
    train_idx = _origins(series, spec, 0, split, horizon)
    val_idx = _origins(series, spec, split, len(series), horizon)
    if len(train_idx) < 100 or len(val_idx) < 20:
        raise ValueError(f"too little data: {len(train_idx)} training and {len(val_idx)} validation windows")
    norm0 = fit_normalization(series, train_idx, spec, horizon)
    feats = compute_features(series, spec)
    norm = Normalization(norm0.feature_mean, norm0.feature_std, norm0.target_mean, norm0.target_std)

    def data(idx: np.ndarray) -> dict[str, torch.Tensor]:
        ctx = build_contexts(series, idx, spec, norm, horizon, feats)
        y = (future_targets(series, idx, horizon, feats[1]) - norm.target_mean) / norm.target_std
        return _tensors(ctx, y)

    tr, va = data(train_idx), data(val_idx)
    net_cfg = NetworkConfig(
        bar_features=len(BAR_FEATURES), horizon=horizon, channels=cfg.channels, state=cfg.state,
        encoder_blocks=cfg.encoder_blocks, denoiser_blocks=cfg.denoiser_blocks, dropout=cfg.dropout,
    )
    model = SSSDDenoiser(net_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.05)
    # Fixed validation noise: 2 draws per window so the loss is stable between epochs.
    vgen = torch.Generator().manual_seed(cfg.seed + 1)
    reps = 2
    va_rep = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in va.items()}
    v_t = torch.randint(0, cfg.timesteps, (len(va_rep["y"]),), generator=vgen)
    v_noise = torch.randn(va_rep["y"].shape, generator=vgen)

    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, -1, {})
    history = []
    started = time.monotonic()
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.from_numpy(rng.permutation(len(train_idx)))
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            batch = {k: v[idx] for k, v in tr.items()}
            t = torch.randint(0, cfg.timesteps, (len(idx),))
            loss = _loss(model, batch, t, torch.randn_like(batch["y"]), ab, schedule.prediction_type)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            val = float(_loss(model, va_rep, v_t, v_noise, ab, schedule.prediction_type))
        train_loss = total / len(train_idx)
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
    fields: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "network": net_cfg.to_dict(),
        "diffusion": {"schedule": schedule.name, "prediction_type": schedule.prediction_type,
                      "betas": list(schedule.betas)},
        "features": {
            "timeframe_ms": timeframe_ms, "context_bars": spec.context_bars, "vol_lookback": spec.vol_lookback,
            "vol_lambda": spec.vol_lambda, "max_missing_fraction": spec.max_missing_fraction,
            "bar_features": list(BAR_FEATURES), "feature_mean": [float(v) for v in norm.feature_mean],
            "feature_std": [float(v) for v in norm.feature_std], "target_mean": norm.target_mean,
            "target_std": norm.target_std, "horizons_ms": horizons, "horizon_bars": horizon,
        },
        "data": {
            "source": source, "sha256": sha256, "rows": len(series),
            "train_period": (iso(int(series.open_time[train_idx[0]])), iso(int(series.open_time[train_idx[-1]]))),
            "validation_period": (iso(int(series.open_time[val_idx[0]])), iso(int(series.open_time[val_idx[-1]]))),
        },
        "training": {**asdict(cfg), "epochs_run": len(history), "best_epoch": best[1],
                     "train_windows": len(train_idx), "validation_windows": len(val_idx),
                     "minutes": round((time.monotonic() - started) / 60, 2)},
        "validation_metrics": {"val_loss": round(best[0], 6), "history": history[-5:]},
    }
    return save_checkpoint(out_dir, model, fields)

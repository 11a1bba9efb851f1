"""Spread calibration: one factor per horizon, fitted on the validation period, stored in the
checkpoint manifest (format 2) and applied by :meth:`Forecaster.sample` to the sampled paths, so the
backtest, ``evaluate`` and the live worker forecast with the same calibrated distribution.

The factor widens (> 1) or narrows each horizon's samples about their mean. It is chosen on the
validation windows as the one with the lowest mean pinball loss over the seven quantile levels among
those whose 90 % interval covers 89–91 % of the outcomes (or, if none does, the one whose coverage
is closest to 90 %). Nothing after the validation period is read.

The spread of the sampled paths depends a little on how they are sampled (a sampler at few steps
draws a slightly different distribution), so the factors are fitted under one sampling setting —
the scheduler and step count the checkpoint is meant to be served with, DPM-Solver++ at 10 steps
unless asked otherwise — recorded in the manifest as ``calibration_sampler``; a forecaster serving
another setting says so (:meth:`Forecaster.calibration_mismatch`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from worker.features.candles import CandleSeries
from worker.model.checkpoint import MANIFEST, WEIGHTS, CalibrationSampler, Manifest, load_checkpoint, model_version
from worker.model.forecaster import Forecaster, ForecastRequest
from worker.model.samplers import algorithm_of
from worker.model.summary import QUANTILE_LEVELS

FACTOR_GRID = np.round(np.arange(0.70, 1.601, 0.01), 2)
COVERAGE_BAND = (0.89, 0.91)


def fit_spread(samples: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """The factor for one horizon from (N, S) samples and (N,) outcomes, and what it achieves."""
    levels = np.asarray(QUANTILE_LEVELS)
    mean = samples.mean(axis=1, keepdims=True)
    q = np.quantile(samples, levels, axis=1).T  # (N, 7)
    best: tuple[float, float, float] | None = None
    rows = []
    for c in FACTOR_GRID:
        qc = mean + c * (q - mean)
        e = y[:, None] - qc
        pin = float(np.mean(np.maximum(levels * e, (levels - 1) * e)))
        cov = float(np.mean((qc[:, 0] <= y) & (y <= qc[:, -1])))
        rows.append((float(c), pin, cov))
    inside = [r for r in rows if COVERAGE_BAND[0] <= r[2] <= COVERAGE_BAND[1]]
    best = min(inside, key=lambda r: r[1]) if inside else min(rows, key=lambda r: abs(r[2] - 0.9))
    one = next(r for r in rows if r[0] == 1.0)
    return best[0], {"factor": best[0], "pinball": best[1], "coverage90": best[2],
                     "pinball_uncalibrated": one[1], "coverage90_uncalibrated": one[2], "n": len(y)}


def calibration_samples(fc: Forecaster, windows: Mapping[str, tuple[CandleSeries, np.ndarray]], *,
                        windows_total: int, num_samples: int, num_steps: int = 10,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated samples (N, S, K) and outcomes (N, K) at evenly spaced validation origins. An
    outcome of a horizon the forecaster does not serve from that origin (it ends after the weekend
    close, ``Forecaster.weekend_close``) is NaN: it is never published, and its path holds the
    weekend gap, which no sample has."""
    bars = fc.horizon_bars()
    per = max(1, windows_total // max(1, len(windows)))
    all_s, all_y = [], []
    for name, (series, origins) in windows.items():
        if not len(origins):
            continue
        idx = origins[np.linspace(0, len(origins) - 1, min(per, len(origins))).round().astype(np.int64)]
        idx = idx[idx + max(bars) < len(series)]
        logc = np.log(series.close)
        for start in range(0, len(idx), 64):
            chunk = idx[start : start + 64]
            reqs = [ForecastRequest(name, series[max(0, i + 1 - fc.window_bars) : i + 1]) for i in chunk]
            batch = fc.prepare(reqs)
            keep = np.array([j not in batch.rejected for j in range(len(chunk))])
            forecasts, samples = fc.run_with_samples(batch, num_samples=num_samples, num_steps=num_steps, seed=seed)
            if samples is None:
                continue
            kept = chunk[keep]
            y = np.stack([logc[kept + b] - logc[kept] for b in bars], axis=1)
            served = np.array([len(f.horizons) for f in forecasts])
            y[np.arange(len(bars))[None, :] >= served[:, None]] = np.nan
            all_s.append(samples)
            all_y.append(y)
    return np.concatenate(all_s), np.concatenate(all_y)


def calibrate_checkpoint(path: str | Path, windows: Mapping[str, tuple[CandleSeries, np.ndarray]], *,
                         out: str | Path | None = None, windows_total: int = 1500, num_samples: int = 128,
                         seed: int = 0, scheduler: str = "dpmpp", num_steps: int = 10,
                         command: str | None = None, weekend_close: bool = True) -> Manifest:
    """Fit the spread factors on ``windows`` (validation origins per series), sampling as the
    forecaster will serve them (``scheduler`` at ``num_steps`` steps, recorded as the manifest's
    ``calibration_sampler``), and write them into the checkpoint at ``out`` (default: in place). The
    weights are untouched; the model_version changes. ``command`` (as run) goes into a pipeline's model card.
    ``weekend_close`` as the forecaster's: with it (the default), each horizon is fitted on the
    origins that serve it."""
    sampler = CalibrationSampler(scheduler=algorithm_of(scheduler), steps=num_steps)  # refuses an unknown name
    src = Path(path)
    dst = Path(out) if out is not None else src
    if (src / "model_index.json").exists():
        return _calibrate_pipeline(src, dst, windows, windows_total=windows_total, num_samples=num_samples,
                                   seed=seed, sampler=sampler, command=command, weekend_close=weekend_close)
    ckpt = load_checkpoint(src)
    plain = Forecaster(ckpt.__class__(**{**ckpt.__dict__, "manifest": ckpt.manifest.model_copy(
        update={"calibration": None})}), scheduler=sampler.scheduler, device="cpu", weekend_close=weekend_close)
    samples, y = calibration_samples(plain, windows, windows_total=windows_total, num_samples=num_samples,
                                     num_steps=sampler.steps, seed=seed)
    factors: dict[str, float] = {}
    report: dict[str, dict[str, float]] = {}
    for k, h in enumerate(plain.horizons_ms):
        served = np.isfinite(y[:, k])
        if not served.any():
            raise ValueError(f"no calibration window serves the {h // 60_000}-minute horizon (every one ends after "
                             "the weekend close): give more validation windows, or --no-weekend-close")
        factor, info = fit_spread(samples[served, :, k], y[served, k])
        factors[str(h)] = factor
        report[str(h)] = info
    if dst != src:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / WEIGHTS, dst / WEIGHTS)
    raw = ckpt.manifest.model_dump(mode="json")
    raw["format_version"] = 2
    raw["calibration"] = factors
    raw["calibration_sampler"] = sampler.model_dump()
    raw["validation_metrics"] = {**raw["validation_metrics"], "calibration": report}
    raw["model_version"] = model_version(raw["weights_sha256"], raw)
    manifest = Manifest.model_validate({**raw, "data": {**raw["data"],
                                                        "train_period": tuple(raw["data"]["train_period"]),
                                                        "validation_period": tuple(raw["data"]["validation_period"])}})
    (dst / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def _calibrate_pipeline(src: Path, dst: Path, windows: Mapping[str, tuple[CandleSeries, np.ndarray]], *,
                        windows_total: int, num_samples: int, seed: int, sampler: CalibrationSampler,
                        command: str | None, weekend_close: bool) -> Manifest:
    """A pipeline-layout checkpoint: calibrated in the manifest layout in a staging folder (the one
    place calibration writes), then written back as a pipeline at ``dst`` with its model card kept
    (training command and licences; the validation table is dropped, it described the old version)."""
    import tempfile

    from worker.model.model_card import CARD_FILE, card_inputs_from_spec, read_model_card_metadata, write_model_card
    from worker.model.pipeline import SPEC_FILE, SSSDForecastPipeline, convert_checkpoint, write_checkpoint

    try:
        card = read_model_card_metadata(src / CARD_FILE)
    except FileNotFoundError:
        card = {}
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "manifest"
        write_checkpoint(SSSDForecastPipeline.from_pretrained(src), stage)
        manifest = calibrate_checkpoint(stage, windows, windows_total=windows_total, num_samples=num_samples,
                                        seed=seed, scheduler=sampler.scheduler, num_steps=sampler.steps,
                                        weekend_close=weekend_close)
        # The pipeline's own scheduler is the one the calibration was fitted for (diffusers users
        # load it and sample with it).
        convert_checkpoint(stage, dst, scheduler=sampler.scheduler)
    licences = [d.get("licence") for d in card.get("training_data", []) if isinstance(d, dict)]
    spec = json.loads((dst / SPEC_FILE).read_text())
    write_model_card(dst, card_inputs_from_spec(
        spec, licence=str(card.get("license", "apache-2.0")),
        data_licence=str(licences[0]) if licences else "unknown: add the data's licence",
        training_command=str(card.get("training_command", "(not recorded)")),
        calibration_command=command))
    return manifest

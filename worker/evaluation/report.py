"""``signal-worker evaluate`` and ``signal-worker compare-schedulers``: the numbers in docs/quality.md.

Both run the model through :func:`run_backtest` (the live worker's batched path) on a period the
model was not trained on, and score it against the same realisations as the baselines.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.timeframe import format_duration
from worker.evaluation.backtest import BacktestResult, realised_returns, run_backtest
from worker.features.candles import CandleSeries
from worker.features.seasonal import (
    SeasonalProfile,
    deseasonalised_variance,
    fit_profile,
    market_hour,
    market_time_ms,
    vol_returns,
)
from worker.features.transform import path_is_contiguous
from worker.model.forecaster import Forecaster, ForecastRequest, PreparedBatch
from worker.model.summary import QUANTILE_LEVELS
from worker.scoring.baselines import (
    BaselineForecast,
    ewma_normal,
    garch_t,
    rolling_normal,
    seasonal_ewma_normal,
)
from worker.scoring.rules import crps_samples, energy_distance, pinball_loss, summarise

TARGET_COVERAGE_90 = (0.87, 0.93)


def calibration_meta(forecaster: Forecaster, num_steps: int) -> dict[str, Any]:
    """What a report says of the spread calibration it was scored with: the sampler setting it was
    fitted under (None: uncalibrated) and, when the report's own setting differs, why that matters."""
    fitted = forecaster.checkpoint.manifest.fitted_sampler()
    return {"calibration_sampler": fitted.model_dump() if fitted else None,
            "calibration_mismatch": forecaster.calibration_mismatch(num_steps)}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _baselines(series: CandleSeries, origins: np.ndarray, bars: list[int]) -> dict[str, BaselineForecast]:
    """Baseline row t is the forecast after return t, whose origin close is bar t+1: row = origin - 1."""
    r = np.diff(np.log(series.close))
    rows = origins - 1
    return {
        "ewma_normal": ewma_normal(r, bars, lam=0.94).select(rows),
        "rolling_normal": rolling_normal(r, bars, window=100).select(rows),
        # Fitted on data before the first evaluated origin only: no look-ahead into the period.
        "garch_t": garch_t(r, bars, train_end_index=int(origins[0])).select(rows),
    }


def evaluate(
    forecaster: Forecaster,
    series: CandleSeries,
    origins: np.ndarray,
    *,
    num_samples: int,
    num_steps: int,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bt = run_backtest(forecaster, series, origins, num_samples=num_samples, num_steps=num_steps, seed=seed,
                      keep_samples=True, progress=progress)
    wall = time.perf_counter() - started
    assert bt.samples is not None
    bars = forecaster.horizon_bars()
    y = realised_returns(series, bt.origins, bars)
    base = _baselines(series, bt.origins, bars)
    served = forecaster.open_horizons(series.open_time[bt.origins], bars)  # none past the weekend close
    horizons: dict[str, Any] = {}
    for k, (h_ms, b) in enumerate(zip(forecaster.horizons_ms, bars, strict=True)):
        ok = np.isfinite(y[:, k]) & (served > k)
        for f in base.values():
            ok &= f.valid[:, k]
        yk = y[ok, k]
        entry: dict[str, Any] = {"bars": b, "n": int(ok.sum())}
        entry["model"] = summarise(yk, samples=bt.samples[ok, :, k], rng=seed)
        # The empirical CRPS of S samples overstates the forecast distribution's CRPS by about
        # E|X-X'|/(2S) (1.6 % at S=64); the "fair" estimator removes that Monte Carlo bias.
        entry["model"]["crps_fair"] = float(np.mean(crps_samples(bt.samples[ok, :, k], yk, fair=True)))
        for name, f in base.items():
            fk = f.select(np.flatnonzero(ok))
            entry[name] = summarise(
                yk, quantiles=fk.quantiles(QUANTILE_LEVELS)[:, k], crps=fk.crps(y[ok][:, :])[:, k],
                pit=fk.cdf(y[ok])[:, k],
            )
        cov90 = entry["model"]["coverage"]["90"]
        entry["targets"] = {
            "coverage90_in_87_93": bool(TARGET_COVERAGE_90[0] <= cov90 <= TARGET_COVERAGE_90[1]),
            "crps_vs_ewma": entry["model"]["crps"] / entry["ewma_normal"]["crps"],
            "crps_fair_vs_ewma": entry["model"]["crps_fair"] / entry["ewma_normal"]["crps"],
            "crps_not_worse_than_ewma": bool(entry["model"]["crps"] <= entry["ewma_normal"]["crps"]),
        }
        horizons[format_duration(h_ms)] = entry
        _plots(out, series, bt, k, h_ms, b, entry)
    report = {
        "model_version": forecaster.model_version,
        "scheduler": forecaster.scheduler,
        "steps": num_steps,
        **calibration_meta(forecaster, num_steps),
        "samples": num_samples,
        "seed": seed,
        "period": [_iso(series, int(bt.origins[0])), _iso(series, int(bt.origins[-1]))],
        "forecasts": len(bt.forecasts),
        "skipped": bt.skipped,
        "sampling_wall_s": round(wall, 2),
        "forecasts_per_s": round(bt.forecasts_per_s, 2),  # the backtest's own rate (prepare, sample, summarise)
        "machine": machine(),
        "horizons": horizons,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _iso(series: CandleSeries, i: int) -> str:
    return dt.datetime.fromtimestamp(series.open_time[i] / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


def _plots(out: Path, series: CandleSeries, bt: BacktestResult, k: int, h_ms: int, bars: int,
           entry: dict[str, Any], *, label: str | None = None, names: list[str] | None = None) -> None:
    from worker.evaluation.plots import calibration_plot, fan_chart

    label = label or format_duration(h_ms)
    last = slice(-min(240, len(bt.origins)), None)  # the last ~10 trading days at 1h: readable
    o = bt.origins[last]
    assert bt.samples is not None
    q = np.quantile(bt.samples[last, :, k], QUANTILE_LEVELS, axis=1).T
    closes = series.close[o]
    realised = np.array([series.close[i + bars] if i + bars < len(series) else np.nan for i in o])
    times = series.open_time[o].astype("datetime64[ms]")
    target_times = np.array([series.open_time[min(i + bars, len(series) - 1)] for i in o]).astype("datetime64[ms]")
    fan_chart(times, closes, closes[:, None] * np.exp(q), realised, out / f"fan_{label}.png",
              target_times=target_times, horizon_label=label, title=f"Forecast fan, {label} ahead")
    names = names or ["model", "ewma_normal", "rolling_normal", "garch_t"]
    calibration_plot({n: entry[n]["pit_histogram"] for n in names}, {n: entry[n]["coverage"] for n in names},
                     out / f"calibration_{label}.png", title=f"Calibration, {label} ahead")


def compare_schedulers(
    forecaster: Forecaster,
    series: CandleSeries,
    origins: np.ndarray,
    *,
    schedulers: Sequence[str] = ("dpmpp", "unipc", "ddim", "euler", "kdpm2"),
    steps: Sequence[int] = (5, 10, 20, 50),
    num_samples: int = 64,
    seed: int = 0,
    timing_symbols: int = 1,
    repeats: int = 5,
    out_dir: str | Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each scheduler × steps: NFE, median wall time for one batch, CRPS against realisations and
    energy distance to the reference sampler's samples of the same origins."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bars = forecaster.horizon_bars()
    total = forecaster.checkpoint.schedule.num_train_timesteps
    # The reference runs twice with different seeds: how far apart two draws of the *same* sampler
    # land is the Monte Carlo floor against which the other rows' distances are read.
    configs = [("reference", "reference", total, seed), ("reference", "reference_reseeded", total, seed + 1)]
    configs += [(s, s, n, seed) for s in schedulers for n in steps]
    ref_samples: np.ndarray | None = None
    rows: list[dict[str, Any]] = []
    for name, label, n, run_seed in configs:
        fc = forecaster.with_scheduler(name)
        bt = run_backtest(fc, series, origins, num_samples=num_samples, num_steps=n, seed=run_seed,
                          keep_samples=True, progress=False)
        assert bt.samples is not None
        y = realised_returns(series, bt.origins, bars)
        ok = np.isfinite(y).all(axis=1) & (fc.open_horizons(series.open_time[bt.origins], bars) == len(bars))
        crps = float(np.mean([crps_samples(bt.samples[ok, :, k], y[ok, k]).mean() for k in range(len(bars))]))
        if ref_samples is None:
            ref_samples = bt.samples
        energy = float(np.mean(energy_distance(bt.samples, ref_samples)))
        if label == "reference_reseeded":
            wall_ms, nfe = rows[0]["wall_ms"], rows[0]["nfe"]
        else:
            wall_ms, nfe = _time_batch(fc, series, bt.origins[:timing_symbols], num_samples, n, seed, repeats)
        row = {"scheduler": label, "steps": nfe if name == "reference" else n, "nfe": nfe,
               "wall_ms": round(wall_ms, 3), "timed_symbols": len(bt.origins[:timing_symbols]),
               "crps": crps, "energy_to_reference": energy,
               "reference": name == "reference", "seed": run_seed}
        rows.append(row)
        if progress:
            print(f"{label:18s} steps={row['steps']:4d} nfe={nfe:4d} wall_ms={wall_ms:9.2f} crps={crps:.6e} "
                  f"energy={energy:.3e}", flush=True)
    ref_crps = rows[0]["crps"]
    for row in rows:
        row["crps_vs_reference"] = row["crps"] / ref_crps - 1.0
    return rows


def time_run(fc: Forecaster, batch: PreparedBatch, *, num_samples: int, steps: int, seed: int,
             repeats: int) -> tuple[list[float], int]:
    """Wall times (ms) of ``repeats`` runs of one prepared batch after a warm-up run, synchronised on
    GPU so queued kernels are counted; and the NFE each run made."""
    times: list[float] = []
    nfe = 0
    for r in range(repeats + 1):
        if fc.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fc.run(batch, num_samples=num_samples, num_steps=steps, seed=seed)
        if fc.device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append((time.perf_counter() - t0) * 1000)
        nfe = out[0].nfe
    return times, nfe


def _time_batch(fc: Forecaster, series: CandleSeries, origins: np.ndarray, num_samples: int, steps: int,
                seed: int, repeats: int) -> tuple[float, int]:
    window = fc.window_bars
    batch = fc.prepare([ForecastRequest(f"S{j}", series[max(0, i + 1 - window) : i + 1])
                        for j, i in enumerate(origins)])
    times, nfe = time_run(fc, batch, num_samples=num_samples, steps=steps, seed=seed, repeats=repeats)
    return statistics.median(times), nfe


# ------------------------------------------------------------------------------ several series
BOOTSTRAP_DRAWS = 1000
PINBALL_TARGET = 0.97  # pooled pinball loss <= 0.97 x seasonal EWMA
COVERAGE_TARGET = (0.88, 0.92)
HOUR_FLOOR = 0.80
# The seasonal-EWMA baseline uses the checkpoint's own EWMA where the model scales by that same
# returns EWMA; a model scaled by another estimator (the range EWMA of fx-5m) is compared with the
# baseline as chosen on the 5-minute validation month: lambda 0.96 over 96 bars (0.94 / 0.96 / 0.98 tried).
SEASONAL_EWMA_LOOKBACK = 96
SEASONAL_EWMA_LAMBDA = 0.96


def seasonal_baselines(series: CandleSeries, origins: np.ndarray, bars: list[int], profile: SeasonalProfile,
                       lookback: int, lam: float, garch_train_end: int,
                       range_ewma: tuple[int, float, float] | None = None) -> dict[str, BaselineForecast]:
    """Baselines for ``origins`` (rows aligned with them): seasonal EWMA, GARCH(1,1)-t on the
    deseasonalised returns (fitted on bars before ``garch_train_end`` only), plain EWMA and GARCH-t.
    ``range_ewma`` (lookback, lambda, bias): also the seasonal *range* EWMA as a Normal with exact
    quantiles — the distribution an untrained range-scaled model (fx-5m) samples, so the report shows
    what the network and the sampling add to it.

    The seasonal EWMA and GARCH baselines use the profile on one New York clock (``profile.pooled()``,
    the classic Andersen–Bollerslev profile), so every model is measured against the same yardstick;
    the range EWMA uses the model's own profile, per season where it has one."""
    tf = profile.timeframe_ms
    horizon = max(bars)
    model_profile, profile = profile, profile.pooled()
    s, var = deseasonalised_variance(series, profile, lookback, lam)
    steps = tf * np.arange(1, horizon + 1)
    future_o = (series.open_time[origins][:, None] + steps[None, :]).ravel()
    mult_o = profile.scale(future_o).reshape(len(origins), -1)
    out = {"seasonal_ewma": seasonal_ewma_normal(var[origins], mult_o, bars, {"lam": lam, "lookback": lookback})}
    u = vol_returns(series, tf) / s
    u_r = np.nan_to_num(u[1:], nan=0.0)  # row t: after u[t + 1], i.e. the origin is bar t + 1
    mult_all = profile.scale((series.open_time[1:][:, None] + steps[None, :]).ravel()).reshape(len(u_r), -1)
    rows = origins - 1
    out["seasonal_garch_t"] = garch_t(u_r, bars, train_end_index=garch_train_end, multipliers=mult_all).select(rows)
    r = np.diff(np.log(series.close))
    out["ewma_normal"] = ewma_normal(r, bars, lam=0.94).select(rows)
    out["garch_t"] = garch_t(r, bars, train_end_index=garch_train_end).select(rows)
    if range_ewma is not None:
        r_lookback, r_lam, bias = range_ewma
        _, rvar = deseasonalised_variance(series, model_profile, r_lookback, r_lam, estimator="range",
                                          range_bias=bias)
        out["seasonal_range_ewma"] = seasonal_ewma_normal(
            rvar[origins], model_profile.scale(future_o).reshape(len(origins), -1), bars,
            {"lam": r_lam, "lookback": r_lookback, "range_bias": bias})
    return out


def row_pinball(quantiles: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pinball loss of each row (N, Q quantiles at the contract's levels), averaged over the levels."""
    out: np.ndarray = pinball_loss(quantiles, QUANTILE_LEVELS, y).mean(axis=1)
    return out


def day_block_ratio(model: np.ndarray, base: np.ndarray, days: np.ndarray, *, seed: int = 0,
                    draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """Ratio of mean losses and its 90 % day-block bootstrap interval: whole days (New York
    trading days, all pairs of a day together) are resampled, because an event day moves every
    forecast of that day at once."""
    uniq, inv = np.unique(days, return_inverse=True)
    dm = np.bincount(inv, weights=model, minlength=len(uniq))
    db = np.bincount(inv, weights=base, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=draws)
    ratios = (w @ dm) / (w @ db)
    lo, hi = np.quantile(ratios, [0.05, 0.95])
    return {"ratio": float(model.sum() / base.sum()), "ci90": [float(lo), float(hi)], "days": len(uniq)}


def evaluate_pairs(
    forecaster: Forecaster,
    series_by_symbol: Mapping[str, CandleSeries],
    origins_by_symbol: Mapping[str, np.ndarray],
    *,
    num_samples: int,
    num_steps: int,
    seed: int,
    out_dir: str | Path,
    garch_train_end_ms: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Model and baselines on the same origins of several series: per pair and pooled, per horizon,
    CRPS, pinball, coverage, PIT, model/baseline ratios with day-block bootstrap intervals, coverage
    by New York hour, fan charts. Origins whose path crosses a gap (weekend, holiday) are left out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = forecaster.checkpoint.spec
    bars = forecaster.horizon_bars()
    labels = [format_duration(h) for h in forecaster.horizons_ms]
    horizon = max(bars)
    started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, int] = {}
    for sym, series in series_by_symbol.items():
        origins = np.asarray(origins_by_symbol[sym], dtype=np.int64)
        origins = origins[path_is_contiguous(series, origins, horizon, spec.timeframe_ms)]
        bt = run_backtest(forecaster, series, origins, symbol=sym, num_samples=num_samples, num_steps=num_steps,
                          seed=seed, keep_samples=True, progress=progress)
        for k, v in bt.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        assert bt.samples is not None
        profile = spec.profile or fit_profile([series[: int(np.searchsorted(series.open_time, garch_train_end_ms))]],
                                              spec.timeframe_ms)
        train_end = max(int(np.searchsorted(series.open_time, garch_train_end_ms)) - 1, 250)
        lookback, lam = ((spec.vol_lookback, spec.vol_lambda) if spec.vol_estimator == "returns"
                         else (SEASONAL_EWMA_LOOKBACK, SEASONAL_EWMA_LAMBDA))
        base = seasonal_baselines(series, bt.origins, bars, profile, lookback, lam, train_end,
                                  range_ewma=None if spec.vol_estimator == "returns"
                                  else (spec.vol_lookback, spec.vol_lambda, spec.range_bias))
        y = realised_returns(series, bt.origins, bars)
        t = series.open_time[bt.origins]
        rows[sym] = {"bt": bt, "y": y, "base": base, "day": market_time_ms(t) // 86_400_000, "hour": market_hour(t)}
    wall = time.perf_counter() - started
    names = ["model", *next(iter(rows.values()))["base"]]

    def score(symbols: list[str], k: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        ys, days, hours = [], [], []
        samples: list[np.ndarray] = []
        q: dict[str, list[np.ndarray]] = {n: [] for n in names[1:]}
        crps: dict[str, list[np.ndarray]] = {n: [] for n in names[1:]}
        pit: dict[str, list[np.ndarray]] = {n: [] for n in names[1:]}
        for sym in symbols:
            r = rows[sym]
            ok = np.isfinite(r["y"][:, k])
            for f in r["base"].values():
                ok &= f.valid[:, k]
            ys.append(r["y"][ok, k])
            days.append(r["day"][ok])
            hours.append(r["hour"][ok])
            samples.append(r["bt"].samples[ok, :, k])
            for n, f in r["base"].items():
                fk = f.select(np.flatnonzero(ok))
                yk = r["y"][ok]
                q[n].append(fk.quantiles(QUANTILE_LEVELS)[:, k])
                crps[n].append(fk.crps(yk)[:, k])
                pit[n].append(fk.cdf(yk)[:, k])
        yk = np.concatenate(ys)
        sk = np.concatenate(samples)
        entry: dict[str, Any] = {"bars": bars[k], "n": len(yk), "model": summarise(yk, samples=sk, rng=seed)}
        losses = {"model": row_pinball(np.quantile(sk, QUANTILE_LEVELS, axis=1).T, yk)}
        crps_rows = {"model": crps_samples(sk, yk)}
        qm = np.quantile(sk, QUANTILE_LEVELS, axis=1).T
        hits = {"model": (qm[:, 0] <= yk) & (yk <= qm[:, -1])}
        for n in names[1:]:
            qn = np.concatenate(q[n])
            entry[n] = summarise(yk, quantiles=qn, crps=np.concatenate(crps[n]), pit=np.concatenate(pit[n]))
            losses[n] = row_pinball(qn, yk)
            crps_rows[n] = np.concatenate(crps[n])
            hits[n] = (qn[:, 0] <= yk) & (yk <= qn[:, -1])
        d = np.concatenate(days)
        entry["ratios"] = {
            n: {"pinball": day_block_ratio(losses["model"], losses[n], d, seed=seed),
                "crps": day_block_ratio(crps_rows["model"], crps_rows[n], d, seed=seed)}
            for n in names[1:]
        }
        h = np.concatenate(hours)
        entry["coverage90_by_hour"] = {
            n: [float(hits[n][h == hr].mean()) if (h == hr).any() else None for hr in range(24)]
            for n in ("model", "seasonal_ewma")
        }
        return entry, {"y": yk, "samples": sk}

    pairs: dict[str, Any] = {sym: {} for sym in rows}
    pooled: dict[str, Any] = {}
    for k_, lab in enumerate(labels):
        for sym in rows:
            pairs[sym][lab], _ = score([sym], k_)
        pooled[lab], _ = score(list(rows), k_)
    targets = {}
    for label, e in pooled.items():
        cov = e["model"]["coverage"]["90"]
        by_hour = [c for c in e["coverage90_by_hour"]["model"] if c is not None]
        pin = e["ratios"]["seasonal_ewma"]["pinball"]
        targets[label] = {
            "pinball_vs_seasonal_ewma": pin["ratio"], "pinball_vs_seasonal_ewma_ci90": pin["ci90"],
            "pinball_met": bool(pin["ratio"] <= PINBALL_TARGET),
            "coverage90": cov, "coverage90_met": bool(COVERAGE_TARGET[0] <= cov <= COVERAGE_TARGET[1]),
            "lowest_hour_coverage90": min(by_hour) if by_hour else None,
            "hours_met": bool(by_hour and min(by_hour) >= HOUR_FLOOR),
        }
    first = rows[next(iter(rows))]
    report = {
        "model_version": forecaster.model_version, "scheduler": forecaster.scheduler, "steps": num_steps,
        **calibration_meta(forecaster, num_steps),
        "samples": num_samples, "seed": seed, "symbols": list(rows),
        "period": [_iso(series_by_symbol[next(iter(rows))], int(first["bt"].origins[0])),
                   _iso(series_by_symbol[next(iter(rows))], int(first["bt"].origins[-1]))],
        "forecasts": int(sum(len(r["bt"].forecasts) for r in rows.values())), "skipped": skipped,
        "sampling_wall_s": round(wall, 2),
        # the backtests' own rate (prepare, sample, summarise), without the baselines' time
        "forecasts_per_s": round(sum(len(r["bt"].forecasts) for r in rows.values())
                                 / max(sum(r["bt"].wall_s for r in rows.values()), 1e-9), 2),
        "machine": machine(), "targets": targets,
        "pooled": pooled, "pairs": pairs, "horizons": pooled,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    _pair_plots(out, series_by_symbol, rows, bars, labels, pooled)
    return report


def _pair_plots(out: Path, series_by_symbol: Mapping[str, CandleSeries], rows: dict[str, dict[str, Any]],
                bars: list[int], labels: list[str], pooled: dict[str, Any]) -> None:
    from worker.evaluation.plots import coverage_by_hour_plot

    sym = next(iter(rows))
    for k, label in enumerate(labels):
        _plots(out, series_by_symbol[sym], rows[sym]["bt"], k, 0, bars[k], pooled[label], label=label,
               names=["model", "seasonal_ewma", "seasonal_garch_t", "ewma_normal", "garch_t"])
    coverage_by_hour_plot({label: pooled[label]["coverage90_by_hour"] for label in labels},
                          out / "coverage_by_hour.png", title="90 % interval coverage by New York hour (pooled)")

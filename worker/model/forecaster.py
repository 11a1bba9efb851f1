"""The Python API researchers, the CLI, the backtest and the live worker all use.

    fc = Forecaster.load()                       # the shipped checkpoint, DPM-Solver++
    out = fc.forecast({"EURUSD": candles}, num_samples=64, num_steps=10, seed=7)
    fc.with_scheduler("unipc").forecast(...)     # same weights, another sampler

A batch is prepared on the host (features, contexts: ``prepare``) and then run on the device
(context encoding, sampling, statistics: ``run``), so a service can prepare the next batch while the
previous one computes, and give each batch its own CUDA stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from schemas.forecast import MIN_SAMPLES
from schemas.timeframe import format_duration, horizon_bars, parse_duration_ms, parse_horizons
from worker.errors import InsufficientHistory, InvalidCandles, TimeframeError
from worker.features.candles import CandleSeries, iso
from worker.features.seasonal import bars_before_close
from worker.features.transform import ContextBatch, build_contexts, explain_origin, origin_ok
from worker.model.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from worker.model.s4d import refresh_kernel_caches
from worker.model.samplers import SAMPLERS, Sampler, algorithm_of, resolve_sampler, sample_paths
from worker.model.summary import HorizonStats, cumulative_returns, summarise


def noise_seed(seed: int, symbol: str, open_time: int) -> int:
    """One seed per symbol and bar, independent of batch composition and process."""
    digest = hashlib.blake2b(f"{seed}:{symbol}:{open_time}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


@dataclass(frozen=True)
class Forecast:
    symbol: str
    open_time: int
    close: float
    horizons: tuple[HorizonStats, ...]
    scheduler: str
    steps: int
    nfe: int
    samples: int
    seed: int
    model_version: str


@dataclass(frozen=True)
class ForecastRequest:
    symbol: str
    candles: CandleSeries  # the forecast origin is the last candle


@dataclass(frozen=True)
class PreparedBatch:
    requests: tuple[ForecastRequest, ...]
    contexts: ContextBatch | None
    rejected: dict[int, InsufficientHistory] = field(default_factory=dict)  # index into the input -> why


def check_sampling(num_samples: int, num_steps: int) -> None:
    """A clear error for a sample or step count no sampling call can use (every path goes through here)."""
    for name, value, low, why in (("num_samples", num_samples, MIN_SAMPLES, " (a std and quantiles need two paths)"),
                                  ("num_steps", num_steps, 1, "")):
        try:
            whole = operator.index(value)  # ints and numpy integers, not floats or bools
        except TypeError:
            whole = None
        if whole is None or isinstance(value, bool) or whole < low:
            raise ValueError(f"{name} must be a whole number >= {low}{why}, got {value!r}")


class Forecaster:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        scheduler: Sampler = "dpmpp",
        device: str | torch.device = "auto",
        horizons: Sequence[int] | None = None,
        timeframe_ms: int | None = None,
        allow_timeframe_mismatch: bool = False,
        max_missing_fraction: float | None = None,
        cuda_graphs: bool = False,
        weekend_close: bool = True,
    ) -> None:
        # ``scheduler`` is the label forecasts and reports carry; ``sampler`` is what is run (a name, or
        # the SamplerSpec of a scheduler configured on the training schedule, e.g. by the pipeline).
        self.scheduler, sampler_spec = resolve_sampler(scheduler)
        self.sampler: Sampler = self.scheduler if self.scheduler in SAMPLERS else sampler_spec
        self.checkpoint = checkpoint
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        trained = checkpoint.spec.timeframe_ms
        self.timeframe_ms = timeframe_ms or trained
        if self.timeframe_ms != trained and not allow_timeframe_mismatch:
            raise TimeframeError(
                f"checkpoint was trained on {format_duration(trained)} bars; refusing to serve "
                f"{format_duration(self.timeframe_ms)} (set allow_timeframe_mismatch to override)"
            )
        spec = replace(checkpoint.spec, timeframe_ms=self.timeframe_ms)
        if max_missing_fraction is not None:  # how gappy a window may be is a serving decision
            spec = replace(spec, max_missing_fraction=max_missing_fraction)
        if spec != checkpoint.spec:
            self.checkpoint = replace(checkpoint, spec=spec)
        if horizons is None and self.timeframe_ms != trained:
            # Served on another timeframe (allowed explicitly): the trained horizons are bar counts;
            # label them by what they are on this timeframe, never by the trained durations.
            horizons = [h // trained * self.timeframe_ms for h in checkpoint.horizons_ms]
        self.horizons_ms = self._check_horizons(horizons or checkpoint.horizons_ms)
        self._pinned: dict[tuple[int, str], torch.Tensor] = {}
        # On CUDA a fused sampler's whole loop replays as one captured graph per (stream, batch-size
        # bucket, steps) (worker/model/graphs.py): ~400 small launches become one. Off by default
        # until `make gpu-check` has passed on a device (it has not yet: docs/benchmarks.md).
        self.cuda_graphs = cuda_graphs
        # A horizon whose path would run past the FX weekend close (Friday 17:00 New York) is not
        # forecast: no training path crossed it, the weekend gap (several times a bar's move) is in
        # no sample, and the future bars' times and seasonal scale would be Saturday's. Off for a
        # feed that trades through the weekend.
        self.weekend_close = weekend_close
        checkpoint.model.to(self.device).eval()

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        scheduler: Sampler = "dpmpp",
        device: str = "auto",
        horizons: Sequence[int] | str | None = None,
        timeframe: str | None = None,
        allow_timeframe_mismatch: bool = False,
        max_missing_fraction: float | None = None,
        cuda_graphs: bool = False,
        weekend_close: bool = True,
    ) -> Forecaster:
        """Load a checkpoint: a registered name (``"fx-5m"``, the default; ``"eurusd-1h"``) or a
        directory: a pipeline directory (``model_index.json``, see worker/model/pipeline.py) or a format-1/2
        manifest directory. ``horizons`` as durations (``"15m,1h"``, bare numbers are minutes) or ms.
        ``weekend_close``: leave out horizons that end after the FX weekend close (see ``open_horizons``)."""
        ckpt = load_checkpoint(path or DEFAULT_CHECKPOINT)
        if isinstance(horizons, str):
            horizons = parse_horizons(horizons)
        return cls(
            ckpt,
            scheduler=scheduler,
            device=device,
            horizons=horizons,
            timeframe_ms=parse_duration_ms(timeframe) if timeframe else None,
            allow_timeframe_mismatch=allow_timeframe_mismatch,
            max_missing_fraction=max_missing_fraction,
            cuda_graphs=cuda_graphs,
            weekend_close=weekend_close,
        )

    def with_scheduler(self, scheduler: Sampler) -> Forecaster:
        """Same weights (shared, not copied), another sampler."""
        return Forecaster(
            self.checkpoint,
            scheduler=scheduler,
            device=self.device,
            horizons=self.horizons_ms,
            timeframe_ms=self.timeframe_ms,
            allow_timeframe_mismatch=True,
            cuda_graphs=self.cuda_graphs,
            weekend_close=self.weekend_close,
        )

    @property
    def model_version(self) -> str:
        return self.checkpoint.model_version

    def calibration_mismatch(self, num_steps: int) -> str | None:
        """Why the checkpoint's spread calibration may not hold for sampling with this sampler at
        ``num_steps`` steps — it was fitted with another — or None (it was, or there is none). The
        factors are still applied and the forecasts served — on fx-5m, UniPC at 5 steps covers 1–1.5
        points less at 90 %, DPM-Solver++ at 5 steps ~5.5 (docs/quality.md): a choice, not an error — so
        callers warn once instead of refusing."""
        fitted = self.checkpoint.manifest.fitted_sampler()
        if fitted is None:
            return None
        serving = algorithm_of(self.scheduler)
        # The reference sampler runs every training step whatever ``steps`` says: only its name counts.
        every_step = serving in SAMPLERS and SAMPLERS[serving].full_schedule
        if serving == fitted.scheduler and (every_step or num_steps == fitted.steps):
            return None
        how = (f"; fit one for it with: signal-worker calibrate --scheduler {serving} --steps {num_steps}"
               if serving in SAMPLERS else "")
        return (f"the spread calibration of {self.model_version} was fitted with {fitted.label()}, and this "
                f"samples with {serving} {num_steps} steps: its intervals may not cover their levels{how}")

    def spread_factor(self, horizon_ms: int) -> float | None:
        """The checkpoint's spread correction for a served horizon, or None. Looked up by bar count:
        the calibration is keyed by trained durations, and a checkpoint served on another timeframe
        (``allow_timeframe_mismatch``) forecasts the same number of bars, not the same durations."""
        bars, rest = divmod(int(horizon_ms), self.timeframe_ms)
        return None if rest else self.checkpoint.spread_factor(bars * self.checkpoint.timeframe_ms)

    def uncalibrated_horizons(self, horizons: Sequence[int] | None = None) -> str | None:
        """Why some served horizons (``horizons``, default this forecaster's) get no spread correction
        — the checkpoint's calibration was fitted at other horizons, so theirs are the raw model's
        intervals (on the 5-minute model ~5–7 % too narrow) — or None (all calibrated, or the
        checkpoint has no calibration at all). Served anyway, as a choice; callers warn once."""
        if not self.checkpoint.manifest.calibration:
            return None
        served = sorted(set(horizons)) if horizons else self.horizons_ms
        missing = [h for h in served if self.spread_factor(h) is None]
        if not missing:
            return None
        trained = self.checkpoint.timeframe_ms
        fitted = sorted(int(h) // trained * self.timeframe_ms for h in self.checkpoint.manifest.calibration)
        return (f"horizons {', '.join(format_duration(h) for h in missing)} have no spread calibration in "
                f"{self.model_version} (fitted for {', '.join(format_duration(h) for h in fitted)}): their "
                "intervals are the uncalibrated model's and may not cover their levels")

    @property
    def window_bars(self) -> int:
        return self.checkpoint.spec.window_bars

    def _check_horizons(self, horizons: Sequence[int]) -> list[int]:
        out = sorted(set(int(h) for h in horizons))
        limit = self.checkpoint.network.horizon
        for h in out:
            try:
                bars = horizon_bars(h, self.timeframe_ms)
            except ValueError as exc:
                raise TimeframeError(str(exc)) from None
            if bars > limit:
                raise TimeframeError(
                    f"horizon {format_duration(h)} is {bars} bars; the model forecasts at most {limit}"
                )
        return out

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Copy through a reusable pinned staging buffer, one set per CUDA stream: a batch owns its
        stream until its results are on the host, so the buffer is free again when reused."""
        stream = torch.cuda.current_stream(self.device)
        key = (stream.cuda_stream, name)
        flat = torch.from_numpy(array).reshape(-1)
        buf = self._pinned.get(key)
        if buf is None or buf.numel() < flat.numel():
            buf = torch.empty(max(flat.numel(), 2 * (buf.numel() if buf is not None else 0)),
                              dtype=flat.dtype, pin_memory=True)
            self._pinned[key] = buf
        staged = buf[: flat.numel()]
        staged.copy_(flat)
        return staged.view(array.shape).to(self.device, non_blocking=True)

    def horizon_bars(self, horizons: Sequence[int] | None = None) -> list[int]:
        return [horizon_bars(h, self.timeframe_ms) for h in (horizons or self.horizons_ms)]

    def open_horizons(self, origin_time: np.ndarray, bars: Sequence[int]) -> np.ndarray:
        """Per origin, how many of ``bars`` (ascending horizons, in bars) end before the weekend
        close: those are forecast, the rest left out (all of them with ``weekend_close`` off). Always
        a prefix, since a horizon that crosses the close makes every longer one cross it too."""
        origin = np.asarray(origin_time, dtype=np.int64).reshape(-1)
        if not self.weekend_close or not len(bars):
            return np.full(len(origin), len(bars), dtype=np.int64)
        before = bars_before_close(origin, self.timeframe_ms, max(bars))
        out: np.ndarray = np.searchsorted(np.asarray(bars), before, side="right").astype(np.int64)
        return out

    # -- host side -------------------------------------------------------------------------
    def prepare(self, requests: Sequence[ForecastRequest], horizons: Sequence[int] | None = None) -> PreparedBatch:
        """Features and contexts for each request; requests that cannot be forecast are set aside
        (``market_closed``: every one of ``horizons``, default this forecaster's, would end after the
        weekend close — pass the horizons the batch will be run with)."""
        spec, norm = self.checkpoint.spec, self.checkpoint.norm
        hz = self._check_horizons(horizons) if horizons else self.horizons_ms
        bars = self.horizon_bars(hz)
        horizon = self.checkpoint.network.horizon
        ok: list[int] = []
        parts: list[ContextBatch] = []
        rejected: dict[int, InsufficientHistory] = {}
        valid: list[tuple[int, CandleSeries]] = []  # requests whose window can be forecast
        for i, req in enumerate(requests):
            series = req.candles[-spec.window_bars :]
            index = len(series) - 1
            if index < 0:
                rejected[i] = InsufficientHistory("insufficient_history",
                                                  f"{req.symbol}: no candles, need {spec.window_bars}")
                continue
            defect = series.defect(spec.timeframe_ms)
            if defect is not None:
                rejected[i] = InvalidCandles(f"{req.symbol}: {defect}")
                continue
            why = origin_ok(series, index, spec)
            if why is not None:
                # The whole request, so the message can point to an earlier origin that works.
                full = req.candles

                def servable(j: int, full: CandleSeries = full) -> bool:  # the origin hinted at is not market_closed
                    return bool(self.open_horizons(full.open_time[j : j + 1], bars)[0])

                rejected[i] = InsufficientHistory(why, explain_origin(full, len(full) - 1, spec, req.symbol,
                                                                      usable=servable))
                continue
            valid.append((i, series))
        # One calendar lookup for the batch (not one per request).
        origins = np.array([int(s.open_time[-1]) for _, s in valid], dtype=np.int64)
        served = self.open_horizons(origins, bars)
        for (i, series), origin, n in zip(valid, origins, served, strict=True):
            if not n:
                rejected[i] = InsufficientHistory("market_closed",
                                                  self._closed_detail(requests[i].symbol, int(origin), hz))
                continue
            try:
                parts.append(build_contexts(series, np.array([len(series) - 1]), spec, norm, horizon))
                ok.append(i)
            except InsufficientHistory as exc:
                rejected[i] = exc
        ctx = _concat(parts) if parts else None
        kept = tuple(requests[i] for i in ok)
        return PreparedBatch(requests=kept, contexts=ctx, rejected=rejected)

    def _closed_detail(self, symbol: str, origin: int, horizons: Sequence[int] | None = None) -> str:
        hz = horizons or self.horizons_ms
        return (f"{symbol}: every horizon ({', '.join(format_duration(h) for h in hz)}) from the bar opening "
                f"{iso(origin)} ends after the FX weekend close (Friday 17:00 New York): the model forecasts "
                "within a trading week (weekend_close=False forecasts anyway, without the weekend gap)")

    # -- device side -----------------------------------------------------------------------
    @torch.inference_mode()
    def sample(
        self,
        contexts: ContextBatch,
        seeds: Sequence[int],
        *,
        num_samples: int,
        num_steps: int,
        horizons: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Cumulative log-return samples on the device, (G, S, K), and the NFE spent."""
        check_sampling(num_samples, num_steps)
        horizons = self._check_horizons(horizons) if horizons else None  # the path must reach each
        model = self.checkpoint.model
        refresh_kernel_caches(model)  # weights may have changed since the last call, even through .data
        dev = self.device
        g = len(seeds)
        bars = self.horizon_bars(horizons)
        arrays = (contexts.bar_features, contexts.context_time, contexts.future_time)
        if dev.type == "cuda":
            feats, ctime, ftime = (self._to_device(name, a) for name, a in zip(("f", "c", "t"), arrays, strict=True))
        else:
            feats, ctime, ftime = (torch.from_numpy(a) for a in arrays)
        cond = model.encode(feats, ctime).repeat_interleave(num_samples, dim=0)
        ftime_rep = ftime.repeat_interleave(num_samples, dim=0)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        result = sample_paths(
            model.bind(cond, ftime_rep),
            schedule=self.checkpoint.schedule,
            scheduler=self.sampler,
            steps=num_steps,
            groups=g,
            samples=num_samples,
            horizon=self.checkpoint.network.horizon,
            generators=generators,
            device=dev,
            cuda_graphs=self.cuda_graphs,
            noise=self.checkpoint.manifest.diffusion.initial_noise,
            horizon_bars=bars,
        )
        norm = self.checkpoint.norm
        if contexts.future_scale is None or self.checkpoint.spec.feature_set == "ohlc_ewma":
            # one volatility per origin (format 1: unchanged numerics)
            vol = torch.as_tensor(contexts.origin_vol, device=dev, dtype=torch.float32)[:, None, None]
        else:  # seasonal: origin vol x each future bar's intraday multiplier
            vol = torch.as_tensor(contexts.future_scale, device=dev, dtype=torch.float32)[:, None, :]
        returns = (result.paths * norm.target_std + norm.target_mean) * vol
        cum = cumulative_returns(returns, bars)
        factors = [self.spread_factor(h) for h in (horizons or self.horizons_ms)]  # checked: sorted
        if any(f is not None for f in factors):
            cum = apply_spread(cum, [1.0 if f is None else f for f in factors])
        return cum, result.nfe

    def run(
        self,
        batch: PreparedBatch,
        *,
        num_samples: int = 64,
        num_steps: int = 10,
        seed: int = 0,
        horizons: Sequence[int] | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> list[Forecast]:
        """Sample and summarise a prepared batch: one tensor for all symbols and samples."""
        return self.run_with_samples(batch, num_samples=num_samples, num_steps=num_steps, seed=seed,
                                     horizons=horizons, stream=stream, keep_samples=False)[0]

    def run_with_samples(
        self,
        batch: PreparedBatch,
        *,
        num_samples: int = 64,
        num_steps: int = 10,
        seed: int = 0,
        horizons: Sequence[int] | None = None,
        stream: torch.cuda.Stream | None = None,
        keep_samples: bool = True,
    ) -> tuple[list[Forecast], np.ndarray | None]:
        """As :meth:`run`, also returning the cumulative log-return samples (G, S, K) on the host
        (for evaluation and scheduler comparison)."""
        if batch.contexts is None or not batch.requests:
            return [], None
        ctx = batch.contexts
        seeds = [noise_seed(seed, r.symbol, int(t)) for r, t in zip(batch.requests, ctx.origin_time, strict=True)]
        hz = self._check_horizons(horizons) if horizons else self.horizons_ms
        bars = self.horizon_bars(hz)
        served = self.open_horizons(ctx.origin_time, bars)  # a prefix of hz per request; samples keep all
        if len(served) and int(np.min(served)) == 0:
            # prepare() refuses an origin with no horizon left, for the horizons it was given
            raise ValueError(f"an origin of this batch has none of the horizons {list(hz)} before the weekend close: "
                             "prepare(requests, horizons=...) with the horizons the batch is run with")
        samples = None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            cum, nfe = self.sample(ctx, seeds, num_samples=num_samples, num_steps=num_steps, horizons=hz)
            stats = summarise(cum, ctx.origin_close)  # its host copy synchronises this stream only
            if keep_samples:
                samples = cum.double().cpu().numpy()
        bars = self.horizon_bars(hz)
        served = self.open_horizons(ctx.origin_time, bars)  # a prefix of hz per request; samples keep all
        out = []
        for i, req in enumerate(batch.requests):
            close = float(ctx.origin_close[i])
            horizons_out = tuple(
                HorizonStats(
                    horizon_ms=h,
                    bars=b,
                    mean=float(stats.mean[i, k]),
                    std=float(stats.std[i, k]),
                    quantiles=tuple(float(v) for v in stats.quantiles[i, k]),
                    p_up=float(stats.p_up[i, k]),
                    price_mean=float(stats.price_mean[i, k]),
                    price_quantiles=tuple(close * float(np.exp(v)) for v in stats.quantiles[i, k]),
                )
                for k, (h, b) in enumerate(zip(hz, bars, strict=True))
                if k < served[i]
            )
            out.append(
                Forecast(
                    symbol=req.symbol,
                    open_time=int(ctx.origin_time[i]),
                    close=close,
                    horizons=horizons_out,
                    scheduler=self.scheduler,
                    steps=num_steps,
                    nfe=nfe,
                    samples=num_samples,
                    seed=seeds[i],
                    model_version=self.model_version,
                )
            )
        return out, samples

    def forecast(
        self,
        candles_by_symbol: Mapping[str, CandleSeries],
        *,
        horizons: Sequence[int] | str | None = None,
        num_samples: int = 64,
        num_steps: int = 10,
        seed: int = 0,
    ) -> dict[str, Forecast]:
        """Forecast the newest bar of every symbol in one batch. Raises InsufficientHistory if any
        symbol cannot be forecast (use ``prepare``/``run`` to handle them one by one). Warns when the
        checkpoint's calibration was fitted for another sampler setting (``calibration_mismatch``):
        this is the notebook's entry point, where a log line at start-up would not be seen."""
        why = self.calibration_mismatch(num_steps)
        if why:
            warnings.warn(why, UserWarning, stacklevel=2)
        hz = None
        if horizons is not None:
            hz = self._check_horizons(parse_horizons(horizons) if isinstance(horizons, str) else horizons)
        uncalibrated = self.uncalibrated_horizons(hz)
        if uncalibrated:
            warnings.warn(uncalibrated, UserWarning, stacklevel=2)
        batch = self.prepare([ForecastRequest(s, c) for s, c in candles_by_symbol.items()], horizons=hz)
        if batch.rejected:
            raise next(iter(batch.rejected.values()))
        results = self.run(batch, num_samples=num_samples, num_steps=num_steps, seed=seed, horizons=hz)
        return {f.symbol: f for f in results}


def apply_spread(cum: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """The checkpoint's calibration: widen (factor > 1) or narrow each horizon's samples about their
    mean, (G, S, K). Applied to the samples themselves, so every statistic and the online scorer see
    the same calibrated distribution."""
    f = torch.as_tensor(list(factors), device=cum.device, dtype=cum.dtype)
    mean = cum.mean(dim=1, keepdim=True)
    return mean + (cum - mean) * f


def _concat(parts: list[ContextBatch]) -> ContextBatch:
    def join(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return ContextBatch(*(join(f) for f in ContextBatch.__dataclass_fields__))  # type: ignore[arg-type]


__all__ = [
    "Forecast",
    "ForecastRequest",
    "Forecaster",
    "PreparedBatch",
    "noise_seed",
]

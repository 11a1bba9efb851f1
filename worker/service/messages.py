"""From a core :class:`Forecast` to the wire contract."""

from __future__ import annotations

from schemas import ForecastMessage, HorizonForecast
from schemas.forecast import QUANTILE_KEYS
from worker.model.forecaster import Forecast


def forecast_message(f: Forecast, *, timeframe: str, timeframe_ms: int, ingest_ms: int, publish_ms: int,
                     worker_id: str) -> ForecastMessage:
    return ForecastMessage(
        symbol=f.symbol,
        timeframe=timeframe,
        open_time=f.open_time,
        event_time=f.open_time + timeframe_ms,
        ingest_time=ingest_ms,
        publish_time=publish_ms,
        latency_ms=float(publish_ms - ingest_ms),
        close=f.close,
        horizons=tuple(
            HorizonForecast(
                horizon_minutes=h.horizon_minutes,
                horizon_bars=h.bars,
                mean=h.mean,
                std=h.std,
                quantiles=dict(zip(QUANTILE_KEYS, h.quantiles, strict=True)),
                p_up=h.p_up,
                price_mean=h.price_mean,
                price_quantiles=dict(zip(QUANTILE_KEYS, h.price_quantiles, strict=True)),
            )
            for h in f.horizons
        ),
        model_version=f.model_version,
        scheduler=f.scheduler,
        steps=f.steps,
        nfe=f.nfe,
        samples=f.samples,
        seed=f.seed,
        worker_id=worker_id,
    )

"""From a core :class:`Forecast` to the forecast record: msgpack value and headers.

Forecasts come from the core's own statistics, so on the hot path the value is packed from plain
values (:func:`schemas.pack_forecast`) once a cheap check has passed: every number finite, the
standard deviation non-negative, seven quantiles in order, prices positive. Anything else goes
through the pydantic model's full validation, which raises a ``ValidationError`` naming the field;
the worker then skips that bar with a logged reason instead of publishing a NaN to traders. Both
paths give the same bytes for the same forecast (tested), and tests decode every published message
with the strict decoder.
"""

from __future__ import annotations

import math
from typing import Any

from schemas import ForecastMessage, encode_forecast, forecast_headers, forecast_headers_of, pack_forecast
from schemas.forecast import QUANTILE_KEYS
from schemas.headers import Headers
from worker.model.forecaster import Forecast


def _trusted(f: Forecast, timeframe_ms: int) -> bool:
    """True when ``f`` is certainly publishable; False sends it through full validation."""
    if not (math.isfinite(f.close) and f.close > 0) or not f.horizons or f.open_time % timeframe_ms:
        return False
    previous = 0
    for h in f.horizons:
        if h.horizon_ms <= previous or not 0.0 <= h.p_up <= 1.0 or not h.price_mean > 0:
            return False
        # Whole minutes and whole bars, as the strict decoder requires (a sub-minute timeframe or
        # horizon would otherwise be packed and then refused by every consumer).
        if h.horizon_ms % 60_000 or h.bars * timeframe_ms != h.horizon_ms:
            return False
        previous = h.horizon_ms
        # A NaN or an infinity anywhere makes the sum non-finite. (So can an overflow of huge
        # values; those take the validating path, which is only slower.)
        total = h.mean + h.std + h.p_up + h.price_mean + sum(h.quantiles) + sum(h.price_quantiles)
        q, pq = h.quantiles, h.price_quantiles
        if (not math.isfinite(total) or h.std < 0 or len(q) != _Q or len(pq) != _Q
                or list(q) != sorted(q) or list(pq) != sorted(pq) or pq[0] <= 0):
            return False
    return True


_Q = len(QUANTILE_KEYS)


def _fields(f: Forecast, *, timeframe: str, timeframe_ms: int, ingest_ms: int, publish_ms: int,
            worker_id: str) -> dict[str, Any]:
    # Keys in the contract's declared order, so pack_forecast has nothing to reorder. Numbers from
    # the core are float (or numpy float64, a float subclass msgpack packs the same way).
    return {
        "schema_version": 1,
        "symbol": f.symbol,
        "timeframe": timeframe,
        "open_time": f.open_time,
        "event_time": f.open_time + timeframe_ms,
        "ingest_time": ingest_ms,
        "publish_time": publish_ms,
        "latency_ms": float(publish_ms - ingest_ms),
        "close": f.close,
        "horizons": [
            {
                "horizon_minutes": h.horizon_ms // 60_000,
                "horizon_bars": h.bars,
                "mean": h.mean,
                "std": h.std,
                "quantiles": dict(zip(QUANTILE_KEYS, h.quantiles, strict=True)),
                "p_up": h.p_up,
                "price_mean": h.price_mean,
                "price_quantiles": dict(zip(QUANTILE_KEYS, h.price_quantiles, strict=True)),
            }
            for h in f.horizons
        ],
        "model_version": f.model_version,
        "scheduler": f.scheduler,
        "steps": f.steps,
        "nfe": f.nfe,
        "samples": f.samples,
        "seed": f.seed,
        "worker_id": worker_id,
    }


def forecast_record(f: Forecast, *, timeframe: str, timeframe_ms: int, ingest_ms: int, publish_ms: int,
                    worker_id: str) -> tuple[bytes, Headers]:
    """The record value and headers of ``f``; ``ValueError`` (``ValidationError`` is one) if it must
    not be published."""
    for h in f.horizons:  # before the fields are built: a wrong count is an invalid forecast, not a crash
        if len(h.quantiles) != _Q or len(h.price_quantiles) != _Q:
            raise ValueError(f"{f.symbol}: {len(h.quantiles)} quantiles / {len(h.price_quantiles)} price "
                             f"quantiles at {h.horizon_ms} ms, the contract has {_Q} ({', '.join(QUANTILE_KEYS)})")
    fields = _fields(f, timeframe=timeframe, timeframe_ms=timeframe_ms, ingest_ms=ingest_ms,
                     publish_ms=publish_ms, worker_id=worker_id)
    if _trusted(f, timeframe_ms):
        return pack_forecast(fields), forecast_headers_of(f.symbol, timeframe, f.open_time, f.model_version)
    message = ForecastMessage.model_validate(fields)
    return encode_forecast(message), forecast_headers(message)


def forecast_message(f: Forecast, *, timeframe: str, timeframe_ms: int, ingest_ms: int, publish_ms: int,
                     worker_id: str) -> ForecastMessage:
    """The validated message model of ``f`` (for tools and tests; the worker uses :func:`forecast_record`)."""
    return ForecastMessage.model_validate(
        _fields(f, timeframe=timeframe, timeframe_ms=timeframe_ms, ingest_ms=ingest_ms, publish_ms=publish_ms,
                worker_id=worker_id))

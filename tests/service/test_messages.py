"""Forecast -> wire message: the fast path must produce exactly what the strict decoder accepts, and a
non-finite forecast must be refused (never published)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from schemas import decode_forecast, encode_forecast
from worker.model.forecaster import Forecast
from worker.model.summary import HorizonStats
from worker.service.messages import forecast_message

H = 3_600_000


def _forecast(mean: float = 1e-4) -> Forecast:
    q = (-0.002, -0.0015, -0.0007, 0.0, 0.0007, 0.0015, 0.002)
    hs = tuple(HorizonStats(b * H, b, mean, 0.001 * b, q, 0.5, 1.1, tuple(1.1 * math.exp(v) for v in q))
               for b in (1, 4))
    return Forecast("EURUSD", 1_500_000 * H, 1.1, hs, "dpmpp", 10, 10, 64, 7, "sssd-x")


def _msg(f: Forecast):  # type: ignore[no-untyped-def]
    return forecast_message(f, timeframe="1h", timeframe_ms=H, ingest_ms=10, publish_ms=25, worker_id="w")


def test_fast_path_message_is_what_the_strict_decoder_accepts() -> None:
    msg = _msg(_forecast())
    decoded = decode_forecast(encode_forecast(msg))
    assert decoded == decode_forecast(encode_forecast(decoded))
    assert decoded.latency_ms == 15.0 and decoded.event_time == msg.open_time + H
    assert [h.horizon_bars for h in decoded.horizons] == [1, 4]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_forecast_is_refused(bad: float) -> None:
    with pytest.raises(ValidationError, match="mean"):
        _msg(_forecast(mean=bad))

"""Forecast -> wire record: the fast path must give exactly the bytes and headers of the validated
model, and a non-finite forecast must be refused (never published)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from pydantic import ValidationError

from schemas import decode_forecast, encode_forecast, forecast_headers, pack_forecast, unpackb
from worker.model.forecaster import Forecast
from worker.model.summary import HorizonStats
from worker.service.messages import forecast_message, forecast_record

H = 3_600_000
KW = {"timeframe": "1h", "timeframe_ms": H, "ingest_ms": 10, "publish_ms": 25, "worker_id": "w"}


def _forecast(mean: float = 1e-4, *, q05: float = -0.002, price_q05: float | None = None) -> Forecast:
    q = (q05, -0.0015, -0.0007, 0.0, 0.0007, 0.0015, 0.002)
    pq = tuple(1.1 * math.exp(v) for v in q)
    if price_q05 is not None:
        pq = (price_q05, *pq[1:])
    hs = tuple(HorizonStats(b * H, b, mean, 0.001 * b, q, 0.5, 1.1, pq) for b in (1, 4))
    return Forecast("EURUSD", 1_500_000 * H, 1.1, hs, "dpmpp", 10, 10, 64, 7, "sssd-x")


def test_fast_path_gives_the_bytes_and_headers_of_the_validated_model() -> None:
    f = _forecast()
    value, headers = forecast_record(f, **KW)
    msg = forecast_message(f, **KW)  # full pydantic validation
    assert value == encode_forecast(msg)
    assert headers == forecast_headers(msg)
    decoded = decode_forecast(value)
    assert decoded == msg
    assert decoded.latency_ms == 15.0 and decoded.event_time == msg.open_time + H
    assert [h.horizon_bars for h in decoded.horizons] == [1, 4]
    assert dict(headers)["idempotency_key"] == f"EURUSD:1h:{1_500_000 * H}:sssd-x".encode()


def test_numpy_floats_from_the_core_pack_like_python_floats() -> None:
    f = _forecast()
    hs = tuple(HorizonStats(h.horizon_ms, h.bars, np.float64(h.mean), np.float64(h.std),
                            tuple(np.float64(v) for v in h.quantiles), np.float64(h.p_up),
                            np.float64(h.price_mean), tuple(np.float64(v) for v in h.price_quantiles))
               for h in f.horizons)
    g = Forecast(f.symbol, f.open_time, np.float64(f.close), hs, f.scheduler, f.steps, f.nfe, f.samples, f.seed,
                 f.model_version)
    assert forecast_record(g, **KW) == forecast_record(f, **KW)


def test_pack_forecast_writes_declared_key_order_whatever_it_is_given() -> None:
    f = _forecast()
    fields = unpackb(forecast_record(f, **KW)[0])
    shuffled = dict(reversed(list(fields.items())))
    shuffled["horizons"] = [dict(reversed(list(h.items()))) for h in fields["horizons"]]
    assert pack_forecast(shuffled) == pack_forecast(fields) == encode_forecast(decode_forecast(pack_forecast(fields)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_forecast_is_refused(bad: float) -> None:
    with pytest.raises(ValidationError, match="mean"):
        forecast_record(_forecast(mean=bad), **KW)
    with pytest.raises(ValidationError, match="mean"):
        forecast_message(_forecast(mean=bad), **KW)


@pytest.mark.parametrize(("kwargs", "field"), [({"q05": math.nan}, "quantiles"),
                                               ({"price_q05": 0.0}, "price_quantiles"),
                                               ({"q05": 0.5}, "non-decreasing")])
def test_other_unpublishable_forecasts_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        forecast_record(_forecast(**kwargs), **KW)


def test_every_invariant_of_the_contract_is_checked_before_the_fast_path() -> None:
    f = _forecast()
    h1, h4 = f.horizons
    bad = {
        "p_up": dataclasses.replace(f, horizons=(dataclasses.replace(h1, p_up=1.5), h4)),
        "price_mean": dataclasses.replace(f, horizons=(dataclasses.replace(h1, price_mean=0.0), h4)),
        "std": dataclasses.replace(f, horizons=(dataclasses.replace(h1, std=-1e-3), h4)),
        "ascending": dataclasses.replace(f, horizons=(h4, h1)),
        "horizons": dataclasses.replace(f, horizons=()),
        "close": dataclasses.replace(f, close=-1.0),
    }
    for field, g in bad.items():
        with pytest.raises(ValidationError, match=field):
            forecast_record(g, **KW)


def test_a_wrong_quantile_count_is_an_invalid_forecast_not_a_crash() -> None:
    """The worker skips what raises ValueError; a bare zip error used to escape and stop it."""
    f = _forecast()
    h1, h4 = f.horizons
    short = dataclasses.replace(f, horizons=(dataclasses.replace(h1, quantiles=h1.quantiles[:6]), h4))
    with pytest.raises(ValueError, match=r"6 quantiles / 7 price quantiles .* the contract has 7"):
        forecast_record(short, **KW)


@pytest.mark.parametrize(("timeframe", "timeframe_ms", "bars", "horizon_ms"), [
    ("90s", 90_000, 3, 270_000),   # 4.5 minutes: not whole minutes
    ("1h", H, 2, H),               # 2 bars of 1 h is not 60 minutes
])
def test_horizons_the_strict_decoder_refuses_are_never_packed(timeframe: str, timeframe_ms: int, bars: int,
                                                              horizon_ms: int) -> None:
    f = _forecast()
    h1, _ = f.horizons
    odd = dataclasses.replace(f, open_time=1_500_000 * H, horizons=(dataclasses.replace(h1, horizon_ms=horizon_ms,
                                                                                      bars=bars),))
    with pytest.raises(ValidationError):
        forecast_record(odd, **{**KW, "timeframe": timeframe, "timeframe_ms": timeframe_ms})

"""ForecastMessage: round trip, determinism, strict decoding, headers."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from schemas import (
    QUANTILE_KEYS,
    QUANTILE_LEVELS,
    ForecastMessage,
    HorizonForecast,
    MessageDecodeError,
    decode_forecast,
    encode_forecast,
    forecast_headers,
    header_value,
    idempotency_key,
)
from schemas import headers as h
from schemas.export import example_forecast


def as_map() -> dict[str, Any]:
    return msgpack.unpackb(encode_forecast(example_forecast()), raw=False)


def pack(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def test_quantile_constants() -> None:
    assert QUANTILE_KEYS == ("q05", "q10", "q25", "q50", "q75", "q90", "q95")
    assert QUANTILE_LEVELS == (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
    assert [f"q{round(q * 100):02d}" for q in QUANTILE_LEVELS] == list(QUANTILE_KEYS)


def test_round_trip() -> None:
    message = example_forecast()
    payload = encode_forecast(message)
    decoded = decode_forecast(payload)
    assert decoded == message
    assert encode_forecast(decoded) == payload
    assert decoded.horizon(60).horizon_bars == 12
    with pytest.raises(KeyError):
        decoded.horizon(5)


def test_encoding_is_deterministic_and_in_declared_order() -> None:
    d = as_map()
    assert list(d) == list(ForecastMessage.model_fields)
    assert list(d["horizons"][0]) == list(HorizonForecast.model_fields)
    assert list(d["horizons"][0]["quantiles"]) == list(QUANTILE_KEYS)
    # quantiles given in another order still encode in key order
    m = example_forecast()
    hz = m.horizons[0].model_dump()
    hz["quantiles"] = dict(reversed(list(hz["quantiles"].items())))
    shuffled = m.model_copy(update={"horizons": (HorizonForecast(**hz), m.horizons[1])})
    assert encode_forecast(shuffled) == encode_forecast(m)


def test_types_on_the_wire() -> None:
    d = as_map()
    for key in ("open_time", "event_time", "ingest_time", "publish_time", "steps", "nfe", "samples", "seed"):
        assert type(d[key]) is int, key
    for key in ("latency_ms", "close"):
        assert type(d[key]) is float, key
    assert all(type(v) is float for v in d["horizons"][0]["quantiles"].values())


def test_unknown_keys_are_ignored() -> None:
    d = as_map()
    d["new_top_level_field"] = {"anything": [1, 2]}
    d["horizons"][0]["skew"] = 0.1
    assert decode_forecast(pack(d)) == example_forecast()


def test_int_for_float_is_accepted() -> None:
    d = as_map()
    d["latency_ms"] = 265
    assert decode_forecast(pack(d)).latency_ms == 265.0


def mutate(path: tuple[Any, ...], value: Any) -> bytes:
    d = as_map()
    target = d
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return pack(d)


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schema_version",), 2),
        (("schema_version",), DELETE),
        (("schema_version",), True),
        (("symbol",), "eurusd"),
        (("timeframe",), "5 minutes"),
        (("open_time",), 1_700_000_100_001),
        (("event_time",), 1_700_000_400_001),
        (("open_time",), 1.7e12),
        (("close",), 0.0),
        (("close",), True),
        (("latency_ms",), math.nan),
        (("latency_ms",), "265"),
        (("steps",), 50.0),
        (("steps",), 0),
        (("samples",), True),
        (("seed",), -1),
        (("model_version",), ""),
        (("worker_id",), DELETE),
        (("horizons",), []),
        (("horizons",), {"0": 1}),
        (("horizons", 0, "horizon_bars"), 4),
        (("horizons", 0, "horizon_minutes"), 60),
        (("horizons", 0, "std"), -0.1),
        (("horizons", 0, "p_up"), 1.5),
        (("horizons", 0, "p_up"), math.inf),
        (("horizons", 0, "price_mean"), -1.0),
        (("horizons", 0, "quantiles", "q50"), -1.0),
        (("horizons", 0, "quantiles", "q95"), DELETE),
        (("horizons", 0, "quantiles", "q99"), 0.1),
        (("horizons", 0, "quantiles", "q50"), True),
        (("horizons", 0, "price_quantiles", "q05"), 0.0),
        (("horizons", 0, "price_quantiles", "q95"), 1.0),
    ],
)
def test_strict_decoding_rejects(path: tuple[Any, ...], value: Any) -> None:
    with pytest.raises(MessageDecodeError):
        decode_forecast(mutate(path, value))


@pytest.mark.parametrize("payload", [b"", b"\xc1", pack([1]), pack(None)])
def test_undecodable_forecast(payload: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode_forecast(payload)


def test_horizons_must_ascend() -> None:
    m = example_forecast()
    with pytest.raises(ValidationError, match="ascending"):
        m.model_validate({**m.model_dump(), "horizons": [m.horizons[1], m.horizons[0]]})


def test_idempotency_key_and_headers() -> None:
    m = example_forecast()
    assert idempotency_key("EURUSD", "5m", 1_700_000_100_000, "v7") == "EURUSD:5m:1700000100000:v7"
    headers = forecast_headers(m)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert dict(headers) == {
        "content-type": b"application/msgpack",
        "schema_version": b"1",
        "model_version": b"sssd-fx-5m-v1",
        "idempotency_key": b"EURUSD:5m:1700000100000:sssd-fx-5m-v1",
    }
    assert header_value(headers, h.IDEMPOTENCY_KEY) == b"EURUSD:5m:1700000100000:sssd-fx-5m-v1"
    assert header_value(headers, "missing") is None
    assert header_value(None, h.CONTENT_TYPE) is None
    assert (h.SCHEMA_VERSION, h.MODEL_VERSION, h.IDEMPOTENCY_KEY, h.CONTENT_TYPE, h.DLQ_REASON) == (
        "schema_version",
        "model_version",
        "idempotency_key",
        "content-type",
        "dlq_reason",
    )
    assert dict(h.candle_headers()) == {"content-type": b"application/msgpack", "schema_version": b"1"}

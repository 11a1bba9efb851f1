"""CandleEvent: round trip, every reject reason, check order, forward compatibility."""

from __future__ import annotations

import math
import pickle
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from schemas import (
    CandleEvent,
    CandleFields,
    CandleRejected,
    RejectReason,
    decode_candle,
    decode_candle_fields,
    encode_candle,
)
from schemas.errors import REJECT_REASON_DESCRIPTIONS

TF = "5m"
T0 = 1_700_000_100_000  # a multiple of 5 minutes


def base(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema_version": 1,
        "symbol": "EURUSD",
        "timeframe": TF,
        "open_time": T0,
        "open": 1.0841,
        "high": 1.0853,
        "low": 1.0838,
        "close": 1.085,
        "volume": 1523.0,
        "is_final": True,
    }
    d.update(changes)
    return d


def pack(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def reject(payload: bytes | None, **kw: Any) -> CandleRejected:
    kw.setdefault("timeframe", TF)
    with pytest.raises(CandleRejected) as info:
        decode_candle(payload, **kw)
    return info.value


def test_round_trip_is_byte_exact() -> None:
    payload = pack(base())
    candle = decode_candle(payload, timeframe=TF, key=b"EURUSD")
    assert candle == CandleEvent(**base())
    assert encode_candle(candle) == payload
    assert decode_candle(encode_candle(candle), timeframe=TF) == candle
    assert candle.timeframe_ms == 300_000
    assert candle.close_time == T0 + 300_000


def test_fields_decoder_gives_the_models_values_without_building_it() -> None:
    payload = pack(base(open=1, low=1, timeframe="60m", open_time=3_600_000 * 472_222))
    fields = decode_candle_fields(payload, timeframe="1h", key=b"EURUSD")
    assert type(fields) is CandleFields
    assert type(fields.open) is float and fields.open == 1.0 and fields.timeframe == "1h"
    model = decode_candle(payload, timeframe="1h", key=b"EURUSD")
    assert fields.to_event() == model
    assert fields._asdict() == model.model_dump(exclude={"schema_version"})


def test_decoded_model_equals_pydantic_validation() -> None:
    candle = decode_candle(pack(base()), timeframe=TF)
    assert CandleEvent.model_validate(candle.model_dump()) == candle
    assert candle.model_fields_set == set(CandleEvent.model_fields)


def test_models_are_frozen() -> None:
    candle = decode_candle(pack(base()), timeframe=TF)
    with pytest.raises(ValidationError):
        candle.close = 2.0


def test_version_is_optional_and_defaults_to_1() -> None:
    d = base()
    del d["schema_version"]
    assert decode_candle(pack(d), timeframe=TF).schema_version == 1


def test_ints_become_floats() -> None:
    candle = decode_candle(pack(base(open=2, high=3, low=1, close=2, volume=0)), timeframe=TF)
    assert (candle.open, candle.high, candle.low, candle.close, candle.volume) == (2.0, 3.0, 1.0, 2.0, 0.0)
    assert all(type(v) is float for v in (candle.open, candle.high, candle.low, candle.close, candle.volume))


def test_extra_keys_are_ignored() -> None:
    candle = decode_candle(pack(base(source="ecn-7", trades=[1, 2], nested={"a": 1})), timeframe=TF)
    assert candle == CandleEvent(**base())
    assert "source" not in encode_candle(candle).decode("latin1")


def test_equivalent_timeframe_is_canonicalised() -> None:
    candle = decode_candle(pack(base(timeframe="60m", open_time=1_699_999_200_000)), timeframe="1h")
    assert candle.timeframe == "1h"


def test_in_progress_bar_and_no_key_are_fine() -> None:
    assert decode_candle(pack(base(is_final=False)), timeframe=TF, key=None).is_final is False


def test_flat_bar_and_zero_volume_are_fine() -> None:
    decode_candle(pack(base(open=1.0, high=1.0, low=1.0, close=1.0, volume=0.0)), timeframe=TF)


# --- every reason ---------------------------------------------------------------------------------


def test_oversized() -> None:
    err = reject(pack(base(padding="x" * 5000)))
    assert err.reason is RejectReason.OVERSIZED
    assert "4096" in err.detail
    payload = pack(base())
    assert reject(payload, max_bytes=len(payload) - 1).reason is RejectReason.OVERSIZED
    decode_candle(payload, timeframe=TF, max_bytes=len(payload))


@pytest.mark.parametrize(
    "payload",
    [
        None,
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\x01",  # truncated array
        pack(base()) + b"\x00",  # trailing data
        pack([1, 2, 3]),
        pack("EURUSD"),
        pack(1.5),
        b"\x81\xa6symbol\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\x01\x02",  # int map key
    ],
)
def test_undecodable(payload: bytes | None) -> None:
    assert reject(payload).reason is RejectReason.UNDECODABLE


@pytest.mark.parametrize("version", [2, 0, -1, "1", 1.0, True, None])
def test_unsupported_version(version: Any) -> None:
    err = reject(pack(base(schema_version=version)))
    assert err.reason is RejectReason.UNSUPPORTED_VERSION
    assert "schema_version" in err.detail


@pytest.mark.parametrize(
    "field", ["symbol", "timeframe", "open_time", "open", "high", "low", "close", "volume", "is_final"]
)
def test_missing_field(field: str) -> None:
    d = base()
    del d[field]
    err = reject(pack(d))
    assert err.reason is RejectReason.SCHEMA
    assert field in err.detail


@pytest.mark.parametrize("field", ["open", "high", "low", "close", "volume"])
@pytest.mark.parametrize("value", [True, False, "1.08", None, [1.0], b"1"])
def test_non_numbers_are_schema_errors(field: str, value: Any) -> None:
    err = reject(pack(base(**{field: value})))
    assert err.reason is RejectReason.SCHEMA
    assert repr(field) in err.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("open_time", float(T0)),
        ("open_time", True),
        ("open_time", str(T0)),
        ("open_time", -300_000),
        ("is_final", 1),
        ("is_final", "true"),
        ("is_final", None),
        ("symbol", 42),
        ("symbol", b"EURUSD"),
        ("timeframe", 5),
        ("timeframe", "5x"),
        ("timeframe", "05m"),
        ("timeframe", " 5m"),
        ("timeframe", "0m"),
        ("timeframe", ""),
        ("volume", -1.0),
        ("volume", -1),
    ],
)
def test_mistyped_or_out_of_range_fields(field: str, value: Any) -> None:
    err = reject(pack(base(**{field: value})))
    assert err.reason is RejectReason.SCHEMA
    assert field in err.detail


def test_bool_is_not_a_number_detail_names_field_and_value() -> None:
    err = reject(pack(base(close=True)))
    assert err.reason is RejectReason.SCHEMA
    assert "'close'" in err.detail and "bool" in err.detail and "True" in err.detail


@pytest.mark.parametrize("field", ["open", "high", "low", "close", "volume"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite(field: str, value: float) -> None:
    err = reject(pack(base(**{field: value})))
    assert err.reason is RejectReason.NON_FINITE
    assert repr(field) in err.detail


@pytest.mark.parametrize("field", ["open", "high", "low", "close"])
@pytest.mark.parametrize("value", [0.0, -1.0, 0])
def test_non_positive_price(field: str, value: float) -> None:
    err = reject(pack(base(**{field: value})))
    assert err.reason is RejectReason.NON_POSITIVE_PRICE
    assert repr(field) in err.detail


@pytest.mark.parametrize(
    "changes",
    [
        {"high": 1.0849},  # below close
        {"high": 1.0840, "close": 1.0839},  # below open
        {"low": 1.0842},  # above open
        {"low": 1.0851, "open": 1.0852, "high": 1.0853},  # above close
        {"high": 1.0, "low": 2.0, "open": 1.5, "close": 1.5},  # high < low
    ],
)
def test_inconsistent_ohlc(changes: dict[str, float]) -> None:
    assert reject(pack(base(**changes))).reason is RejectReason.INCONSISTENT_OHLC


@pytest.mark.parametrize("symbol", ["eurusd", "", "A" * 33, "EUR USD", "EURUSD\n", "EUR/USD", "ÉURUSD"])
def test_invalid_symbol(symbol: str) -> None:
    err = reject(pack(base(symbol=symbol)))
    assert err.reason is RejectReason.INVALID_SYMBOL
    assert "symbol" in err.detail


def test_symbol_alphabet_is_accepted() -> None:
    decode_candle(pack(base(symbol="BRK.B_X-1" + "Z" * 23)), timeframe=TF)


@pytest.mark.parametrize("offset", [1, 60_000, 299_999])
def test_misaligned_open_time(offset: int) -> None:
    err = reject(pack(base(open_time=T0 + offset)))
    assert err.reason is RejectReason.MISALIGNED_OPEN_TIME
    assert str(T0 + offset) in err.detail


def test_timeframe_mismatch() -> None:
    err = reject(pack(base(timeframe="1h", open_time=1_699_999_200_000)))
    assert err.reason is RejectReason.TIMEFRAME_MISMATCH
    assert "1h" in err.detail and "5m" in err.detail


@pytest.mark.parametrize("key", [b"GBPUSD", b"", b"eurusd", b"EURUSD "])
def test_key_mismatch(key: bytes) -> None:
    err = reject(pack(base()), key=key)
    assert err.reason is RejectReason.KEY_MISMATCH


def test_every_reason_is_documented_and_covered() -> None:
    assert set(REJECT_REASON_DESCRIPTIONS) == set(RejectReason)
    assert {r.value for r in RejectReason} == {
        "oversized",
        "undecodable",
        "unsupported_version",
        "schema",
        "non_finite",
        "non_positive_price",
        "inconsistent_ohlc",
        "invalid_symbol",
        "misaligned_open_time",
        "timeframe_mismatch",
        "key_mismatch",
        "future_open_time",
        "final_before_close",
        "corrupt_record",  # decided by the transport, not the decoder: tests/transport/test_corrupt_batches.py
    }


# --- check order ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({"schema_version": 2, "close": "x"}, None, RejectReason.UNSUPPORTED_VERSION),
        ({"close": "x", "open": math.nan}, None, RejectReason.SCHEMA),
        ({"open": math.nan, "symbol": "bad"}, None, RejectReason.NON_FINITE),
        ({"symbol": "bad", "open": -1.0}, None, RejectReason.INVALID_SYMBOL),
        ({"open": -1.0, "high": 0.5}, None, RejectReason.NON_POSITIVE_PRICE),
        ({"high": 1.0, "timeframe": "1h"}, None, RejectReason.INCONSISTENT_OHLC),
        ({"timeframe": "1h", "open_time": T0 + 1}, None, RejectReason.TIMEFRAME_MISMATCH),
        ({"open_time": T0 + 1}, b"GBPUSD", RejectReason.MISALIGNED_OPEN_TIME),
    ],
)
def test_first_failing_check_wins(changes: dict[str, Any], key: bytes | None, expected: RejectReason) -> None:
    assert reject(pack(base(**changes)), key=key).reason is expected


def test_size_is_checked_before_decoding() -> None:
    assert reject(b"\xc1" * 5000).reason is RejectReason.OVERSIZED


def test_bad_worker_timeframe_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        decode_candle(pack(base()), timeframe="five minutes")


# --- the error type and the pydantic path ---------------------------------------------------------


def test_candle_rejected_carries_reason_and_detail_and_pickles() -> None:
    err = CandleRejected("schema", "missing field 'close'")
    assert err.reason is RejectReason.SCHEMA
    assert str(err) == "schema: missing field 'close'"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.detail) == (err.reason, err.detail)


def test_long_values_are_cut_in_details() -> None:
    err = reject(pack(base(symbol="x" * 2000)), max_bytes=8192)
    assert err.reason is RejectReason.INVALID_SYMBOL
    assert len(err.detail) < 200


@pytest.mark.parametrize(
    "changes",
    [
        {"close": True},
        {"close": "1.0"},
        {"close": math.nan},
        {"close": -1.0},
        {"symbol": "eurusd"},
        {"high": 1.0849},
        {"open_time": T0 + 1},
        {"timeframe": "5x"},
        {"is_final": 1},
        {"open_time": float(T0)},
        {"volume": -1.0},
        {"schema_version": 2},
    ],
)
def test_pydantic_validation_rejects_what_decode_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CandleEvent(**base(**changes))

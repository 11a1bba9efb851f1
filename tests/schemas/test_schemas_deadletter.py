"""DeadLetterRecord: round trip, bytes verbatim, strict decoding, headers."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from schemas import (
    CandleRejected,
    DeadLetterRecord,
    MessageDecodeError,
    RejectReason,
    dead_letter_headers,
    decode_candle,
    decode_dead_letter,
    encode_dead_letter,
)
from schemas.export import example_dead_letter


def pack(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def test_round_trip() -> None:
    record = example_dead_letter()
    payload = encode_dead_letter(record)
    assert decode_dead_letter(payload) == record
    assert encode_dead_letter(decode_dead_letter(payload)) == payload


def test_bytes_are_msgpack_bin_and_verbatim() -> None:
    garbage = bytes(range(256))
    record = example_dead_letter().model_copy(update={"original": garbage, "original_key": b"\xff\x00"})
    raw = msgpack.unpackb(encode_dead_letter(record), raw=False)
    assert raw["original"] == garbage and type(raw["original"]) is bytes
    assert raw["original_key"] == b"\xff\x00"
    assert raw["reason"] == "inconsistent_ohlc" and type(raw["reason"]) is str
    assert decode_dead_letter(encode_dead_letter(record)).original == garbage


def test_nil_key_and_timestamp() -> None:
    record = example_dead_letter().model_copy(update={"original_key": None, "record_timestamp": None})
    decoded = decode_dead_letter(encode_dead_letter(record))
    assert decoded.original_key is None and decoded.record_timestamp is None


def test_from_rejection() -> None:
    value = pack({"symbol": "EURUSD"})
    with pytest.raises(CandleRejected) as info:
        decode_candle(value, timeframe="5m", key=b"EURUSD")
    record = DeadLetterRecord.from_rejection(
        info.value,
        original=value,
        original_key=b"EURUSD",
        topic="candles",
        partition=0,
        offset=7,
        record_timestamp=1_700_000_000_000,
        worker_id="w-1",
    )
    assert record.reason is RejectReason.SCHEMA
    assert "timeframe" in record.detail
    assert record.original == value
    assert record.dead_lettered_at > 1_700_000_000_000
    assert decode_dead_letter(encode_dead_letter(record)) == record


def test_headers() -> None:
    assert dict(dead_letter_headers(example_dead_letter())) == {
        "content-type": b"application/msgpack",
        "schema_version": b"1",
        "dlq_reason": b"inconsistent_ohlc",
    }


def test_unknown_keys_are_ignored() -> None:
    d = msgpack.unpackb(encode_dead_letter(example_dead_letter()), raw=False)
    d["trace_id"] = "abc"
    assert decode_dead_letter(pack(d)) == example_dead_letter()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("schema_version", 2),
        ("reason", "not_a_reason"),
        ("reason", 3),
        ("original", "text, not bin"),
        ("original_key", "EURUSD"),
        ("partition", -1),
        ("offset", 1.0),
        ("record_timestamp", "now"),
        ("dead_lettered_at", True),
        ("topic", ""),
        ("worker_id", None),
        ("detail", None),
    ],
)
def test_strict_decoding_rejects(key: str, value: Any) -> None:
    d = msgpack.unpackb(encode_dead_letter(example_dead_letter()), raw=False)
    d[key] = value
    with pytest.raises(MessageDecodeError):
        decode_dead_letter(pack(d))


@pytest.mark.parametrize("payload", [b"", b"\xc1", pack([1])])
def test_undecodable(payload: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode_dead_letter(payload)

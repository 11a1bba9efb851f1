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
from schemas.deadletter import (
    DEAD_LETTER_MAX_BYTES,
    DETAIL_MAX_CHARS,
    KEY_MAX_BYTES,
    ORIGINAL_MAX_BYTES,
    WORKER_ID_MAX_CHARS,
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


def _from(original: bytes, key: bytes | None = b"K", detail: str = "d", timestamp: int | None = 5) -> DeadLetterRecord:
    return DeadLetterRecord.from_rejection(
        CandleRejected(RejectReason.OVERSIZED, detail), original=original, original_key=key, topic="t" * 249,
        partition=0, offset=0, record_timestamp=timestamp, worker_id="w" * WORKER_ID_MAX_CHARS)


def test_a_dead_letter_always_fits_whatever_was_rejected() -> None:
    import hashlib

    huge = bytes(range(256)) * 8192  # 2 MiB
    record = _from(huge, key=b"k" * 10_000, detail="\u00e9" * 50_000)
    assert record.original == huge[:ORIGINAL_MAX_BYTES] and record.original_truncated
    assert record.original_size == len(huge) and record.original_sha256 == hashlib.sha256(huge).hexdigest()
    assert record.original_key == b"k" * KEY_MAX_BYTES and len(record.detail) == DETAIL_MAX_CHARS
    payload = encode_dead_letter(record)
    # Value + key (<= KEY_MAX_BYTES) + headers well inside the documented bound.
    assert len(payload) + KEY_MAX_BYTES + 512 < DEAD_LETTER_MAX_BYTES
    assert decode_dead_letter(payload) == record


def test_small_originals_are_kept_whole() -> None:
    record = _from(b"abc")
    assert record.original == b"abc" and not record.original_truncated and record.original_size == 3


@pytest.mark.parametrize("timestamp", [-1, None])
def test_no_kafka_timestamp_is_recorded_as_unknown(timestamp: int | None) -> None:
    assert _from(b"x", timestamp=timestamp).record_timestamp is None

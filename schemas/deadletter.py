"""The dead-letter contract: one rejected input record on ``candles.dlq`` (Kafka key = original key).

The original record value is kept verbatim (msgpack *bin*), so a fixed record can be replayed as-is,
up to :data:`ORIGINAL_MAX_BYTES`; a longer value keeps that prefix, and ``original_size`` and
``original_sha256`` describe the whole. The key and ``detail`` are bounded too, so every dead letter
fits in :data:`DEAD_LETTER_MAX_BYTES`, whatever was rejected: a dead letter that did not fit the
producer's request size could never be sent, and the record behind it never committed.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictBytes,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)

from schemas.candle import MAX_TIME_MS
from schemas.codec import packb, unpackb
from schemas.errors import CandleRejected, MessageDecodeError, RejectReason

DEAD_LETTER_SCHEMA_VERSION: Final = 1
ORIGINAL_MAX_BYTES: Final = 64 * 1024
"""``original`` keeps at most this many bytes of the rejected value (its prefix)."""
KEY_MAX_BYTES: Final = 1024
"""``original_key`` (and the dead letter's Kafka key) keep at most this many bytes of the original key."""
DETAIL_MAX_CHARS: Final = 1024
"""``detail`` is cut to this many characters."""
WORKER_ID_MAX_CHARS: Final = 256
DEAD_LETTER_MAX_BYTES: Final = 96 * 1024
"""Upper bound of one dead letter as a Kafka record: value, key, headers and record framing. The
producer's request size (``SIGNAL_WORKER_KAFKA__MAX_REQUEST_BYTES``) must be at least this."""
_SHA256 = r"^[0-9a-f]{64}$"

_BIN_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "format": "binary",
    "contentMediaType": "application/octet-stream",
    "x-msgpack-type": "bin",
    "$comment": "msgpack bin (raw bytes), not a text string; JSON renderings use base64.",
}
_Bin = Annotated[StrictBytes, WithJsonSchema(_BIN_SCHEMA)]
_TimeMs = Annotated[StrictInt, Field(ge=0, lt=MAX_TIME_MS)]


class DeadLetterRecord(BaseModel):
    """A rejected ``candles`` record, its reason, and where it came from."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_serialization_defaults_required=True,
        title="DeadLetterRecord",
        json_schema_extra={
            "description": (
                "A rejected input record on the `candles.dlq` topic, encoded as a msgpack map with string "
                "keys. Kafka key: the original record key (absent if it had none). `original` and "
                "`original_key` are msgpack bin (raw bytes), shown here as binary strings. Consumers "
                "must ignore unknown keys."
            )
        },
    )

    schema_version: Literal[1] = Field(default=1, description="Contract version (1).")
    reason: RejectReason = Field(description="Machine-readable reason code.")
    detail: StrictStr = Field(
        max_length=DETAIL_MAX_CHARS,
        description=f"Human-readable explanation naming the field and value (at most {DETAIL_MAX_CHARS} characters).",
    )
    original: _Bin = Field(
        max_length=ORIGINAL_MAX_BYTES,
        description=f"The original record value, byte for byte (msgpack bin); only its first "
        f"{ORIGINAL_MAX_BYTES} bytes when it was longer (`original_truncated`).",
    )
    original_size: StrictInt = Field(ge=0, description="Size of the whole original value in bytes.")
    original_sha256: StrictStr = Field(
        pattern=_SHA256, description="SHA-256 of the whole original value, lower-case hex."
    )
    original_truncated: StrictBool = Field(
        description="True when `original` holds only a prefix of the value (`original_size` > its length)."
    )
    original_key: _Bin | None = Field(
        max_length=KEY_MAX_BYTES,
        description=f"The original record key (msgpack bin), or nil if it had none; its first "
        f"{KEY_MAX_BYTES} bytes when longer.",
    )
    topic: StrictStr = Field(min_length=1, description="Topic the record was consumed from.")
    partition: StrictInt = Field(ge=0, description="Partition the record was consumed from.")
    offset: StrictInt = Field(ge=0, description="Offset of the record in that partition.")
    record_timestamp: _TimeMs | None = Field(
        description="Kafka timestamp of the original record (ms since epoch), or nil if unknown."
    )
    dead_lettered_at: _TimeMs = Field(description="Wall-clock time the worker dead-lettered it (ms).")
    worker_id: StrictStr = Field(
        min_length=1, max_length=WORKER_ID_MAX_CHARS, description="Identity of the worker instance that rejected it."
    )

    @classmethod
    def from_rejection(
        cls,
        error: CandleRejected,
        *,
        original: bytes,
        original_key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        record_timestamp: int | None,
        worker_id: str,
        dead_lettered_at: int | None = None,
    ) -> DeadLetterRecord:
        """The record for a :class:`CandleRejected`; ``dead_lettered_at`` defaults to now.

        ``original`` and ``original_key`` may be of any size: they are cut to the contract's bounds
        here (a prefix, plus the whole value's size and SHA-256), as is ``detail``. A negative
        ``record_timestamp`` (Kafka's -1, "no timestamp") is recorded as unknown.
        """
        original = bytes(original)
        detail = error.detail
        if len(detail) > DETAIL_MAX_CHARS:
            detail = detail[: DETAIL_MAX_CHARS - 1] + "\u2026"
        return cls(
            reason=error.reason,
            detail=detail,
            original=original[:ORIGINAL_MAX_BYTES],
            original_size=len(original),
            original_sha256=hashlib.sha256(original).hexdigest(),
            original_truncated=len(original) > ORIGINAL_MAX_BYTES,
            original_key=None if original_key is None else bytes(original_key)[:KEY_MAX_BYTES],
            topic=topic,
            partition=partition,
            offset=offset,
            record_timestamp=record_timestamp if record_timestamp is not None and record_timestamp >= 0 else None,
            dead_lettered_at=time.time_ns() // 1_000_000 if dead_lettered_at is None else dead_lettered_at,
            worker_id=worker_id,
        )


def encode_dead_letter(record: DeadLetterRecord) -> bytes:
    """The msgpack bytes for ``record``, keys in declared order; bytes fields as msgpack bin."""
    r = record
    return packb(
        {
            "schema_version": r.schema_version,
            "reason": r.reason.value,
            "detail": r.detail,
            "original": r.original,
            "original_size": r.original_size,
            "original_sha256": r.original_sha256,
            "original_truncated": r.original_truncated,
            "original_key": r.original_key,
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "record_timestamp": r.record_timestamp,
            "dead_lettered_at": r.dead_lettered_at,
            "worker_id": r.worker_id,
        }
    )


def decode_dead_letter(payload: bytes | bytearray | memoryview) -> DeadLetterRecord:
    """Decode and strictly validate a ``candles.dlq`` record value. Unknown keys are ignored; an
    unknown reason code is an error. Raises :class:`~schemas.errors.MessageDecodeError`."""
    try:
        obj = unpackb(payload)
    except Exception as exc:
        raise MessageDecodeError(f"dead letter is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageDecodeError(f"dead letter top level is {type(obj).__name__}, expected a map")
    version = obj.get("schema_version")
    if type(version) is not int or version != DEAD_LETTER_SCHEMA_VERSION:
        raise MessageDecodeError(f"unsupported dead-letter schema_version {version!r}")
    if type(obj.get("reason")) is not str:
        raise MessageDecodeError(f"dead-letter field 'reason' must be str, got {obj.get('reason')!r}")
    try:
        return DeadLetterRecord.model_validate(obj)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid dead letter: {exc}") from exc

"""The dead-letter contract: one rejected input record on ``candles.dlq`` (Kafka key = original key).

The original record value is kept verbatim (msgpack *bin*), so a fixed record can be replayed as-is.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
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
    detail: StrictStr = Field(description="Human-readable explanation naming the field and value.")
    original: _Bin = Field(description="The original record value, byte for byte (msgpack bin).")
    original_key: _Bin | None = Field(
        description="The original record key (msgpack bin), or nil if it had none."
    )
    topic: StrictStr = Field(min_length=1, description="Topic the record was consumed from.")
    partition: StrictInt = Field(ge=0, description="Partition the record was consumed from.")
    offset: StrictInt = Field(ge=0, description="Offset of the record in that partition.")
    record_timestamp: _TimeMs | None = Field(
        description="Kafka timestamp of the original record (ms since epoch), or nil if unknown."
    )
    dead_lettered_at: _TimeMs = Field(description="Wall-clock time the worker dead-lettered it (ms).")
    worker_id: StrictStr = Field(
        min_length=1, description="Identity of the worker instance that rejected it."
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
        """The record for a :class:`CandleRejected`; ``dead_lettered_at`` defaults to now."""
        return cls(
            reason=error.reason,
            detail=error.detail,
            original=original,
            original_key=original_key,
            topic=topic,
            partition=partition,
            offset=offset,
            record_timestamp=record_timestamp,
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

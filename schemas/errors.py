"""Errors raised by the message contracts, and the dead-letter reason codes.

Nothing here imports ``worker``: the contracts stand on their own.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class RejectReason(StrEnum):
    """Why a candle was dead-lettered. The value is the wire code (``DeadLetterRecord.reason``);
    :data:`REJECT_REASON_DESCRIPTIONS` says what each means."""

    OVERSIZED = "oversized"
    UNDECODABLE = "undecodable"
    UNSUPPORTED_VERSION = "unsupported_version"
    SCHEMA = "schema"
    NON_FINITE = "non_finite"
    NON_POSITIVE_PRICE = "non_positive_price"
    INCONSISTENT_OHLC = "inconsistent_ohlc"
    INVALID_SYMBOL = "invalid_symbol"
    MISALIGNED_OPEN_TIME = "misaligned_open_time"
    TIMEFRAME_MISMATCH = "timeframe_mismatch"
    KEY_MISMATCH = "key_mismatch"
    FUTURE_OPEN_TIME = "future_open_time"
    FINAL_BEFORE_CLOSE = "final_before_close"
    CORRUPT_RECORD = "corrupt_record"


REJECT_REASON_DESCRIPTIONS: Final[dict[RejectReason, str]] = {
    RejectReason.OVERSIZED: "The record value is larger than the configured limit (default 4096 bytes).",
    RejectReason.UNDECODABLE: (
        "Not msgpack, trailing bytes after the object, a null value (tombstone), "
        "or the top level is not a map."
    ),
    RejectReason.UNSUPPORTED_VERSION: "`schema_version` is present and is not the int 1.",
    RejectReason.SCHEMA: (
        "A required field is missing or has the wrong type or format (bool or str where a number is "
        "expected, bad timeframe text, open_time out of range), or `volume` is negative."
    ),
    RejectReason.NON_FINITE: "A price or the volume is NaN or infinite.",
    RejectReason.NON_POSITIVE_PRICE: "`open`, `high`, `low` or `close` is zero or negative.",
    RejectReason.INCONSISTENT_OHLC: "`high < low`, `high < max(open, close)` or `low > min(open, close)`.",
    RejectReason.INVALID_SYMBOL: "`symbol` is a string but does not match `^[A-Z0-9._-]{1,32}$`.",
    RejectReason.MISALIGNED_OPEN_TIME: "`open_time` is not a multiple of the timeframe in ms.",
    RejectReason.TIMEFRAME_MISMATCH: "The event's timeframe is not the timeframe this worker consumes.",
    RejectReason.KEY_MISMATCH: (
        "The Kafka record has no key, or its key is not the symbol encoded as UTF-8 (a symbol spread "
        "over several partitions would have two replicas race on one window)."
    ),
    RejectReason.FUTURE_OPEN_TIME: (
        "`open_time` lies beyond the worker's clock plus `SIGNAL_WORKER_WINDOW__FUTURE_TOLERANCE_S` "
        "(a feed switching from ms to µs, a clock error): one such bar would make every real bar late."
    ),
    RejectReason.FINAL_BEFORE_CLOSE: (
        "`is_final` is true but the bar closes (`open_time` + timeframe) later than the worker's clock "
        "plus `SIGNAL_WORKER_WINDOW__FUTURE_TOLERANCE_S`: it cannot have closed, so its prices are "
        "not the bar's (a feed's clock error, or a bar marked final too early)."
    ),
    RejectReason.CORRUPT_RECORD: (
        "The Kafka record batch holding this offset could not be read on any refetch: it failed its CRC "
        "check (a damaged log segment on the broker), or a record header's key is not UTF-8 (another "
        "client's binary header name; the Kafka client decodes header keys strictly). `detail` says "
        "which. The record cannot be read, so `original` is empty and `original_key` null. The worker "
        "skipped the offset; the broker's log still holds the bytes."
    ),
}


class CandleRejected(Exception):
    """A candle event failed validation; the record belongs on the dead-letter topic.

    ``reason`` is the machine-readable code, ``detail`` a human-readable sentence naming the
    field and the offending value.
    """

    reason: RejectReason
    detail: str

    def __init__(self, reason: RejectReason | str, detail: str) -> None:
        self.reason = RejectReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")

    def __reduce__(self) -> tuple[type[CandleRejected], tuple[RejectReason, str]]:
        # Exceptions pickle through ``self.args``; ours has a different constructor.
        return (type(self), (self.reason, self.detail))


class MessageDecodeError(ValueError):
    """A forecast or dead-letter payload is not valid msgpack or does not satisfy its contract."""

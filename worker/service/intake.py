"""From a consumed record to a valid candle or a dead letter: the worker's rules on top of the contract.

:func:`schemas.decode_candle_fields` checks the candle contract; the worker adds what needs its
clock and its partitioning, and makes sure no value, however pathological, gets past as an
exception: any record either decodes or becomes a :class:`~schemas.CandleRejected`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.structs import ConsumerRecord

from schemas import CandleFields, CandleRejected, DeadLetterRecord, decode_candle_fields, encode_dead_letter
from schemas.deadletter import KEY_MAX_BYTES
from schemas.errors import RejectReason
from schemas.headers import dead_letter_headers
from worker.transport.corrupt import UnreadableOffset
from worker.transport.producer import OutRecord

__all__ = ["ClockWatch", "dead_letter_record", "decode_record", "ingest_time", "latest_admitted_ms",
           "unreadable_record"]


def latest_admitted_ms(now_ms: int, future_tolerance_s: int) -> int:
    """The latest time a bar may open, or close if it says it is final: this clock plus its tolerance."""
    return now_ms + future_tolerance_s * 1000


def decode_record(rec: ConsumerRecord[bytes, bytes], *, timeframe: str, timeframe_ms: int, max_bytes: int,
                  now_ms: int, future_tolerance_s: int) -> CandleFields:
    """The record's candle, or :class:`CandleRejected` with the reason."""
    try:
        candle = decode_candle_fields(rec.value, timeframe=timeframe, max_bytes=max_bytes, key=rec.key)
    except CandleRejected:
        raise
    except Exception as exc:  # e.g. RecursionError on a value nested 1,000 deep: never let it out
        raise CandleRejected(RejectReason.UNDECODABLE,
                             f"the decoder failed on this value with {type(exc).__name__}") from None
    if rec.key is None:
        # A symbol must live on one partition, or two replicas race on its window.
        raise CandleRejected(RejectReason.KEY_MISMATCH, f"record has no key; it must be the symbol {candle.symbol!r}")
    latest = latest_admitted_ms(now_ms, future_tolerance_s)
    if candle.open_time > latest:
        # One future bar would make every real bar of the symbol late (and stick as a watermark).
        raise CandleRejected(
            RejectReason.FUTURE_OPEN_TIME,
            f"field 'open_time' = {candle.open_time} is {(candle.open_time - now_ms) / 1000:.0f} s ahead of this "
            f"worker's clock (tolerance SIGNAL_WORKER_WINDOW__FUTURE_TOLERANCE_S={future_tolerance_s})")
    closes = candle.open_time + timeframe_ms
    if candle.is_final and closes > latest:
        # Forecast from, it would stand as the bar's forecast: the real final bar, arriving later,
        # is then a revision of a bar already forecast, and is not forecast again.
        raise CandleRejected(
            RejectReason.FINAL_BEFORE_CLOSE,
            f"is_final is true but the bar opening at {candle.open_time} closes at {closes}, "
            f"{(closes - now_ms) / 1000:.0f} s after this worker's clock (tolerance "
            f"SIGNAL_WORKER_WINDOW__FUTURE_TOLERANCE_S={future_tolerance_s})")
    return candle


def ingest_time(rec: ConsumerRecord[bytes, bytes], now_ms: int) -> int:
    """The record's Kafka timestamp; arrival time for Kafka's -1 ("no timestamp") or an old-format
    record without one, which the forecast contract (``ingest_time >= 0``) would refuse."""
    ts = rec.timestamp
    return ts if ts is not None and ts >= 0 else now_ms


def dead_letter_record(rec: ConsumerRecord[bytes, bytes], err: CandleRejected,
                       worker_id: str) -> tuple[OutRecord, DeadLetterRecord]:
    """The dead letter of ``rec``, bounded by the contract whatever the record held."""
    record = DeadLetterRecord.from_rejection(
        err, original=bytes(rec.value or b""), original_key=rec.key, topic=rec.topic, partition=rec.partition,
        offset=rec.offset, record_timestamp=rec.timestamp, worker_id=worker_id,
    )
    key = None if rec.key is None else bytes(rec.key)[:KEY_MAX_BYTES]
    return OutRecord(key, encode_dead_letter(record), dead_letter_headers(record)), record


def unreadable_record(u: UnreadableOffset) -> tuple[ConsumerRecord[bytes, bytes], CandleRejected]:
    """An offset whose batch failed the CRC check on every fetch, as a rejected record with no bytes
    (no timestamp, no key: nothing of it could be read), for :func:`dead_letter_record`."""
    rec: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic=u.tp.topic, partition=u.tp.partition, offset=u.offset, timestamp=-1, timestamp_type=0,
        key=None, value=b"", checksum=None, serialized_key_size=-1, serialized_value_size=-1, headers=[])
    return rec, CandleRejected(RejectReason.CORRUPT_RECORD, u.detail)


# The reasons decided by this worker's clock rather than by the record alone.
CLOCK_REASONS = frozenset({RejectReason.FUTURE_OPEN_TIME, RejectReason.FINAL_BEFORE_CLOSE})


@dataclass
class ClockWatch:
    """Whether this worker's clock still agrees with the feed's.

    The clock rules cannot tell a feed that is ahead from a worker clock that is behind (NTP lost,
    a VM resumed): with this clock over ``FUTURE_TOLERANCE_S`` slow, every real final bar is
    ``final_before_close``, and nothing is forecast. ``suspect`` once ``threshold`` records in a
    row were refused by a clock rule with no final bar admitted in between, and they came from two
    symbols or more (from one only if no symbol ever had a final bar admitted): one symbol stamped
    wrongly among many, however many in-progress updates it sends, does not trip it. Readiness then
    says not ready; the next admitted final bar clears it."""

    threshold: int = 5
    streak: int = 0  # records refused by a clock rule since the last final bar admitted
    refused_symbols: set[bytes] = field(default_factory=set)  # their keys (the symbol)
    admitted_symbols: set[str] = field(default_factory=set)  # every symbol with a final bar admitted
    last_refusal: str = ""
    reported: bool = False  # the suspicion was logged

    @property
    def suspect(self) -> bool:
        needed = min(2, max(1, len(self.admitted_symbols)))
        return self.streak >= self.threshold and len(self.refused_symbols) >= needed

    def admitted(self, symbol: str) -> None:
        self.admitted_symbols.add(symbol)
        self.reset()

    def reset(self) -> None:
        """Start counting again (a final bar admitted, or a new assignment)."""
        self.streak = 0
        self.refused_symbols.clear()
        self.reported = False

    def refused(self, err: CandleRejected, key: bytes | None) -> bool:
        """Count a refusal; True once, when the clock first becomes suspect (log it then)."""
        if err.reason not in CLOCK_REASONS:
            return False
        self.streak += 1
        if len(self.refused_symbols) < 2:  # all that ``suspect`` asks
            self.refused_symbols.add(bytes(key or b""))
        self.last_refusal = f"{err.reason}: {err.detail}"
        if self.suspect and not self.reported:
            self.reported = True
            return True
        return False

"""The worker's rules on top of the candle contract (``worker.service.intake.decode_record``), with
the clock given: a bar from the future, a bar called final before it could have closed."""

from __future__ import annotations

import pytest
from aiokafka.structs import ConsumerRecord
from msgpack import packb

from schemas import CandleRejected
from schemas.errors import RejectReason
from worker.service.intake import decode_record

HOUR_MS = 3_600_000
NOW = 1_733_302_800_000 + 25 * 60_000  # 2024-12-04 09:25 UTC
TOLERANCE_S = 300


def _record(open_time: int, is_final: bool) -> ConsumerRecord[bytes, bytes]:
    value = packb({"schema_version": 1, "symbol": "EURUSD", "timeframe": "1h", "open_time": open_time,
                   "open": 1.10, "high": 1.12, "low": 1.09, "close": 1.11, "volume": 5.0, "is_final": is_final})
    return ConsumerRecord("candles", 0, 7, NOW, 0, b"EURUSD", value, None, 6, len(value), ())


def _decode(open_time: int, is_final: bool = True) -> object:
    return decode_record(_record(open_time, is_final), timeframe="1h", timeframe_ms=HOUR_MS, max_bytes=4096,
                         now_ms=NOW, future_tolerance_s=TOLERANCE_S)


def test_a_final_bar_that_cannot_have_closed_is_refused_naming_the_setting() -> None:
    this_hour = NOW // HOUR_MS * HOUR_MS  # opened 25 minutes ago, closes in 35
    with pytest.raises(CandleRejected) as info:
        _decode(this_hour)
    assert info.value.reason is RejectReason.FINAL_BEFORE_CLOSE
    assert "2100 s after this worker's clock" in info.value.detail
    assert "SIGNAL_WORKER_WINDOW__FUTURE_TOLERANCE_S=300" in info.value.detail


def _decode_at(now_ms: int, open_time: int, is_final: bool = True) -> object:
    return decode_record(_record(open_time, is_final), timeframe="1h", timeframe_ms=HOUR_MS, max_bytes=4096,
                         now_ms=now_ms, future_tolerance_s=TOLERANCE_S)


@pytest.mark.parametrize(("now_ms", "open_time", "is_final"), [
    (NOW, NOW // HOUR_MS * HOUR_MS, False),  # the same bar, still forming: fine
    (NOW, NOW // HOUR_MS * HOUR_MS - HOUR_MS, True),  # closed 25 minutes ago
    (NOW // HOUR_MS * HOUR_MS + HOUR_MS - 4 * 60_000, NOW // HOUR_MS * HOUR_MS, True),  # closes in 4 min: tolerated
])
def test_bars_that_have_closed_or_are_not_final_are_accepted(now_ms: int, open_time: int, is_final: bool) -> None:
    candle = _decode_at(now_ms, open_time, is_final)
    assert candle.is_final is is_final  # type: ignore[attr-defined]


def test_a_bar_from_the_future_is_still_future_open_time() -> None:
    with pytest.raises(CandleRejected) as info:
        _decode((NOW // HOUR_MS + 48) * HOUR_MS)
    assert info.value.reason is RejectReason.FUTURE_OPEN_TIME


def test_the_clock_is_suspect_only_when_refusals_span_the_feed() -> None:
    from worker.service.intake import ClockWatch

    ahead = CandleRejected(RejectReason.FUTURE_OPEN_TIME, "ahead")
    early = CandleRejected(RejectReason.FINAL_BEFORE_CLOSE, "early")
    other = CandleRejected(RejectReason.UNDECODABLE, "junk")

    # Many symbols served; one stamped wrongly sends a hundred updates: not the clock.
    watch = ClockWatch()
    for s in ("A", "B", "C"):
        watch.admitted(s)
    assert [watch.refused(ahead, b"BAD") for _ in range(100)] == [False] * 100
    assert not watch.suspect
    # A second symbol refused too, five refusals in all: suspect, reported once.
    assert watch.refused(early, b"A") is True
    assert watch.suspect and watch.refused(early, b"B") is False
    watch.admitted("C")
    assert not watch.suspect and watch.streak == 0

    # Records refused for other reasons do not count.
    fresh = ClockWatch()
    assert not any(fresh.refused(other, b"A") for _ in range(10)) and fresh.streak == 0
    # A deployment whose only symbol never had a bar admitted: one symbol is enough.
    reported = [fresh.refused(ahead, b"ONLY") for _ in range(5)]
    assert reported == [False] * 4 + [True] and fresh.suspect
    fresh.reset()  # a new assignment
    assert not fresh.suspect

"""Every kind of bad input goes to the dead-letter topic while good symbols carry on."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack
import pytest

from schemas import decode_dead_letter, encode_candle, packb
from schemas.deadletter import ORIGINAL_MAX_BYTES
from schemas.headers import DLQ_REASON, header_value

from .conftest import (
    Collector,
    RunningWorker,
    WorkerEnv,
    committed_offsets,
    eventually,
    forecastable,
    interleave,
    metric,
    publish_raw,
    synthetic_events,
    trivial_engine,
)

pytestmark = pytest.mark.integration

GOOD = synthetic_events("GOODA", 1)[0]
BASE: dict[str, Any] = {
    "schema_version": 1, "symbol": "BADSYM", "timeframe": "1h", "open_time": GOOD.open_time, "open": 1.10,
    "high": 1.12, "low": 1.09, "close": 1.11, "volume": 5.0, "is_final": True,
}


def bad(**changes: Any) -> bytes:
    body = {k: v for k, v in {**BASE, **changes}.items() if v is not _DROP}
    return packb(body)


_DROP = object()


def _nested(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


# An aligned hour two days ahead of the clock: a feed whose clock (or unit) went wrong.
FUTURE = (int(time.time() * 1000) // 3_600_000 + 48) * 3_600_000

# (label, key, value, expected reason code)
BAD_RECORDS: list[tuple[str, bytes | None, bytes, str]] = [
    ("undecodable bytes", b"BADSYM", b"\xc1\xff not msgpack at all", "undecodable"),
    ("top level not a map", b"BADSYM", msgpack.packb([1, 2, 3]), "undecodable"),
    ("missing field", b"BADSYM", bad(close=_DROP), "schema"),
    ("mistyped field", b"BADSYM", bad(open_time=str(GOOD.open_time)), "schema"),
    ("bool as a number", b"BADSYM", bad(volume=True), "schema"),
    ("NaN", b"BADSYM", bad(close=float("nan")), "non_finite"),
    ("inf", b"BADSYM", bad(high=float("inf")), "non_finite"),
    ("non-positive price", b"BADSYM", bad(low=0.0), "non_positive_price"),
    ("negative price", b"BADSYM", bad(open=-1.0), "non_positive_price"),
    ("high < max(open, close)", b"BADSYM", bad(high=1.105), "inconsistent_ohlc"),
    ("low > min(open, close)", b"BADSYM", bad(low=1.101), "inconsistent_ohlc"),
    ("misaligned open_time", b"BADSYM", bad(open_time=GOOD.open_time + 60_000), "misaligned_open_time"),
    ("timeframe mismatch", b"BADSYM", bad(timeframe="5m"), "timeframe_mismatch"),
    ("bad symbol", b"eur/usd", bad(symbol="eur/usd"), "invalid_symbol"),
    ("oversized", b"BADSYM", bad(padding="x" * 5000), "oversized"),
    ("key mismatch", b"OTHER", bad(), "key_mismatch"),
    ("unsupported version", b"BADSYM", bad(schema_version=2), "unsupported_version"),
    ("tombstone-like empty value", None, b"", "undecodable"),
    # ~1 KB whose symbol is a list nested 1,000 deep: describing it raised RecursionError once.
    ("nested 1,000 deep", b"BADSYM", bad(symbol=_nested(1000)), "undecodable"),
    ("no key", None, bad(), "key_mismatch"),  # would spread a symbol over partitions
    ("open time in the future", b"BADSYM", bad(open_time=FUTURE), "future_open_time"),
    # Just over 1 MiB: its dead letter must still fit the producer's request (a bounded prefix).
    ("just over 1 MiB", b"BADSYM", bad(padding="x" * 1_048_450), "oversized"),
]


async def test_bad_records_are_dead_lettered_and_good_symbols_carry_on(wenv: WorkerEnv) -> None:
    good = [synthetic_events(s, 12) for s in ("GOODA", "GOODB", "GOODC")]
    good_events = interleave(good)
    engine = trivial_engine()
    expected = forecastable(good_events, engine.window_bars)

    # Bad records in the middle of the stream and at the end of every partition they land on, so
    # the committed offset can only reach the end if dead-lettered records count as done.
    records: list[tuple[bytes | None, bytes]] = []
    for i, ev in enumerate(good_events):
        records.append((ev.symbol.encode(), encode_candle(ev)))
        if i % 3 == 1 and i // 3 < len(BAD_RECORDS):
            _, key, value, _ = BAD_RECORDS[i // 3]
            records.append((key, value))
    records += [(key, value) for _, key, value, _ in BAD_RECORDS]
    bad_values = {value for _, _, value, _ in BAD_RECORDS}

    settings = wenv.settings()
    async with (
        Collector(wenv.bootstrap, wenv.output) as out,
        Collector(wenv.bootstrap, wenv.dlq) as dlq,
        RunningWorker(settings, engine) as w,
    ):
        metas = await publish_raw(wenv.bootstrap, wenv.input, records)
        n_bad = sum(1 for _, v in records if v in bad_values)
        assert n_bad > len(BAD_RECORDS)
        await out.wait_for(lambda: set(out.bars()) >= expected, "every good bar forecast")
        await dlq.wait_count(n_bad)
        await out.settle()
        await dlq.settle(quiet_s=0.5)

        assert sorted(out.bars()) == sorted(expected)  # no bad record turned into a forecast

        # Each DLQ record: the original bytes, the reason, and where it came from.
        where = {(m.partition, m.offset): (key, value) for (key, value), m in zip(records, metas, strict=True)}
        reasons = {value: reason for _, _, value, reason in BAD_RECORDS}
        seen_offsets = set()
        for rec in dlq.records:
            dl = decode_dead_letter(rec.value)
            assert dl.topic == wenv.input
            key, value = where[(dl.partition, dl.offset)]
            assert dl.original == value[:ORIGINAL_MAX_BYTES], "original bytes must be kept verbatim (a prefix)"
            assert dl.original_size == len(value)
            assert dl.original_sha256 == hashlib.sha256(value).hexdigest()
            assert dl.original_truncated == (len(value) > ORIGINAL_MAX_BYTES)
            assert dl.original_key == key
            assert rec.key == key
            assert dl.reason.value == reasons[value], (dl.reason, dl.detail)
            assert header_value(list(rec.headers), DLQ_REASON) == reasons[value].encode()
            assert dl.detail
            assert dl.worker_id == settings.service.worker_id
            seen_offsets.add((dl.partition, dl.offset))
        assert len(seen_offsets) == n_bad == len(dlq.records)

        # Metrics count them by reason.
        by_reason: dict[str, int] = {}
        for _, value in records:
            if value in reasons:
                by_reason[reasons[value]] = by_reason.get(reasons[value], 0) + 1
        for reason, n in by_reason.items():
            assert metric(w, "signal_worker_dead_letters_total", {"reason": reason}) == n, reason

        # The committed offset moved past every record, the bad ones at the very end included.
        ends: dict[int, int] = {}
        for m in metas:
            ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)

        async def past_everything() -> bool:
            got = await committed_offsets(wenv.bootstrap, wenv.group, wenv.input, wenv.partitions)
            return all(got[p] == end for p, end in ends.items())

        await eventually(past_everything, f"committed offsets {ends}", timeout=30)


async def test_a_feed_ahead_of_this_clock_makes_the_worker_not_ready_until_a_bar_is_admitted(
        wenv: WorkerEnv) -> None:
    """The clock rules cannot tell a feed that is ahead from this worker's clock being behind (NTP
    lost, a VM resumed): either way every bar is dead-lettered and nothing is forecast. That used to
    go on with /readyz at 200; now five clock refusals in a row, with no final bar admitted in
    between, make it 503 (``clock``: false) until a final bar is admitted again."""
    from schemas import CandleEvent

    hour = 3_600_000
    now = int(time.time() * 1000) // hour * hour
    # Final bars for hours that open one to six hours from now, as a feed whose clock is that far
    # ahead sends them (or as any feed looks to a worker whose clock is that far behind).
    ahead = [CandleEvent(symbol=f"CLK{k % 2}", timeframe="1h", open_time=now + k * hour, open=1.1, high=1.2,
                         low=1.0, close=1.15, volume=1.0, is_final=True) for k in range(2, 8)]
    closed = synthetic_events("CLK0", 1, start=now - 2 * hour)  # closed an hour ago at least
    async with RunningWorker(wenv.settings(), trivial_engine()) as w:
        # Ready once its first health tick has seen the broker (not at once on a busy machine).
        await eventually(lambda: w.readiness_detail()[0], "ready", detail=lambda: str(w.readiness_detail()[1]))
        await publish_raw(wenv.bootstrap, wenv.input, [(ev.symbol.encode(), encode_candle(ev)) for ev in ahead])
        await eventually(lambda: not w.readiness_detail()[0], "not ready: the feed is ahead of this clock")
        detail = w.readiness_detail()[1]
        assert detail["clock"] is False and detail["broker"] and detail["redis"], detail
        await eventually(lambda: metric(w, "signal_worker_dead_letters_total", {"reason": "future_open_time"}) == 6,
                         "every refused bar dead-lettered")
        await publish_raw(wenv.bootstrap, wenv.input, [(b"CLK0", encode_candle(closed[0]))])
        await eventually(lambda: w.readiness_detail()[0], "ready again once a final bar is admitted")
        assert w.readiness_detail()[1]["clock"] is True

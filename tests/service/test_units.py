"""Unit tests of the service's pure parts: offset tracking, trigger rules, batching, online scoring."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import CandleFields
from worker.model.forecaster import Forecast
from worker.model.summary import HorizonStats
from worker.service.batcher import MicroBatcher
from worker.service.intake import ingest_time
from worker.service.jobs import Received
from worker.service.offsets import OffsetTracker
from worker.service.scoring import OnlineScorer
from worker.service.triggers import plan_triggers, watermarks_ahead
from worker.state.windows import WindowSnapshot

TP = TopicPartition("candles", 0)
H = 3_600_000


def test_commit_never_passes_a_pending_offset() -> None:
    t = OffsetTracker()
    for o in range(10, 15):
        t.add(TP, o)
    t.done(TP, 10)
    t.done(TP, 12)
    assert t.committable() == {TP: 11}  # 11 still pending: nothing after it may be committed
    t.done(TP, 11)
    assert t.committable() == {TP: 13}
    t.mark_committed({TP: 13})
    assert t.committable() == {}  # nothing new
    t.done(TP, 13)
    t.done(TP, 14)
    assert t.committable() == {TP: 15}


def test_forget_drops_revoked_partitions() -> None:
    t = OffsetTracker()
    t.add(TP, 1)
    t.forget([TP])
    t.done(TP, 1)
    assert t.committable() == {}


def _rec(symbol: str, open_time: int, offset: int) -> Received:
    c = CandleFields(symbol=symbol, timeframe="1h", open_time=open_time, open=1.0, high=1.0, low=1.0, close=1.0,
                     volume=1.0, is_final=True)
    return Received(c, TP, offset, 0, 1)


def _snap(symbol: str, watermark: int | None) -> WindowSnapshot:
    return WindowSnapshot(symbol, np.zeros(0, np.int64), np.zeros((0, 5)), watermark)


def test_conflation_keeps_only_the_newest_bar_and_carries_the_offsets() -> None:
    recs = [_rec("A", k * H, k) for k in range(1, 5)]
    plan = plan_triggers(recs, {"A": _snap("A", None)}, {}, conflate=True)
    assert [(j.symbol, j.open_time) for j in plan.jobs] == [("A", 4 * H)]
    assert plan.conflated == 3
    assert sorted(o for _, o in plan.jobs[0].offsets) == [1, 2, 3, 4]


def test_without_conflation_every_bar_is_forecast() -> None:
    recs = [_rec("A", k * H, k) for k in range(1, 5)]
    plan = plan_triggers(recs, {"A": _snap("A", None)}, {}, conflate=False)
    assert [j.open_time for j in plan.jobs] == [H, 2 * H, 3 * H, 4 * H]


def test_bars_at_or_below_the_watermark_are_late() -> None:
    recs = [_rec("A", 2 * H, 1), _rec("A", 3 * H, 2)]
    plan = plan_triggers(recs, {"A": _snap("A", 2 * H)}, {}, conflate=False)
    assert [j.open_time for j in plan.jobs] == [3 * H]
    assert [r.offset for r in plan.late] == [1]


def test_a_watermark_after_the_newest_admissible_bar_is_reported_as_corrupt() -> None:
    snaps = {"OK": _snap("OK", 5 * H), "NONE": _snap("NONE", None), "EDGE": _snap("EDGE", 6 * H),
             "AHEAD": _snap("AHEAD", 6 * H + 1)}
    bad = watermarks_ahead(snaps, 6 * H, lambda s: f"k:{s}:m")
    assert set(bad) == {"AHEAD"}
    err = bad["AHEAD"]
    assert err.symbol == "AHEAD" and err.reason == "bad_watermark" and not err.retriable
    assert "k:AHEAD:m" in err.detail and "clock is behind" in err.detail


def test_a_bar_older_than_one_seen_earlier_in_the_stream_is_late() -> None:
    seen: dict[str, int] = {}
    plan_triggers([_rec("A", 5 * H, 1)], {"A": _snap("A", None)}, seen, conflate=False)
    plan = plan_triggers([_rec("A", 4 * H, 2)], {"A": _snap("A", None)}, seen, conflate=False)
    assert plan.jobs == [] and len(plan.late) == 1


def test_redelivery_after_a_restart_is_not_late() -> None:
    """After a crash the window may already hold newer bars, but a fresh process has seen nothing:
    bars above the watermark are forecast again in stream order."""
    plan = plan_triggers([_rec("A", 8 * H, 1), _rec("A", 9 * H, 2)], {"A": _snap("A", 7 * H)}, {},
                         conflate=False)
    assert [j.open_time for j in plan.jobs] == [8 * H, 9 * H]


def test_duplicate_bar_in_one_batch_gives_one_job() -> None:
    plan = plan_triggers([_rec("A", H, 1), _rec("A", H, 2)], {"A": _snap("A", None)}, {}, conflate=False)
    assert len(plan.jobs) == 1 and sorted(o for _, o in plan.jobs[0].offsets) == [1, 2]


async def test_batcher_releases_full_batches_at_once_and_partial_ones_after_the_wait() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_size=3, max_wait_ms=80)
    for i in range(4):
        b.add(i)
    t0 = time.monotonic()
    assert await b.next_batch() == [0, 1, 2]
    assert time.monotonic() - t0 < 0.05
    assert await b.next_batch() == [3]
    assert time.monotonic() - t0 >= 0.07


async def test_batcher_wakes_when_an_item_arrives() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_ms=10_000)
    task = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0.01)
    b.add(1)
    b.add(2)
    assert await asyncio.wait_for(task, 1.0) == [1, 2]


def test_batcher_remove_if() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_size=10, max_wait_ms=10)
    for i in range(5):
        b.add(i)
    assert b.remove_if(lambda x: x % 2 == 0) == [0, 2, 4]
    assert b.take_all() == [1, 3]


def _forecast(open_time: int, close: float, q: tuple[float, ...]) -> Forecast:
    h = HorizonStats(H, 1, 0.0, 0.01, q, 0.5, close, tuple(close * np.exp(v) for v in q))
    return Forecast("A", open_time, close, (h,), "dpmpp", 10, 10, 4, 0, "m")


def test_online_scorer_scores_when_the_horizon_bar_arrives() -> None:
    s = OnlineScorer()
    q = (-0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02)
    s.add(_forecast(0, 1.0, q), np.array([[-0.01], [0.0], [0.01], [0.02]]))
    times = np.array([0, H], dtype=np.int64)
    only_origin = WindowSnapshot("A", times[:1], np.array([[1, 1, 1, 1.0, 1]]), None)
    assert s.observe(only_origin) == []
    realised = np.exp(0.015)
    window = WindowSnapshot("A", times, np.array([[1, 1, 1, 1.0, 1], [1, 1, 1, realised, 1]]), None)
    [(label, crps, hits)] = s.observe(window)
    assert label == "1h"
    samples = np.array([-0.01, 0.0, 0.01, 0.02])
    expected = np.mean(np.abs(samples - 0.015)) - 0.5 * np.mean(np.abs(samples[:, None] - samples[None, :]))
    assert crps == pytest.approx(expected)
    assert hits == {"50": False, "80": False, "90": True}
    assert s.observe(window) == []  # scored once only
    assert s.summary()["1h"]["coverage_90"] == 1.0


def test_trivial_engine_is_a_normal_with_the_windows_realised_volatility() -> None:
    from worker.features.candles import CandleSeries
    from worker.model.forecaster import ForecastRequest
    from worker.service.engine import TrivialEngine

    rng = np.random.default_rng(3)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 1e-3, 20)))
    ohlcv = np.column_stack([close, close * 1.001, close * 0.999, close, np.ones(20)])
    series = CandleSeries(np.arange(20, dtype=np.int64) * H, ohlcv)
    engine = TrivialEngine(timeframe_ms=H, horizons_ms=[H, 4 * H], window_bars=8)
    result = engine.process([ForecastRequest("X", series), ForecastRequest("Y", series[:5])])
    assert [i for i, _ in result.rejected] == [1]  # 5 bars < 8: insufficient history
    (fc,) = result.forecasts
    sigma = float(np.sqrt(np.mean(np.diff(np.log(close[-8:])) ** 2)))
    assert fc.close == close[-1] and fc.open_time == 19 * H
    for h, bars in zip(fc.horizons, (1, 4), strict=True):
        assert h.bars == bars and h.std == pytest.approx(sigma * np.sqrt(bars), rel=1e-12)
        assert h.quantiles[3] == 0.0 and h.quantiles[0] == pytest.approx(-1.6448536 * h.std, rel=1e-6)
        assert h.price_quantiles == pytest.approx(tuple(close[-1] * np.exp(q) for q in h.quantiles))


@pytest.mark.parametrize(("timestamp", "expected"), [(1_700_000_000_123, 1_700_000_000_123), (0, 0),
                                                     (-1, 42), (None, 42)])
def test_ingest_time_is_the_record_timestamp_or_arrival_for_none(timestamp: int | None, expected: int) -> None:
    """Kafka's -1 ("no timestamp") and a record of the old message format (no timestamp field at all,
    which aiokafka gives as None) both take the arrival time: the forecast contract needs ingest_time >= 0."""
    rec: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="candles", partition=0, offset=7, timestamp=timestamp, timestamp_type=0, key=b"EURUSD",
        value=b"", checksum=None, serialized_key_size=6, serialized_value_size=0, headers=())
    assert ingest_time(rec, now_ms=42) == expected

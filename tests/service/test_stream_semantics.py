"""What the worker does with corrections, duplicates, in-progress bars and replays."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis

from schemas import CandleEvent

from .conftest import (
    TF_MS,
    Collector,
    RunningWorker,
    WorkerEnv,
    eventually,
    forecastable,
    interleave,
    metric,
    publish_events,
    publish_raw,
    synthetic_events,
    trivial_engine,
)

pytestmark = pytest.mark.integration


def changed(ev: CandleEvent, **update: object) -> CandleEvent:
    return ev.model_copy(update=update)


async def test_late_duplicate_and_partial_candles(wenv1: WorkerEnv) -> None:
    # One partition, so the order of everything below is the order the worker sees.
    env = wenv1
    bars = synthetic_events("LATE", 14)
    other = synthetic_events("OTHER", 10)
    engine = trivial_engine()
    settings = env.settings()
    async with Collector(env.bootstrap, env.output) as out:
        async with RunningWorker(settings, engine) as w:
            await publish_events(env.bootstrap, env.input, bars[:12])
            first = forecastable(bars[:12], engine.window_bars)
            await out.wait_for(lambda: set(out.bars()) >= first, "forecasts of bars 7..11")
            await out.settle(quiet_s=0.5)
            n_before = len(out.records)
            assert n_before == len(first)

            corrected = changed(bars[5], close=bars[5].close * 1.01, high=max(bars[5].high, bars[5].close * 1.01))
            partial_next = changed(bars[12], close=bars[12].close * 0.99, low=min(bars[12].low, bars[12].close * 0.99),
                                   is_final=False)
            partial_old = changed(bars[3], close=bars[3].close * 1.02, high=max(bars[3].high, bars[3].close * 1.02),
                                  is_final=False)
            late_batch = [
                corrected,  # a correction of an older bar: window updated, no forecast
                bars[9],  # a duplicate of an older, already forecast bar
                bars[11],  # a duplicate of the newest bar, already forecast
                partial_next,  # an in-progress update of the next bar: never stored, never forecast
                partial_old,  # an in-progress update of an old bar: never stored either
            ]
            await publish_events(env.bootstrap, env.input, late_batch)
            await eventually(lambda: metric(w, "signal_worker_late_candles_total") >= 3
                             and metric(w, "signal_worker_candles_total", {"kind": "partial"}) >= 2,
                             "the late and partial candles to be consumed")
            await eventually(lambda: w.tracker.pending_count() == 0, "their offsets done")

            snap = await w.store.read("LATE")
            assert snap.open_times().tolist() == [b.open_time for b in bars[:12]]  # no bar 12 stored
            row5 = snap.ohlcv()[5].tolist()
            assert row5 == [corrected.open, corrected.high, corrected.low, corrected.close, corrected.volume]
            row3 = snap.ohlcv()[3].tolist()
            assert row3 == [bars[3].open, bars[3].high, bars[3].low, bars[3].close, bars[3].volume]
            assert snap.watermark == bars[11].open_time

            # The final bar 12 after all that: forecast once, from the final values and the corrected window.
            await publish_events(env.bootstrap, env.input, [bars[12], *other])
            await out.wait_for(lambda: ("LATE", bars[12].open_time) in set(out.bars()), "the forecast of bar 12")
            await out.wait_for(lambda: ("OTHER", other[-1].open_time) in set(out.bars()), "OTHER's forecasts")
            await out.settle(quiet_s=0.5)
            late_fc = [(m.open_time, m.close) for m in out.forecasts() if m.symbol == "LATE"]
            assert sorted(t for t, _ in late_fc) == [*sorted(t for _, t in first), bars[12].open_time], (
                "late, duplicate and partial candles must not trigger forecasts")
            assert dict(late_fc)[bars[12].open_time] == bars[12].close
            assert metric(w, "signal_worker_late_candles_total") == 3
            assert metric(w, "signal_worker_candles_total", {"kind": "partial"}) == 2
            snap = await w.store.read("LATE")
            assert snap.ohlcv()[12].tolist() == [bars[12].open, bars[12].high, bars[12].low, bars[12].close,
                                                 bars[12].volume]
            assert snap.ohlcv()[5].tolist()[3] == corrected.close

        # A fresh worker has forgotten the stream, but the watermarks in Redis say what was forecast:
        # replaying the whole topic (a new group from offset 0), plus a duplicate of bar 12 and a
        # late bar 8, yields no forecast at all.
        n_before = len(out.records)
        await publish_events(env.bootstrap, env.input, [bars[12], bars[8]])
        total_final = 12 + 3 + 1 + len(other) + 2
        # Another group is another deployment unless it names the same namespace (docs/state.md).
        again = env.settings(kafka={"consumer_group": env.group + "-again"},
                             redis={"namespace": f"{env.group}@1h"})
        async with RunningWorker(again, engine) as w2:
            await eventually(lambda: metric(w2, "signal_worker_candles_total", {"kind": "final"}) == total_final
                             and w2.tracker.pending_count() == 0, "the replay of the whole topic")
            assert metric(w2, "signal_worker_late_candles_total") == total_final
            assert metric(w2, "signal_worker_forecasts_total") == 0
        await out.settle(quiet_s=0.5)
        assert len(out.records) == n_before


async def test_replaying_the_same_events_leaves_identical_windows(wenv: WorkerEnv) -> None:
    """Redis ``DUMP`` of every window key is byte-identical after the same events are replayed, by
    the same worker (duplicates on the topic) and by a fresh one (a new group from offset 0)."""
    symbols = ["RPA", "RPB", "RPC", "RPD"]
    # More bars than the window holds, so replays also go through the trimming path.
    per_symbol = [synthetic_events(s, 40) for s in symbols]
    events = interleave(per_symbol)
    engine = trivial_engine()
    client = aredis.Redis.from_url(wenv.redis_url)

    async def dump() -> dict[bytes, bytes | None]:
        keys = sorted([k async for k in client.scan_iter(match=f"{wenv.prefix}:*", count=1000)
                       if not k.endswith(b":epoch")])  # the deployment's epoch marker (docs/state.md)
        assert len(keys) == 2 * len(symbols), keys  # a window and a watermark per symbol
        return {k: await client.dump(k) for k in keys}

    settings = wenv.settings(window={"length": 32})
    try:
        async with RunningWorker(settings, engine) as w:
            # In two halves, each shorter than the window (a longer backlog is another test's bug).
            half = len(events) // 2
            for end in (half, len(events)):
                await publish_events(wenv.bootstrap, wenv.input, events[end - half : end])
                n = len(forecastable(events[:end], engine.window_bars))
                await eventually(lambda n=n: metric(w, "signal_worker_forecasts_total") == n
                                 and w.tracker.pending_count() == 0, f"{n} forecasts")
            first = await dump()
            for s, evs in zip(symbols, per_symbol, strict=True):
                snap = await w.store.read(s)
                assert snap.open_times().tolist() == [e.open_time for e in evs[-32:]]

            await publish_events(wenv.bootstrap, wenv.input, events)  # the same events again
            await eventually(lambda: metric(w, "signal_worker_candles_total", {"kind": "final"}) == 2 * len(events)
                             and w.tracker.pending_count() == 0, "the second pass")
            assert metric(w, "signal_worker_late_candles_total") == len(events)
            assert await dump() == first

        # A fresh group replays the topic from the start (both copies) through a new worker.
        again = wenv.settings(window={"length": 32}, kafka={"consumer_group": wenv.group + "-replay"},
                              redis={"namespace": f"{wenv.group}@1h"})  # the same deployment's state
        async with RunningWorker(again, engine) as w2:
            await eventually(lambda: metric(w2, "signal_worker_candles_total", {"kind": "final"}) == 2 * len(events)
                             and w2.tracker.pending_count() == 0, "the replay")
            assert metric(w2, "signal_worker_forecasts_total") == 0  # the watermarks say it is all done
            assert await dump() == first
    finally:
        await client.aclose()


async def test_conflation_forecasts_only_the_newest_bar_of_a_backlog(wenv: WorkerEnv) -> None:
    symbols = ["CFA", "CFB", "CFC"]
    per_symbol = [synthetic_events(s, 30) for s in symbols]
    events = interleave(per_symbol)
    engine = trivial_engine()
    async with Collector(wenv.bootstrap, wenv.output) as out:
        await publish_events(wenv.bootstrap, wenv.input, events)  # a backlog before the worker starts
        settings = wenv.settings(window={"conflate": True})
        async with RunningWorker(settings, engine) as w:
            await eventually(lambda: metric(w, "signal_worker_candles_total", {"kind": "final"}) == len(events)
                             and w.tracker.pending_count() == 0, "the backlog")
            await out.wait_for(lambda: {(s, evs[-1].open_time) for s, evs in zip(symbols, per_symbol, strict=True)}
                               <= set(out.bars()), "every symbol's newest bar forecast")
            await out.settle(quiet_s=0.5)
            forecasts = metric(w, "signal_worker_forecasts_total")
            conflated = metric(w, "signal_worker_conflated_total")
            skipped = metric(w, "signal_worker_skipped_total", {"reason": "insufficient_history"})
            late = metric(w, "signal_worker_late_candles_total")
            assert len(out.records) == forecasts < len(forecastable(events, 8))
            assert conflated > 0
            # Every consumed bar is accounted for: forecast, skipped, conflated or late.
            assert forecasts + skipped + conflated + late == len(events)


async def test_two_symbols_interleaved_bar_by_bar_live(wenv: WorkerEnv) -> None:
    """A live feed (one bar per symbol at a time, each after the previous forecast): every bar is
    forecast exactly once and in order, and the forecast close is the bar's close."""
    symbols = ["LVA", "LVB"]
    per_symbol = [synthetic_events(s, 14) for s in symbols]
    engine = trivial_engine()
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(wenv.settings(), engine):
        for i in range(14):
            await publish_events(wenv.bootstrap, wenv.input, [evs[i] for evs in per_symbol])
            if i >= 7:
                await out.wait_count(2 * (i - 6))
        await out.settle(quiet_s=0.5)
        for s, evs in zip(symbols, per_symbol, strict=True):
            got = [(m.open_time, m.close) for m in out.forecasts() if m.symbol == s]
            assert got == [(e.open_time, e.close) for e in evs[7:]]
        assert all(m.event_time - m.open_time == TF_MS for m in out.forecasts())
        await asyncio.sleep(0)


async def test_batches_compressed_with_every_kafka_codec_are_forecast(wenv: WorkerEnv) -> None:
    """A feed may compress its batches (producer or topic ``compression.type``). Without the codec
    libraries, one zstd batch raised UnsupportedCodecError out of the fetch: the worker exited, and
    did so again after every restart, on every replica in turn."""
    from schemas import encode_candle

    codecs = ["gzip", "snappy", "lz4", "zstd"]
    per_symbol = {c: synthetic_events(f"Z{c.upper()}", 12) for c in codecs}
    engine = trivial_engine()
    expected = {b for evs in per_symbol.values() for b in forecastable(evs, engine.window_bars)}
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(wenv.settings(), engine) as w:
        for c, events in per_symbol.items():
            await publish_raw(wenv.bootstrap, wenv.input, [(ev.symbol.encode(), encode_candle(ev)) for ev in events],
                              compression_type=c)
        await out.wait_for(lambda: set(out.bars()) >= expected, "every codec's bars forecast")
        assert w.readiness_detail()[0], w.readiness_detail()

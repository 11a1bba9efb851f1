"""End to end: N symbols in, exactly the expected set of forecasts out, each one schema-valid."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas import FORECAST_SCHEMA_VERSION, ForecastMessage
from schemas.headers import IDEMPOTENCY_KEY, MODEL_VERSION, SCHEMA_VERSION, header_value, idempotency_key
from worker.cli.service_commands import build_engine
from worker.state.windows import WindowStore

from .conftest import (
    MODEL_SAMPLING,
    TF,
    TF_MS,
    Collector,
    RunningWorker,
    WorkerEnv,
    forecastable,
    interleave,
    metric,
    model_events,
    needs_model,
    publish_events,
    synthetic_events,
    trivial_engine,
)

pytestmark = pytest.mark.integration


def check_record(rec, model_version: str) -> ForecastMessage:  # type: ignore[no-untyped-def]
    from schemas import decode_forecast

    msg = decode_forecast(rec.value)  # raises on anything off-contract
    assert rec.key == msg.symbol.encode()
    assert msg.timeframe == TF
    assert msg.event_time == msg.open_time + TF_MS
    assert msg.model_version == model_version
    headers = list(rec.headers)
    assert header_value(headers, SCHEMA_VERSION) == str(FORECAST_SCHEMA_VERSION).encode()
    assert header_value(headers, MODEL_VERSION) == model_version.encode()
    assert header_value(headers, IDEMPOTENCY_KEY) == (
        f"{msg.symbol}:{TF}:{msg.open_time}:{model_version}".encode()
    )
    assert header_value(headers, IDEMPOTENCY_KEY) == idempotency_key(msg.symbol, TF, msg.open_time,
                                                                     model_version).encode()
    return msg


async def test_many_symbols_trivial_engine_exact_forecast_set(wenv: WorkerEnv) -> None:
    symbols = [f"S{i:03d}" for i in range(40)]
    per_symbol = [synthetic_events(s, 24) for s in symbols]
    events = interleave(per_symbol)
    engine = trivial_engine()
    expected = forecastable(events, engine.window_bars)
    assert len(expected) == 40 * (24 - 7)

    settings = wenv.settings(window={"length": 32}, batch={"max_size": 64, "max_wait_ms": 10})
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(settings, engine) as w:
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_count(len(expected))
        await out.settle()
        msgs = [check_record(r, engine.model_version) for r in out.records]
        got = [(m.symbol, m.open_time) for m in msgs]
        # Conflation is off and nothing crashed: exactly one forecast per forecastable bar.
        assert set(got) == expected
        assert len(got) == len(expected), [b for b, n in Counter(got).items() if n > 1][:10]
        for m in msgs:
            assert m.close == next(e.close for e in per_symbol[symbols.index(m.symbol)] if e.open_time == m.open_time)
            assert [h.horizon_minutes for h in m.horizons] == [60, 240]
        assert metric(w, "signal_worker_forecasts_total") == len(expected)
        assert metric(w, "signal_worker_candles_total", {"kind": "final"}) == len(events)
        assert metric(w, "signal_worker_skipped_total", {"reason": "insufficient_history"}) == 40 * 7

        # Every input record is committed.
        from .conftest import wait_all_committed

        await wait_all_committed(wenv, metas, "every input offset committed")
        store: WindowStore = w.store
        snap = await store.read("S000")
        assert snap.open_times().tolist() == [e.open_time for e in per_symbol[0]]


async def test_backlog_longer_than_the_window_is_still_forecast_bar_by_bar(wenv: WorkerEnv) -> None:
    """Conflation off: a backlog of more bars per symbol than the Redis window holds, fetched in one
    poll, must still yield one forecast per bar; each bar's forecast needs only the
    ``window_bars`` bars before it, which were all in the stream."""
    symbols = ["AAA", "BBB"]
    per_symbol = [synthetic_events(s, 80) for s in symbols]
    events = interleave(per_symbol)
    engine = trivial_engine()
    expected = forecastable(events, engine.window_bars)

    settings = wenv.settings(window={"length": 32}, batch={"max_size": 256, "max_wait_ms": 10})
    async with Collector(wenv.bootstrap, wenv.output) as out:
        # Published before the worker starts, so its first fetch brings the whole backlog.
        await publish_events(wenv.bootstrap, wenv.input, events)
        async with RunningWorker(settings, engine) as w:
            from .conftest import eventually

            await eventually(lambda: metric(w, "signal_worker_candles_total", {"kind": "final"}) == len(events),
                             "all candles consumed")
            await eventually(lambda: w.tracker.pending_count() == 0, "all work done")
            await out.settle()
            skipped = metric(w, "signal_worker_skipped_total", {"reason": "insufficient_history"})
            got = set(out.bars())
            missing = sorted(expected - got)
            assert not missing, (f"{len(missing)} of {len(expected)} bars never forecast "
                                 f"(skipped as insufficient_history: {skipped:g}); first {missing[:5]}")


@needs_model
async def test_real_model_few_symbols_exact_forecast_set(wenv: WorkerEnv) -> None:
    settings = wenv.settings(sampling=MODEL_SAMPLING, window={"length": 256},
                             batch={"max_size": 16, "max_wait_ms": 20})
    engine = build_engine(settings)
    n_extra = 6
    symbols = ["EURUSD", "SIM1", "SIM2"]
    per_symbol = [model_events(s, engine.window_bars + n_extra, i) for i, s in enumerate(symbols)]
    events = interleave(per_symbol)
    expected = forecastable(events, engine.window_bars)
    assert len(expected) == len(symbols) * (n_extra + 1)

    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(settings, engine) as w:
        await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_count(len(expected), timeout=120)
        await out.settle()
        msgs = [check_record(r, engine.model_version) for r in out.records]
        got = [(m.symbol, m.open_time) for m in msgs]
        assert set(got) == expected
        assert len(got) == len(expected)
        for m in msgs:
            assert m.scheduler == engine.scheduler and m.steps == 4 and m.samples == 16
            assert [h.horizon_minutes * 60_000 for h in m.horizons] == engine.horizons_ms
            for h in m.horizons:
                q = [h.price_quantiles[k] for k in ("q05", "q50", "q95")]
                assert q == sorted(q) and all(v > 0 for v in q)
                assert 0.5 * m.close < q[1] < 2 * m.close
        assert metric(w, "signal_worker_forecasts_total") == len(expected)


@needs_model
async def test_horizons_past_the_weekend_close_are_left_out_and_the_last_bar_skipped(wenv: WorkerEnv) -> None:
    """Real EURUSD hours up to the week's last bar (Friday 2017-01-13 16:00 New York) through the
    real worker and model: from 13:00 on, the 4-h horizon would end after the 17:00 close and is left
    out of the messages; the last bar, whose every horizon would, is not forecast (skipped as
    market_closed), and its offset is still committed."""
    from worker.cli.service_commands import SHIPPED_CANDLES, candle_events
    from worker.features.candles import load_csv

    from .conftest import wait_all_committed

    settings = wenv.settings(sampling=MODEL_SAMPLING, window={"length": 256},
                             batch={"max_size": 16, "max_wait_ms": 20})
    engine = build_engine(settings)
    last = 239  # 2017-01-13T21:00Z, 16:00 EST: the bar that ends the week
    hours = load_csv(SHIPPED_CANDLES)[last + 1 - engine.window_bars - 3 : last + 1]
    events = candle_events(hours, "EURUSD", TF)
    async with Collector(wenv.bootstrap, wenv.output) as out, RunningWorker(settings, engine) as w:
        metas = await publish_events(wenv.bootstrap, wenv.input, events)
        await out.wait_count(3, timeout=120)
        await wait_all_committed(wenv, metas, "every offset, the skipped bar's too")
        await out.settle(quiet_s=1.0)
        msgs = sorted((check_record(r, engine.model_version) for r in out.records), key=lambda m: m.open_time)
        assert [m.open_time for m in msgs] == [int(t) for t in hours.open_time[-4:-1]]  # 13:00, 14:00, 15:00
        assert all([h.horizon_minutes for h in m.horizons] == [60] for m in msgs)
        assert metric(w, "signal_worker_skipped_total", {"reason": "market_closed"}) == 1

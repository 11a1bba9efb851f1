"""The Forecaster end to end on a tiny random-weights checkpoint and the real EURUSD year."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from schemas.timeframe import parse_horizons
from worker.errors import InsufficientHistory, TimeframeError
from worker.features.candles import CandleSeries
from worker.model.checkpoint import Checkpoint, load_checkpoint
from worker.model.forecaster import Forecaster, ForecastRequest, noise_seed
from worker.model.summary import QUANTILE_LEVELS

HOUR_MS, MIN_MS = 3_600_000, 60_000
FAST = {"num_samples": 64, "num_steps": 5}


@pytest.fixture(scope="module")
def fc(tiny_ckpt: Checkpoint) -> Forecaster:
    return Forecaster(tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def books(eurusd: CandleSeries) -> dict[str, CandleSeries]:
    """Three 'symbols' with different histories and origins (all valid forecast origins: bar 2999
    would be the last of a week, 2017-06-23 16:00 New York, which nothing forecasts across)."""
    return {"EURUSD": eurusd[:5000], "EURUSD.b": eurusd[:2990], "EURUSD.c": eurusd[1000:2000]}


# -- determinism and batch independence --------------------------------------------------------------


def test_same_inputs_and_seed_give_identical_forecasts(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    a = fc.forecast(books, seed=7, **FAST)
    b = fc.forecast(books, seed=7, **FAST)
    assert a == b  # frozen dataclasses of floats: exact equality


def test_different_seeds_differ(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    a = fc.forecast(books, seed=1, **FAST)["EURUSD"]
    b = fc.forecast(books, seed=2, **FAST)["EURUSD"]
    assert a.seed != b.seed
    assert a.horizons[0].quantiles != b.horizons[0].quantiles


def _stats(f: object) -> np.ndarray:
    return np.array([[h.mean, h.std, h.p_up, h.price_mean, *h.quantiles] for h in f.horizons])  # type: ignore[attr-defined]


@pytest.mark.parametrize("scheduler", ["dpmpp", "kdpm2"])
def test_forecast_alone_equals_forecast_in_a_batch(
    fc: Forecaster, books: dict[str, CandleSeries], scheduler: str
) -> None:
    f = fc.with_scheduler(scheduler)
    together = f.forecast(books, seed=3, **FAST)
    for symbol, candles in books.items():
        alone = f.forecast({symbol: candles}, seed=3, **FAST)[symbol]
        np.testing.assert_allclose(_stats(alone), _stats(together[symbol]), rtol=1e-5, atol=1e-5, err_msg=symbol)
        assert alone.seed == together[symbol].seed


def test_seed_is_per_symbol_and_bar(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    out = fc.forecast(books, seed=5, **FAST)
    for symbol, f in out.items():
        assert f.seed == noise_seed(5, symbol, int(books[symbol].open_time[-1]))
    assert len({f.seed for f in out.values()}) == len(books)
    # The same history under two names is two symbols: different noise, different samples.
    twins = fc.forecast({"A": books["EURUSD"], "B": books["EURUSD"]}, seed=5, **FAST)
    assert twins["A"].horizons[0].quantiles != twins["B"].horizons[0].quantiles


def test_all_symbols_and_samples_go_through_the_network_as_one_tensor(
    tiny_ckpt_dir: object, books: dict[str, CandleSeries]
) -> None:
    ckpt = load_checkpoint(tiny_ckpt_dir)  # a private copy: this test wraps its methods
    model = ckpt.model
    seen: dict[str, list[int]] = {"encode": [], "denoise": []}
    real_encode, real_denoise = model.encode, model.denoise

    def encode(feats: torch.Tensor, ctime: torch.Tensor) -> torch.Tensor:
        seen["encode"].append(feats.shape[0])
        return real_encode(feats, ctime)

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ftime: torch.Tensor) -> torch.Tensor:
        seen["denoise"].append(x.shape[0])
        assert cond.shape[0] == ftime.shape[0] == t.shape[0] == x.shape[0]
        return real_denoise(x, t, cond, ftime)

    model.encode, model.denoise = encode, denoise  # type: ignore[method-assign]
    samples = 48
    for scheduler, steps in (("dpmpp", 6), ("kdpm2", 4)):
        seen["encode"].clear()
        seen["denoise"].clear()
        out = Forecaster(ckpt, device="cpu", scheduler=scheduler).forecast(
            books, num_samples=samples, num_steps=steps, seed=0
        )
        assert seen["encode"] == [len(books)]  # the context is encoded once per symbol, not per step
        assert seen["denoise"] == [len(books) * samples] * len(seen["denoise"])
        nfe = next(iter(out.values())).nfe
        assert nfe == len(seen["denoise"])  # NFE as reported is the number of network calls made
        assert nfe == (2 * steps - 1 if scheduler == "kdpm2" else steps)


# -- output sanity ---------------------------------------------------------------------------------


def test_forecast_output_is_coherent(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    out = fc.forecast(books, num_samples=200, num_steps=8, seed=11)
    assert set(out) == set(books)
    for symbol, f in out.items():
        candles = books[symbol]
        assert f.symbol == symbol
        assert f.open_time == int(candles.open_time[-1]) and f.close == float(candles.close[-1])
        assert (f.scheduler, f.steps, f.nfe, f.samples) == ("dpmpp", 8, 8, 200)
        assert f.model_version == fc.model_version
        assert [h.horizon_ms for h in f.horizons] == [HOUR_MS, 4 * HOUR_MS]
        assert [h.bars for h in f.horizons] == [1, 4]
        assert [h.horizon_minutes for h in f.horizons] == [60, 240]
        for h in f.horizons:
            q = np.array(h.quantiles)
            assert len(q) == len(QUANTILE_LEVELS) and np.isfinite(q).all()
            assert (np.diff(q) >= 0).all()
            np.testing.assert_allclose(h.price_quantiles, f.close * np.exp(q), rtol=1e-12)
            assert (np.diff(h.price_quantiles) >= 0).all()
            assert 0.0 <= h.p_up <= 1.0
            assert h.std > 0 and np.isfinite(h.mean)
            assert h.price_mean > 0


def test_horizons_are_read_off_one_path(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    """Asking for fewer horizons changes nothing about the ones asked for: every horizon comes from the
    same sampled paths."""
    both = fc.forecast(books, horizons="1h,4h", seed=4, **FAST)
    for symbol in books:
        one = fc.forecast(books, horizons="1h", seed=4, **FAST)[symbol]
        four = fc.forecast(books, horizons=[4 * HOUR_MS], seed=4, **FAST)[symbol]
        # Same samples; only the float32 reduction order of the mean may differ.
        np.testing.assert_allclose(_stats(one)[0], _stats(both[symbol])[0], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(_stats(four)[0], _stats(both[symbol])[1], rtol=1e-6, atol=1e-12)
        two = fc.forecast({symbol: books[symbol]}, horizons="2h", seed=4, **FAST)[symbol]
        assert two.horizons[0].bars == 2


def test_known_distribution_end_to_end(tiny_ckpt: Checkpoint, books: dict[str, CandleSeries]) -> None:
    """With a zero output layer (how training initialises it) the network predicts v = 0 everywhere, which
    is the exact denoiser for a standard normal path. So each bar's normalised return is N(0, 1),
    independent across bars, and the forecast must be per-bar N(target_mean, target_std²) · origin vol:
    the 1h distribution has std target_std·vol and the 4h one twice that (sqrt of 4 independent bars)."""
    model = load_checkpoint_model_with_zero_head(tiny_ckpt)
    fc = Forecaster(dataclasses.replace(tiny_ckpt, model=model), device="cpu")
    norm = tiny_ckpt.norm
    batch = fc.prepare([ForecastRequest("EURUSD", books["EURUSD"])])
    vol = float(batch.contexts.origin_vol[0])  # type: ignore[union-attr]
    f = fc.run(batch, num_samples=4000, num_steps=20, seed=0)[0]
    h1, h4 = f.horizons
    unit = norm.target_std * vol
    assert h1.std == pytest.approx(unit, rel=0.05)
    assert h4.std == pytest.approx(2 * unit, rel=0.05)
    assert h1.mean == pytest.approx(norm.target_mean * vol, abs=0.1 * unit)
    assert h4.mean == pytest.approx(4 * norm.target_mean * vol, abs=0.2 * unit)
    assert h1.p_up == pytest.approx(0.5, abs=0.05)
    assert h4.std > h1.std


def load_checkpoint_model_with_zero_head(ckpt: Checkpoint) -> torch.nn.Module:
    model = type(ckpt.model)(ckpt.network)
    model.load_state_dict(ckpt.model.state_dict())
    with torch.no_grad():
        model.proj.weight.zero_()
        model.proj.bias.zero_()
    return model.eval()


# -- history and timeframes ------------------------------------------------------------------------


def test_short_history_is_rejected_with_a_reason(fc: Forecaster, eurusd: CandleSeries) -> None:
    short = eurusd[: fc.window_bars - 1]
    batch = fc.prepare([ForecastRequest("OK", eurusd[:2990]), ForecastRequest("SHORT", short)])
    assert [r.symbol for r in batch.requests] == ["OK"]
    assert batch.rejected[1].reason == "insufficient_history"
    with pytest.raises(InsufficientHistory, match="insufficient_history"):
        fc.forecast({"SHORT": short}, **FAST)
    assert len(fc.run(batch, **FAST)) == 1


def test_window_with_a_hole_is_rejected(fc: Forecaster, eurusd: CandleSeries) -> None:
    christmas = eurusd.upto(1514239200000)  # 2017-12-25T22:00Z, the bar after a 14-bar hole
    batch = fc.prepare([ForecastRequest("XMAS", christmas)])
    assert batch.contexts is None and batch.rejected[0].reason == "too_many_missing_bars"
    assert fc.run(batch, **FAST) == []


def test_only_the_last_window_bars_matter(fc: Forecaster, eurusd: CandleSeries) -> None:
    long, short = eurusd[:4000], eurusd[4000 - fc.window_bars : 4000]
    a = fc.forecast({"X": long}, seed=9, **FAST)["X"]
    b = fc.forecast({"X": short}, seed=9, **FAST)["X"]
    np.testing.assert_allclose(_stats(a), _stats(b), rtol=1e-5, atol=1e-7)


def test_timeframe_mismatch_is_refused_unless_allowed(tiny_ckpt: Checkpoint, tiny_ckpt_dir: object) -> None:
    with pytest.raises(TimeframeError, match=r"trained on 1h bars; refusing to serve 5m"):
        Forecaster(tiny_ckpt, device="cpu", timeframe_ms=5 * MIN_MS)
    with pytest.raises(TimeframeError, match="allow_timeframe_mismatch"):
        Forecaster.load(tiny_ckpt_dir, device="cpu", timeframe="5m")  # type: ignore[arg-type]
    # Allowed: horizons are then whole 5m bars within the model's 4 bars.
    fc5 = Forecaster(tiny_ckpt, device="cpu", timeframe_ms=5 * MIN_MS, allow_timeframe_mismatch=True,
                     horizons=[5 * MIN_MS, 20 * MIN_MS])
    assert fc5.horizon_bars() == [1, 4]
    assert fc5.checkpoint.spec.timeframe_ms == 5 * MIN_MS
    assert tiny_ckpt.spec.timeframe_ms == HOUR_MS  # the shared checkpoint is untouched
    # Without explicit horizons the trained ones are bar counts (1 and 4 bars), labelled by what they
    # are on the served timeframe (5 and 20 minutes), never by the trained durations (1h and 4h).
    relabelled = Forecaster(tiny_ckpt, device="cpu", timeframe_ms=5 * MIN_MS, allow_timeframe_mismatch=True)
    assert relabelled.horizons_ms == [5 * MIN_MS, 20 * MIN_MS] and relabelled.horizon_bars() == [1, 4]
    # Explicit horizons beyond the model's 4 bars stay a clear error.
    with pytest.raises(TimeframeError, match="at most 4"):
        Forecaster(tiny_ckpt, device="cpu", timeframe_ms=5 * MIN_MS, allow_timeframe_mismatch=True,
                   horizons=[HOUR_MS])


@pytest.mark.parametrize(
    ("horizon", "match"),
    [("30m", r"30m is shorter than one 1h bar"), ("90m", r"1h30m|90m is not a whole number of 1h bars"),
     ("5h", r"5 bars; the model forecasts at most 4")],
)
def test_bad_horizons_are_timeframe_errors(
    fc: Forecaster, tiny_ckpt: Checkpoint, tiny_ckpt_dir: object, books: dict[str, CandleSeries],
    horizon: str, match: str,
) -> None:
    with pytest.raises(TimeframeError, match=match):
        fc.forecast(books, horizons=horizon, **FAST)
    with pytest.raises(TimeframeError, match=match):
        Forecaster.load(tiny_ckpt_dir, device="cpu", horizons=horizon)  # type: ignore[arg-type]
    # the batch API and the backtest's path too (they once indexed past the path: IndexError)
    batch = fc.prepare([ForecastRequest(s, c) for s, c in books.items()])
    for call in (fc.run, fc.run_with_samples):
        with pytest.raises(TimeframeError, match=match):
            call(batch, horizons=parse_horizons(horizon), **FAST)


def test_repeated_horizons_in_the_batch_api_are_served_once(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    batch = fc.prepare([ForecastRequest(s, c) for s, c in books.items()])
    twice = fc.run(batch, horizons=[4 * HOUR_MS, HOUR_MS, HOUR_MS], **FAST)
    assert [h.horizon_ms for h in twice[0].horizons] == [HOUR_MS, 4 * HOUR_MS]
    assert twice == fc.run(batch, horizons=[HOUR_MS, 4 * HOUR_MS], **FAST)


def test_a_horizon_without_calibration_is_served_with_a_warning(books: dict[str, CandleSeries]) -> None:
    """fx-5m's spread factors were fitted at 15m, 1h and 4h: a 30m forecast is the raw model's."""
    import warnings

    from worker.data import fx

    fc = Forecaster.load(horizons="15m,30m,1h")
    assert fc.uncalibrated_horizons() is not None and "30m" in fc.uncalibrated_horizons()  # type: ignore[operator]
    assert Forecaster.load().uncalibrated_horizons() is None
    assert Forecaster.load("eurusd-1h-v1").uncalibrated_horizons() is None  # no calibration at all
    if not fx.available():
        return
    eurusd = fx.load_pair("EURUSD", 300_000, end_ms=fx.TRAIN_END)[:-12]  # the last bar is Friday 16:55
    as_fitted = {"num_samples": 16, "num_steps": 10}  # the calibration's sampler setting: no other warning
    with pytest.warns(UserWarning, match=r"horizons 30m have no spread calibration"):
        fc.forecast({"EURUSD": eurusd}, **as_fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Forecaster.load().forecast({"EURUSD": eurusd}, **as_fitted, horizons="15m,1h")


def test_a_checkpoint_served_on_another_timeframe_keeps_its_calibration_by_bar_count() -> None:
    """The hourly checkpoint's factors were fitted at 1 and 4 bars. Served on 4-hour bars (allowed
    explicitly) its horizons are 4 h and 16 h: they get the 1- and 4-bar factors — a lookup by
    duration gave the 4-hour horizon the 4-bar factor, and the 16-hour one none."""
    hourly = Forecaster.load("eurusd-1h")
    trained = [hourly.spread_factor(h) for h in hourly.horizons_ms]
    assert all(f is not None for f in trained) and trained[0] != trained[1]
    for timeframe, timeframe_ms in (("4h", 4 * HOUR_MS), ("15m", 15 * MIN_MS), ("30m", 30 * MIN_MS)):
        served = Forecaster.load("eurusd-1h", timeframe=timeframe, allow_timeframe_mismatch=True)
        assert served.horizons_ms == [timeframe_ms, 4 * timeframe_ms]
        assert [served.spread_factor(h) for h in served.horizons_ms] == trained
        assert served.uncalibrated_horizons() is None
        assert served.spread_factor(2 * timeframe_ms) is None  # two bars: never fitted


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_steps": 0}, "num_steps must be a whole number >= 1, got 0"),
    ({"num_steps": -1}, "num_steps must be a whole number >= 1, got -1"),  # once ran as if 1
    ({"num_steps": 2.5}, "num_steps must be a whole number"),
    ({"num_samples": 1}, r"num_samples must be a whole number >= 2 \(a std and quantiles need two paths\), got 1"),
    ({"num_samples": 0}, "num_samples must be a whole number >= 2"),
    ({"num_samples": True}, "num_samples must be a whole number >= 2"),
])
def test_unusable_sample_or_step_counts_are_clear_errors(fc: Forecaster, books: dict[str, CandleSeries],
                                                          kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fc.forecast(books, **{**FAST, **kwargs})  # type: ignore[arg-type]


def test_numpy_integer_counts_are_accepted(fc: Forecaster, books: dict[str, CandleSeries]) -> None:
    counts = {"num_samples": np.int64(FAST["num_samples"]), "num_steps": np.int32(FAST["num_steps"])}
    assert fc.forecast(books, **counts) == fc.forecast(books, **FAST)  # type: ignore[arg-type]


def test_unknown_scheduler_is_refused(tiny_ckpt: Checkpoint) -> None:
    with pytest.raises(ValueError, match="unknown scheduler"):
        Forecaster(tiny_ckpt, device="cpu", scheduler="heun")


def test_with_scheduler_shares_the_weights(fc: Forecaster) -> None:
    other = fc.with_scheduler("unipc")
    assert other.scheduler == "unipc" and fc.scheduler == "dpmpp"
    assert other.checkpoint.model is fc.checkpoint.model
    assert other.horizons_ms == fc.horizons_ms


def _change_through_data(model: torch.nn.Module, what: str) -> None:
    from worker.model.s4d import S4D

    with torch.no_grad():
        if what == "s4d log_dt":  # the S4D kernels (encoder and denoiser)
            for m in model.modules():
                if isinstance(m, S4D):
                    m.log_dt.data.add_(0.7)
        elif what == "gate weight":  # the folded denoiser weights
            model.blocks[0].gate.weight.data.mul_(1.5)  # type: ignore[union-attr, index, operator]
        else:  # a single element, as a hand edit would change it: folded into the plan
            model.proj.weight.data.view(-1)[0] += 0.5  # type: ignore[operator]


@pytest.mark.parametrize("what", ["s4d log_dt", "gate weight", "one output element"])
def test_weight_change_through_data_between_calls_is_picked_up(
    tiny_ckpt_dir: object, books: dict[str, CandleSeries], what: str
) -> None:
    """No cache (S4D kernels, folded weights) may serve old weights on the next sampling call, even
    when the weights were changed through ``.data`` (which bypasses version counters)."""
    fc = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu")  # type: ignore[arg-type]
    before = fc.forecast(books, seed=5, **FAST)  # fills the caches
    _change_through_data(fc.checkpoint.model, what)
    after = fc.forecast(books, seed=5, **FAST)
    fresh = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu")  # type: ignore[arg-type]
    _change_through_data(fresh.checkpoint.model, what)
    expected = fresh.forecast(books, seed=5, **FAST)
    for symbol in books:
        assert not np.allclose(_stats(before[symbol]), _stats(expected[symbol]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(_stats(after[symbol]), _stats(expected[symbol]), rtol=1e-6, atol=1e-7)


def test_unchanged_weights_keep_their_caches_between_calls(tiny_ckpt_dir: object,
                                                           books: dict[str, CandleSeries]) -> None:
    """Folding the weights and computing the S4D kernels again on every call would cost a small
    call more than its sampling: with the weights unchanged the next call reuses them."""
    fc = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu")  # type: ignore[arg-type]
    model = fc.checkpoint.model
    first = fc.forecast(books, seed=5, **FAST)
    plan = next(iter(model._plan_cache.values()))
    again = fc.forecast(books, seed=5, **FAST)
    assert next(iter(model._plan_cache.values())) is plan
    for symbol in books:
        np.testing.assert_array_equal(_stats(again[symbol]), _stats(first[symbol]))


def test_a_weight_change_seen_by_one_thread_reaches_every_thread(tiny_ckpt_dir: object,
                                                                  books: dict[str, CandleSeries]) -> None:
    """The caches are per thread: after one thread has rebuilt its own for new weights, another
    thread's next call must still rebuild its caches, not take the first thread's rebuild as its own."""
    from concurrent.futures import ThreadPoolExecutor

    fc = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu")  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as other_thread:
        other_thread.submit(fc.forecast, books, seed=5, **FAST).result()  # its caches: old weights
        fc.forecast(books, seed=5, **FAST)
        _change_through_data(fc.checkpoint.model, "gate weight")
        fc.forecast(books, seed=5, **FAST)  # this thread notices and rebuilds
        after = other_thread.submit(fc.forecast, books, seed=5, **FAST).result()
    fresh = Forecaster(load_checkpoint(tiny_ckpt_dir), device="cpu")  # type: ignore[arg-type]
    _change_through_data(fresh.checkpoint.model, "gate weight")
    expected = fresh.forecast(books, seed=5, **FAST)
    for symbol in books:
        np.testing.assert_allclose(_stats(after[symbol]), _stats(expected[symbol]), rtol=1e-6, atol=1e-7)


def test_unusable_candles_are_set_aside_with_the_reason_and_the_rest_served(
    fc: Forecaster, books: dict[str, CandleSeries]
) -> None:
    """Candles given directly (Python API, a CSV) skip the record contract the live intake applies:
    a zero or infinite close once gave a forecast from that price, unsorted bars one from a shuffled
    window. Now they are set aside as InvalidCandles (an InsufficientHistory), naming the bar."""
    from worker.errors import InvalidCandles

    good = books["EURUSD"]
    zero = good.ohlcv.copy()
    zero[-1, 3] = 0.0
    shuffled = good.open_time.copy()
    shuffled[-2], shuffled[-1] = shuffled[-1], shuffled[-2]
    requests = [ForecastRequest("ZERO", CandleSeries(good.open_time, zero)), ForecastRequest("EURUSD", good),
                ForecastRequest("SHUFFLED", CandleSeries(shuffled, good.ohlcv)),
                ForecastRequest("EMPTY", good[:0])]
    batch = fc.prepare(requests)
    assert [r.symbol for r in batch.requests] == ["EURUSD"]
    assert sorted(batch.rejected) == [0, 2, 3]
    assert isinstance(batch.rejected[0], InvalidCandles) and "not finite and positive" in str(batch.rejected[0])
    assert isinstance(batch.rejected[2], InvalidCandles) and "do not strictly increase" in str(batch.rejected[2])
    assert batch.rejected[3].reason == "insufficient_history" and "no candles" in str(batch.rejected[3])
    with pytest.raises(InvalidCandles, match=r"ZERO: bar .* has a price that is not finite and positive"):
        fc.forecast({"ZERO": CandleSeries(good.open_time, zero)}, **FAST)


def test_bars_off_the_timeframe_grid_are_set_aside() -> None:
    """One-minute bars given to the 5-minute model once gave a normal-looking forecast (5-minute
    volatility read off 1-minute moves); bars a minute off the 5-minute grid likewise."""
    from worker.errors import InvalidCandles

    fc5 = Forecaster.load()
    n = fc5.checkpoint.spec.window_bars + 10
    t0 = 1_704_153_600_000  # 2024-01-02 00:00 UTC, a Tuesday
    rng = np.random.default_rng(3)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 2e-4, n)))
    ohlcv = np.column_stack([close, close * 1.0002, close * 0.9998, close, np.full(n, 5.0)])
    grid = t0 + 5 * MIN_MS * np.arange(n)
    requests = [ForecastRequest("FIVE", CandleSeries(grid, ohlcv)),
                ForecastRequest("ONE", CandleSeries(t0 + MIN_MS * np.arange(n), ohlcv)),
                ForecastRequest("SHIFTED", CandleSeries(grid + MIN_MS, ohlcv))]
    batch = fc5.prepare(requests)
    assert [r.symbol for r in batch.requests] == ["FIVE"]
    for i, symbol in ((1, "ONE"), (2, "SHIFTED")):
        err = batch.rejected[i]
        assert isinstance(err, InvalidCandles) and symbol in str(err), err
        assert "does not open on the 5m grid" in str(err), err


# -- the weekend close ------------------------------------------------------------------------------


def _friday_origin(series: CandleSeries, ny_hour: int) -> int:
    """Index of the first Friday bar of the year's second quarter opening at ``ny_hour`` New York time."""
    from worker.features.seasonal import market_clock, market_hour

    clock = market_clock(series.open_time, HOUR_MS)
    hour = market_hour(series.open_time)
    start = int(np.searchsorted(series.open_time, 1_491_004_800_000))  # 2017-04-01
    return next(i for i in range(start, len(series)) if clock.weekday[i] == 4 and hour[i] == ny_hour)


def test_horizons_ending_after_the_weekend_close_are_left_out(fc: Forecaster, eurusd: CandleSeries) -> None:
    """Friday 15:00 New York: the 1-h path ends at the 17:00 close, the 4-h one would end on Sunday
    (after a weekend gap no sample holds), so it is left out — the 1-h forecast is the same as
    without the rule. From the week's last bar (16:00) nothing is left: a clear error."""
    i = _friday_origin(eurusd, 15)
    book = {"EURUSD": eurusd[: i + 1]}
    ruled = fc.forecast(book, seed=5, **FAST)["EURUSD"]
    anyway = Forecaster(fc.checkpoint, device="cpu", weekend_close=False).forecast(book, seed=5, **FAST)["EURUSD"]
    assert [h.horizon_ms for h in ruled.horizons] == [HOUR_MS]
    assert [h.horizon_ms for h in anyway.horizons] == [HOUR_MS, 4 * HOUR_MS]
    assert ruled.horizons[0] == anyway.horizons[0]
    with pytest.raises(InsufficientHistory, match=r"weekend close \(Friday 17:00 New York\)") as err:
        fc.forecast({"EURUSD": eurusd[: i + 2]}, **FAST)
    assert err.value.reason == "market_closed"
    batch = fc.prepare([ForecastRequest("A", eurusd[: i + 2]), ForecastRequest("B", eurusd[: i + 1])])
    assert [r.symbol for r in batch.requests] == ["B"] and batch.rejected[0].reason == "market_closed"
    thursday = fc.forecast({"EURUSD": eurusd[: i + 1 - 24]}, **FAST)["EURUSD"]
    assert len(thursday.horizons) == 2


def test_the_market_closed_check_uses_the_horizons_asked_for() -> None:
    """Friday 16:50 New York on the 5-minute model: 15m (three bars) would end after the close, a
    5-minute horizon would not — asked for, it is served rather than refused."""
    fc5 = Forecaster.load(device="cpu")
    n = fc5.checkpoint.spec.window_bars + 10
    last = 1_704_491_400_000  # 2024-01-05T21:50Z, Friday 16:50 EST
    rng = np.random.default_rng(5)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 2e-4, n)))
    ohlcv = np.column_stack([close, close * 1.0002, close * 0.9998, close, np.full(n, 5.0)])
    candles = CandleSeries(last - 5 * MIN_MS * np.arange(n)[::-1], ohlcv)
    with pytest.raises(InsufficientHistory, match=r"every horizon \(15m, 1h, 4h\)"):
        fc5.forecast({"EURUSD": candles}, **FAST)
    out = fc5.forecast({"EURUSD": candles}, horizons="5m", **FAST)["EURUSD"]
    assert [h.horizon_ms for h in out.horizons] == [5 * MIN_MS]


def test_running_a_batch_with_horizons_it_was_not_prepared_for_is_refused_not_emptied(
        fc: Forecaster, eurusd: CandleSeries) -> None:
    """Friday 15:00 New York passes prepare() for the default horizons (1h is left); run for 4h alone
    it has no horizon left. That is an error naming the fix, not a forecast with no horizons (which
    the output schema refuses only at publish time)."""
    i = _friday_origin(eurusd, 15)
    batch = fc.prepare([ForecastRequest("EURUSD", eurusd[: i + 1])])
    assert len(batch.requests) == 1
    with pytest.raises(ValueError, match=r"prepare\(requests, horizons=\.\.\.\)"):
        fc.run(batch, horizons=[4 * HOUR_MS], **FAST)
    assert len(fc.prepare([ForecastRequest("EURUSD", eurusd[: i + 1])], horizons=[4 * HOUR_MS]).requests) == 0


def test_the_origin_a_gappy_window_error_points_to_is_one_that_forecasts() -> None:
    """An outage right after the Sunday open: every window since holds it, so the newest earlier
    origin with a full window is the week's last bar, Friday 16:55 New York — refused as
    ``market_closed``. The hint names the newest origin that is neither gappy nor closed instead
    (16:40, whose 15 minutes end at the close), and forecasting from it works."""
    from worker.features.candles import iso, to_ms

    fc5 = Forecaster.load(device="cpu")
    friday_last = to_ms("2024-01-05T21:55:00Z")  # Friday 16:55 EST, the last bar before the close
    sunday_open = to_ms("2024-01-07T22:00:00Z")
    before = friday_last - 5 * MIN_MS * np.arange(400)[::-1]
    after = sunday_open + 5 * MIN_MS * np.arange(30, 66)  # the first 30 bars of the week missing
    times = np.concatenate([before, after])
    rng = np.random.default_rng(9)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 2e-4, len(times))))
    ohlcv = np.column_stack([close, close * 1.0002, close * 0.9998, close, np.full(len(times), 5.0)])
    candles = CandleSeries(times, ohlcv)
    with pytest.raises(InsufficientHistory) as err:
        fc5.forecast({"EURUSD": candles}, **FAST)
    assert err.value.reason == "too_many_missing_bars"
    hinted = to_ms("2024-01-05T21:40:00Z")
    assert f'candles.upto(to_ms("{iso(hinted)}"))' in str(err.value), str(err.value)
    out = fc5.forecast({"EURUSD": candles.upto(hinted)}, **FAST)["EURUSD"]
    assert [h.horizon_ms for h in out.horizons] == [15 * MIN_MS]

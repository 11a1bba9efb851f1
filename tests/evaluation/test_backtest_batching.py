"""The backtest's chunking and lanes change its speed, not its forecasts: one origin per model call
on one lane gives what the default chunks over two lanes give (and uneven chunks), on both shipped
checkpoints — the same origins, skips and noise, and every sample equal up to float32 rounding.

Not bit for bit: a BLAS matmul's rounding depends on the shape it is given (how many rows share a
call, how many threads split it), so a value can move by an ulp between batch compositions —
measured ≤ 1.4e-9 on cumulative log returns of ~1e-3 (relative ~1e-6), a thousand times below the
Monte Carlo error of 64 samples. The backtest before the chunking had the same property across its
batches of 64. Run twice with the same settings, the output is identical (test_commands.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.data import fx
from worker.evaluation.backtest import (
    MAX_CHUNK_ORIGINS,
    BacktestResult,
    default_chunk_origins,
    run_backtest,
)
from worker.features.candles import CandleSeries, load_csv
from worker.model.forecaster import Forecaster

HOURLY = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"


def _case(name: str) -> tuple[Forecaster, CandleSeries, np.ndarray]:
    fc = Forecaster.load(name, device="cpu")
    if name == "eurusd-1h":
        series = load_csv(HOURLY)[:260]
    else:  # a training-period week of real 5-minute EURUSD bars
        series = fx.load_pair("EURUSD", fc.timeframe_ms, start_ms=fx.TRAIN_END - 7 * 86_400_000,
                              end_ms=fx.TRAIN_END)
    # 13 origins spread over the series, including the first one that has history
    origins = np.linspace(fc.window_bars - 1, len(series) - 1, 13).astype(np.int64)
    return fc, series, origins


def _assert_same(a: BacktestResult, b: BacktestResult, what: object) -> None:
    assert np.array_equal(a.origins, b.origins) and a.skipped == b.skipped, what
    assert a.samples is not None and b.samples is not None
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-5, atol=1e-8, err_msg=str(what))
    assert len(a.forecasts) == len(b.forecasts)
    for fa, fb in zip(a.forecasts, b.forecasts, strict=True):
        assert (fa.symbol, fa.open_time, fa.close, fa.seed, fa.nfe) == (fb.symbol, fb.open_time, fb.close, fb.seed,
                                                                      fb.nfe), what
        for ha, hb in zip(fa.horizons, fb.horizons, strict=True):
            np.testing.assert_allclose([ha.mean, ha.std, *ha.quantiles], [hb.mean, hb.std, *hb.quantiles],
                                       rtol=1e-5, atol=1e-8, err_msg=str(what))
            # p_up counts samples above zero: a sample within rounding of zero could flip one count
            assert abs(ha.p_up - hb.p_up) <= 1 / 16 + 1e-12, what


def _run(fc: Forecaster, series: CandleSeries, origins: np.ndarray, **kw: int | None) -> BacktestResult:
    return run_backtest(fc, series, origins, symbol="EURUSD", num_samples=16, num_steps=4, seed=5,
                        keep_samples=True, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fx-5m", "eurusd-1h"])
def test_batched_backtest_equals_one_origin_at_a_time(name: str) -> None:
    fc, series, origins = _case(name)
    threads = torch.get_num_threads()
    alone = _run(fc, series, origins, chunk_origins=1, workers=1)
    assert len(alone.forecasts) >= 10, alone.skipped  # the comparison is about real forecasts
    for kw in ({"workers": 2}, {"chunk_origins": 5, "workers": 2}, {"chunk_origins": 13, "workers": 1}):
        batched = _run(fc, series, origins, **kw)
        _assert_same(batched, alone, kw)
        assert batched.forecasts_per_s > 0
    # a different seed is a different forecast: the comparison above can fail
    other = run_backtest(fc, series, origins, symbol="EURUSD", num_samples=16, num_steps=4, seed=6, keep_samples=True)
    assert other.samples is not None and alone.samples is not None
    assert not np.allclose(other.samples, alone.samples, rtol=1e-5, atol=1e-8)
    assert torch.get_num_threads() == threads  # the lanes give torch's thread count back


def test_default_chunk_follows_samples_and_path_length() -> None:
    assert default_chunk_origins(64, 48) == 48  # the 5-minute model: 3,072 values per origin
    assert default_chunk_origins(256, 48) == 12
    assert default_chunk_origins(64, 4) == MAX_CHUNK_ORIGINS  # the hourly model: capped
    assert default_chunk_origins(100_000, 48) == 1  # never zero


def test_bad_chunk_settings_are_refused() -> None:
    fc, series, origins = _case("eurusd-1h")
    with pytest.raises(ValueError, match="chunk_origins"):
        _run(fc, series, origins, chunk_origins=0)
    with pytest.raises(ValueError, match="workers"):
        _run(fc, series, origins, workers=0)


def test_backtest_command_takes_chunk_and_lanes_and_reports_its_rate(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli.main import main

    out = tmp_path / "f.csv"
    assert main(["backtest", "--candles", str(HOURLY), "--out", str(out), "--checkpoint", "eurusd-1h",
                 "--start", "2017-03-01", "--end", "2017-03-03", "--samples", "8", "--steps", "2",
                 "--chunk-origins", "7", "--workers", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["chunk_origins"], line["workers"]) == (7, 2)
    assert line["bars_forecast"] > 7 and line["forecasts_per_s"] > 0 and line["wall_s"] > 0
    assert line["rows"] == line["bars_forecast"] * len(line["horizons"])

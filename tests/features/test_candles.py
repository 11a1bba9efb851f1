"""CSV loading: the shared ``Time,Open,...`` file and ISO-8601 CSVs give the same arrays; bad rows are
refused with the file and line named."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.features.candles import CandleSeries, iso, load_csv, to_ms


def _ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)


def _shared_lines(path: Path, n: int) -> list[str]:
    return path.read_text().splitlines()[: n + 1]


def test_shared_file_loads_sorted_utc_hourly(eurusd: CandleSeries) -> None:
    assert len(eurusd) == 6225
    assert eurusd.open_time.dtype == np.int64 and eurusd.ohlcv.dtype == np.float64
    assert np.all(np.diff(eurusd.open_time) > 0)
    # First line of the file: 01.01.2017 22:00:00.000,1.05236,1.05253,1.05221,1.05227,143539993.3
    assert eurusd.open_time[0] == _ms("2017-01-01T22:00:00")
    np.testing.assert_array_equal(eurusd.ohlcv[0], [1.05236, 1.05253, 1.05221, 1.05227, 143539993.3])
    assert iso(int(eurusd.open_time[-1])) == "2017-12-29T21:00:00Z"
    assert np.all(eurusd.ohlcv[:, 1] >= eurusd.ohlcv[:, 2])  # high >= low


def test_iso_csv_reads_to_the_same_arrays_as_the_shared_format(shared_csv: Path, tmp_path: Path) -> None:
    lines = _shared_lines(shared_csv, 300)
    shared_part = tmp_path / "shared.csv"
    shared_part.write_text("\n".join(lines) + "\n")
    rows = []
    for i, line in enumerate(lines[1:]):
        t, o, h, low, c, v = line.split(",")
        stamp = dt.datetime.strptime(t, "%d.%m.%Y %H:%M:%S.%f").replace(tzinfo=dt.UTC)
        # Mix the ISO spellings a user may write: Z, an explicit offset, a naive (UTC) time, another zone.
        text = [
            stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            stamp.isoformat(),
            stamp.strftime("%Y-%m-%d %H:%M:%S"),
            stamp.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat(),
        ][i % 4]
        rows.append(f"{text},{o},{h},{low},{c},{v}")
    rows.reverse()  # unsorted input is sorted by time
    iso_csv = tmp_path / "iso.csv"
    iso_csv.write_text("time,open,high,low,close,volume\n" + "\n".join(rows) + "\n")

    a, b = load_csv(shared_part), load_csv(iso_csv)
    assert len(a) == 300
    np.testing.assert_array_equal(a.open_time, b.open_time)
    np.testing.assert_array_equal(a.ohlcv, b.ohlcv)


def test_columns_are_found_by_name_in_any_order_and_case(tmp_path: Path) -> None:
    path = tmp_path / "perm.csv"
    path.write_text(
        " Volume ,CLOSE,time,Low,High,open\n"
        "10,1.2,2024-01-02T00:00:00Z,1.0,1.3,1.1\n"
        "20,1.25,2024-01-02T01:00:00Z,1.15,1.3,1.2\n"
    )
    s = load_csv(path)
    np.testing.assert_array_equal(s.open_time, [_ms("2024-01-02T00:00:00"), _ms("2024-01-02T01:00:00")])
    np.testing.assert_array_equal(s.ohlcv, [[1.1, 1.3, 1.0, 1.2, 10], [1.2, 1.3, 1.15, 1.25, 20]])


GOOD = "2024-01-02T00:00:00Z,1.1,1.2,1.0,1.15,100"


@pytest.mark.parametrize(
    ("bad_row", "why"),
    [
        ("2024-01-02T02:00:00Z,1.1,abc,1.0,1.15,100", "non-numeric price"),
        ("yesterday,1.1,1.2,1.0,1.15,100", "unparseable time"),
        ("2024-13-02T02:00:00Z,1.1,1.2,1.0,1.15,100", "impossible date"),
        ("2024-01-02T02:00:00Z,1.1,1.2", "missing columns"),
    ],
)
def test_bad_row_error_names_file_and_line(tmp_path: Path, bad_row: str, why: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,open,high,low,close,volume\n" + GOOD + "\n" + GOOD.replace("00:00", "01:00", 1) + "\n"
                    + bad_row + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4:")):
        load_csv(path)


@pytest.mark.parametrize("price", ["nan", "inf", "-inf", "0", "-1.1"])
def test_non_finite_or_non_positive_prices_are_bad_rows(tmp_path: Path, price: str) -> None:
    """A NaN/inf/zero/negative price is not a candle: every feature is a log of a price ratio, so such a
    row would silently turn into NaN/inf features. It must be refused like any other bad row.
    (float() accepts "nan" and "inf", so load_csv currently lets these through.)"""
    path = tmp_path / "bad.csv"
    path.write_text(
        "time,open,high,low,close,volume\n"
        + GOOD + "\n"
        + f"2024-01-02T01:00:00Z,1.1,1.2,1.0,{price},100\n"
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
        load_csv(path)


def test_header_without_required_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hdr.csv"
    path.write_text("time,open,high,low,close\n" + GOOD.rsplit(",", 1)[0] + "\n")
    with pytest.raises(ValueError, match=r"header must contain .*volume"):
        load_csv(path)


def test_duplicate_timestamps_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("time,open,high,low,close,volume\n" + GOOD + "\n" + GOOD.replace("1.15", "1.16") + "\n")
    with pytest.raises(ValueError, match="duplicate timestamps"):
        load_csv(path)


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("time,open,high,low,close,volume\n\n" + GOOD + "\n\n")
    assert len(load_csv(path)) == 1


def test_series_slicing_and_upto(eurusd: CandleSeries) -> None:
    origin = int(eurusd.open_time[1000])
    head = eurusd.upto(origin)
    assert len(head) == 1001 and head.open_time[-1] == origin
    assert len(eurusd.upto(origin + 1)) == 1001  # between bars: still the bar that opened at origin
    np.testing.assert_array_equal(head.close, eurusd.close[:1001])
    with pytest.raises(ValueError, match="shape mismatch"):
        CandleSeries(eurusd.open_time[:3], eurusd.ohlcv[:4])


def test_from_rows_sorts_by_time() -> None:
    s = CandleSeries.from_rows([(2000, 1, 1, 1, 2, 0), (1000, 1, 1, 1, 1, 0)])
    np.testing.assert_array_equal(s.open_time, [1000, 2000])
    np.testing.assert_array_equal(s.close, [1, 2])


def test_time_text_round_trip() -> None:
    assert to_ms("2017-01-01T22:00:00Z") == to_ms("01.01.2017 22:00:00.000") == _ms("2017-01-01T22:00:00")
    assert iso(to_ms("2017-06-30T13:00:00+02:00")) == "2017-06-30T11:00:00Z"


@pytest.mark.parametrize(("change", "says"), [
    (lambda t, v: v.__setitem__((-1, 3), 0.0), "a price that is not finite and positive"),
    (lambda t, v: v.__setitem__((-1, 3), np.inf), "a price that is not finite and positive"),
    (lambda t, v: v.__setitem__((-5, 0), np.nan), "a price that is not finite and positive"),
    (lambda t, v: v.__setitem__((-3, 1), v[-3, 2] - 0.01), "high/low inconsistent with open/close"),
    (lambda t, v: v.__setitem__((-2, 4), -1.0), "a volume that is negative or not finite"),
    (lambda t, v: t.__setitem__(-2, t[-3]), "open times do not strictly increase"),
    (lambda t, v: t.__setitem__(slice(-3, None), t[-3:][::-1].copy()), "open times do not strictly increase"),
])
def test_defect_names_what_makes_candles_unusable(change: Any, says: str) -> None:
    t = 1_700_000_000_000 + 300_000 * np.arange(20, dtype=np.int64)
    v = np.tile([1.1, 1.102, 1.099, 1.101, 5.0], (20, 1))
    assert CandleSeries(t, v).defect() is None
    change(t, v)
    got = CandleSeries(t, v).defect()
    assert got is not None and says in got
    assert "np.float64" not in got

"""backtest, evaluate and compare-schedulers infer the CSV's bar spacing and refuse a checkpoint of
another timeframe (the worker's rule and override)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from worker.cli.main import main
from worker.features.candles import iso, load_csv

HOURLY = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"


@pytest.fixture(scope="module")
def five_minute_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped hourly closes replayed as if they were 5-minute bars (only the spacing matters)."""
    series = load_csv(HOURLY)[:300]
    path = tmp_path_factory.mktemp("m5") / "m5.csv"
    t0 = int(series.open_time[0])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "open", "high", "low", "close", "volume"])
        for i, row in enumerate(series.ohlcv):
            w.writerow([iso(t0 + i * 300_000), *row])
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_5_minute_csv_is_refused_by_the_hourly_checkpoint(five_minute_csv: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["backtest", "--candles", str(five_minute_csv), "--checkpoint", "eurusd-1h",
                      "--out", str(tmp_path / "f.csv")], capsys)
    assert code == 2
    assert "5m bars" in err and "trained on 1h" in err and "--checkpoint fx-5m" in err
    assert not (tmp_path / "f.csv").exists()  # nothing half-written


@pytest.mark.parametrize("command", ["backtest", "evaluate", "compare-schedulers"])
def test_an_hourly_csv_is_refused_by_the_5_minute_default(command: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("f.csv" if command == "backtest" else "dir")
    code, err = _run([command, "--candles", str(HOURLY), "--out", str(out)], capsys)
    assert code == 2
    assert "1h bars" in err and "trained on 5m" in err and "--checkpoint eurusd-1h" in err


def test_the_override_forecasts_anyway(five_minute_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.csv"
    assert main(["backtest", "--candles", str(five_minute_csv), "--checkpoint", "eurusd-1h", "--out", str(out),
                 "--allow-timeframe-mismatch", "--steps", "2", "--samples", "8",
                 "--start", iso(int(load_csv(five_minute_csv).open_time[-3]))]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows and all(np.isfinite(float(r["q50"])) for r in rows)
    assert {r["horizon_minutes"] for r in rows} == {"5", "20"}  # 1 and 4 bars of 5 minutes: said as they are

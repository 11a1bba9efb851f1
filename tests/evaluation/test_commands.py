"""backtest / evaluate / compare-schedulers / bench-model through the CLI, on the shipped hourly data
with the hourly checkpoint by name (small settings so they run in seconds)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.cli.main import main
from worker.features.candles import iso, load_csv
from worker.model.forecaster import Forecaster

DATA = Path(__file__).resolve().parents[2] / "worker" / "data" / "eurusd_h1_2017_ask.csv"


@pytest.fixture(scope="module")
def iso_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 180 bars of the shared file, rewritten in the ISO format the backtest documents."""
    series = load_csv(DATA)[:180]
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "open", "high", "low", "close", "volume"])
        for t, row in zip(series.open_time, series.ohlcv, strict=True):
            w.writerow([iso(int(t)), *row])
    return path


def test_backtest_writes_one_row_per_bar_after_warm_up_and_horizon(iso_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "forecasts.csv"
    assert main(["backtest", "--candles", str(iso_slice), "--out", str(out), "--steps", "4", "--samples", "32",
                 "--horizons", "60,240", "--seed", "3", "--checkpoint", "eurusd-1h"]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["time", "horizon_minutes", "close", "mean", "std", "q05", "q10", "q25", "q50", "q75",
                             "q90", "q95", "p_up"]
    series = load_csv(iso_slice)
    window = Forecaster.load("eurusd-1h").window_bars
    origins = len(series) - (window - 1)
    assert len(rows) == 2 * origins
    assert {r["horizon_minutes"] for r in rows} == {"60", "240"}
    by_time = {iso(int(t)): c for t, c in zip(series.open_time, series.close, strict=True)}
    first = rows[0]
    assert first["time"] == iso(int(series.open_time[window - 1]))  # the origin bar's own time
    for r in rows:
        assert float(r["close"]) == pytest.approx(by_time[r["time"]])
        q = [float(r[k]) for k in ("q05", "q10", "q25", "q50", "q75", "q90", "q95")]
        assert q == sorted(q) and 0 <= float(r["p_up"]) <= 1 and float(r["std"]) > 0
    # Same seed, same result: the backtest is reproducible.
    out2 = tmp_path / "again.csv"
    main(["backtest", "--candles", str(iso_slice), "--out", str(out2), "--steps", "4", "--samples", "32",
          "--horizons", "60,240", "--seed", "3", "--checkpoint", "eurusd-1h"])
    assert out.read_text() == out2.read_text()


def test_the_backtest_leaves_out_horizons_past_the_weekend_close_unless_told(tmp_path: Path) -> None:
    """Bars 236-239 are Friday 2017-01-13 13:00-16:00 New York: their 4-h paths end after the
    17:00 close, and the 16:00 bar's 1-h one too; --no-weekend-close forecasts them as before."""
    window = Forecaster.load("eurusd-1h").window_bars
    series = load_csv(DATA)[240 - window - 3 : 240]  # origins 236 ... 239
    path = tmp_path / "friday.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "open", "high", "low", "close", "volume"])
        for t, row in zip(series.open_time, series.ohlcv, strict=True):
            w.writerow([iso(int(t)), *row])
    rows = {}
    for flag in ([], ["--no-weekend-close"]):
        out = tmp_path / f"f{len(flag)}.csv"
        assert main(["backtest", "--candles", str(path), "--out", str(out), "--steps", "2", "--samples", "8",
                     "--checkpoint", "eurusd-1h", *flag]) == 0
        rows[bool(flag)] = [(r["time"], r["horizon_minutes"]) for r in csv.DictReader(out.read_text().splitlines())]
    times = [iso(int(t)) for t in series.open_time[-4:]]
    assert rows[False] == [(t, "60") for t in times[:3]]
    assert rows[True] == [(t, h) for t in times for h in ("60", "240")]


def test_backtest_reads_the_shared_format_too(tmp_path: Path) -> None:
    out = tmp_path / "f.csv"
    assert main(["backtest", "--candles", str(DATA), "--out", str(out), "--steps", "2", "--samples", "8",
                 "--start", "2017-12-18", "--end", "2017-12-20", "--horizons", "1h", "--checkpoint", "eurusd-1h"]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows and all("2017-12-18" <= r["time"] < "2017-12-20" for r in rows)


def test_a_horizon_that_is_not_whole_bars_is_a_clear_error(iso_slice: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["backtest", "--candles", str(iso_slice), "--out", str(tmp_path / "x.csv"), "--horizons", "90",
                 "--checkpoint", "eurusd-1h"])
    assert code == 2
    assert "not a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["backtest", "--scheduler", "nope", "--candles", str(DATA), "--out", "never.csv"],
    ["evaluate", "--scheduler", "nope", "--out", "never"],
    ["calibrate", "--scheduler", "nope", "--start", "2024-01-01", "--out", "never"],  # before the data is asked for
    ["bench-model", "--scheduler", "nope"],
    ["compare-schedulers", "--schedulers", "dpmpp,nope", "--out", "never"],
])
def test_an_unknown_scheduler_is_one_line_naming_the_option_and_the_choices(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    option = "--schedulers" if command[0] == "compare-schedulers" else "--scheduler"
    assert err.startswith(f"signal-worker {command[0]}: {option}: unknown scheduler 'nope'; choose one of ")
    assert "dpmpp" in err and "unipc" in err and err.count("\n") == 1  # one line, no traceback
    assert list(tmp_path.iterdir()) == []  # refused before anything was loaded or written


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--samples", "1"], "argument --samples: must be at least 2, got 1"),
    (["--samples", "many"], "argument --samples: not a whole number: 'many'"),
    (["--horizons", "1x"], "argument --horizons: not a duration: '1x'"),
    (["--chunk-origins", "-4"], "argument --chunk-origins: must be at least 1, got -4"),
])
def test_an_unusable_number_is_a_usage_line_before_anything_runs(
        args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["backtest", "--candles", str(DATA), "--out", str(out), *args])
    assert exit_info.value.code == 2
    assert f"signal-worker backtest: error: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--candles", str(DATA), "--out", str(tmp_path), "--steps", "4", "--samples", "32",
                 "--start", "2017-12-01", "--checkpoint", "eurusd-1h"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    # eurusd-1h's calibration was fitted at DPM-Solver++ 10 steps, and this scored 4: said, and recorded.
    assert report["calibration_sampler"] == {"scheduler": "dpmpp", "steps": 10}
    assert "dpmpp 10 steps" in report["calibration_mismatch"] and "dpmpp 4 steps" in report["calibration_mismatch"]
    assert "warning: the spread calibration of" in capsys.readouterr().err
    for label in ("1h", "4h"):
        entry = report["horizons"][label]
        for name in ("model", "ewma_normal", "rolling_normal", "garch_t"):
            assert entry[name]["crps"] > 0
            assert set(entry[name]["coverage"]) == {"50", "80", "90"}
            assert sum(entry[name]["pit_histogram"]) == entry["n"]
        assert (tmp_path / f"fan_{label}.png").stat().st_size > 10_000
        assert (tmp_path / f"calibration_{label}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_schedulers_rows(tmp_path: Path) -> None:
    assert main(["compare-schedulers", "--out", str(tmp_path), "--checkpoint", "eurusd-1h",
                 "--schedulers", "dpmpp,kdpm2",
                 "--step-counts", "5", "--origins", "16", "--samples", "16", "--repeats", "1",
                 "--timing-symbols", "3"]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert json.loads((tmp_path / "machine.json").read_text())["timing_symbols"] == 3
    assert all(r["timed_symbols"] == 3 for r in rows)  # the timed batch: 3 symbols x --samples
    assert [r["scheduler"] for r in rows] == ["reference", "reference_reseeded", "dpmpp", "kdpm2"]
    for r in rows:
        assert {"scheduler", "steps", "nfe", "wall_ms", "crps"} <= set(r)
        assert r["wall_ms"] > 0 and np.isfinite(r["crps"])
    ref, floor, dpm, kdpm = rows
    assert floor["energy_to_reference"] > 0 and ref["energy_to_reference"] == 0
    assert ref["nfe"] == 200 and dpm["nfe"] == 5 and kdpm["nfe"] == 9  # truthful NFE: KDPM2 is 2/step
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_bench_model_reports_each_symbol_count(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert main(["bench-model", "--symbols", "1,4", "--repeats", "2", "--steps", "2", "--samples", "8",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["symbols"] for r in doc["results"]] == [1, 4]
    assert all(r["median_ms"] > 0 and r["nfe"] == 2 for r in doc["results"])


def test_bench_model_under_a_busy_neighbour_compares_the_lanes_with_the_callers_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--neighbour`` runs a real busy process for the benchmark's duration and ends it; with two
    intra-op threads every sample row also times the call on the caller's threads, same samples."""
    from worker.dev import bench_model as bm

    started: list[subprocess.Popen[bytes]] = []

    def recorded() -> subprocess.Popen[bytes]:
        started.append(bm_busy())
        return started[-1]

    bm_busy = bm.busy_neighbour
    monkeypatch.setattr(bm, "busy_neighbour", recorded)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "n.json"
        assert main(["bench-model", "--symbols", "1", "--repeats", "1", "--steps", "2", "--samples", "8",
                     "--path-bars", "0", "--neighbour", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    assert len(started) == 1 and started[0].poll() is not None  # it ran, and was ended
    doc = json.loads(out.read_text())
    assert doc["neighbour"] is True
    (row,) = doc["results"]
    assert row["callers_threads_ms"] > 0 and row["lanes_vs_callers_threads"] > 0
    assert row["callers_threads_max_abs_diff"] <= 1e-5


def test_bench_model_benches_the_fused_unipc_against_its_diffusers_loop(tmp_path: Path) -> None:
    out = tmp_path / "u.json"
    assert main(["bench-model", "--scheduler", "unipc", "--symbols", "2", "--repeats", "1", "--steps", "4",
                 "--samples", "8", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["scheduler"] == "unipc"
    sampler = next(c for c in doc["components"] if c["component"] == "sampler")
    assert sampler["scheduler"] == "unipc" and sampler["max_abs_diff"] <= 1e-5
    assert [r["nfe"] for r in doc["results"]] == [4] and doc["results"][0]["max_abs_diff"] <= 1e-5


def test_bench_model_refuses_a_scheduler_without_a_fused_loop() -> None:
    with pytest.raises(SystemExit, match="fused: dpmpp, unipc"):
        main(["bench-model", "--scheduler", "ddim", "--symbols", "1", "--repeats", "1", "--steps", "4"])


def test_calibrate_fits_for_the_sampler_asked_and_the_backtest_says_when_it_serves_another(
        iso_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "unipc5"
    assert main(["calibrate", "--candles", str(DATA), "--checkpoint", "eurusd-1h", "--start", "2017-10-01",
                 "--windows", "20", "--samples", "8", "--scheduler", "unipc", "--steps", "5", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["calibration_sampler"] == {"scheduler": "unipc", "steps": 5}
    assert Forecaster.load(out, scheduler="unipc").calibration_mismatch(5) is None
    card = (out / "README.md").read_text()  # the model card says what the factors are for, and how made
    assert "for sampling with unipc 5 steps" in card
    assert "signal-worker calibrate --candles" in card and "--scheduler unipc --steps 5" in card

    args = ["backtest", "--candles", str(iso_slice), "--checkpoint", str(out), "--samples", "8", "--start",
            "2017-01-06"]
    assert main([*args, "--out", str(tmp_path / "a.csv"), "--scheduler", "unipc", "--steps", "5"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.csv"), "--steps", "10"]) == 0
    err = capsys.readouterr().err
    assert "fitted with unipc 5 steps" in err and "samples with dpmpp 10 steps" in err


@pytest.mark.slow
def test_the_five_pair_evaluate_says_which_setting_its_calibration_was_fitted_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.data import fx

    if not fx.available():
        pytest.skip(f"tradetide not installed ({fx.INSTALL_HINT})")
    args = ["evaluate", "--dataset", "tradetide", "--pairs", "EURUSD", "--stride", "600", "--samples", "8",
            "--scheduler", "unipc", "--steps", "5"]
    assert main([*args, "--checkpoint", "fx-5m-unipc5", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["calibration_sampler"] == {"scheduler": "unipc", "steps": 5}
    assert report["calibration_mismatch"] is None and "warning" not in capsys.readouterr().err
    assert main([*args, "--checkpoint", "fx-5m", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["calibration_sampler"] == {"scheduler": "dpmpp", "steps": 10}
    assert "unipc 5 steps" in report["calibration_mismatch"] and "warning:" in capsys.readouterr().err

"""Every command and code example of the README is executed, as written, so a newcomer's first
copy-paste cannot fail. ``bash`` blocks run line by line in the repository root with the
virtualenv's ``signal-worker`` on PATH; ``python`` blocks run in a fresh namespace. Two lines are
special: ``make test`` is this suite itself (running it here would recurse), and ``make demo`` runs
until Ctrl-C, so the test checks that the target is ``signal-worker demo`` and runs that command with
``--duration`` added."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from worker.data import fx

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not fx.available(), reason=f"the README uses the FX data ({fx.INSTALL_HINT})")]


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang == "bash":
            out += [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]
    return out


def test_the_readme_has_examples_of_both_kinds() -> None:
    assert {lang for lang, _ in BLOCKS} == {"bash", "python"}
    assert "make demo" in _commands() and any(c.startswith("signal-worker train") for c in _commands())


@pytest.mark.parametrize("index", range(sum(1 for lang, _ in BLOCKS if lang == "python")))
def test_python_example_runs(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    code = [body for lang, body in BLOCKS if lang == "python"][index]
    monkeypatch.chdir(REPO)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert printed.getvalue().strip()  # every example shows something


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("signal-worker")])
def test_command_runs(command: str) -> None:
    done = subprocess.run(shlex.split(command), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_make_demo_runs_the_demo_and_shows_forecasts_and_live_calibration() -> None:
    # --no-print-directory: under `make test` this is a sub-make, which would add "Leaving directory".
    dry = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, check=True)
    assert dry.stdout.strip().splitlines()[-1].endswith("signal-worker demo")
    done = subprocess.run([str(BIN / "signal-worker"), "demo", "--duration", "120", "--calibration-every", "5"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"EURUSD .*\| 15m mean=.*\|  1h mean=.*\|  4h mean=", out), out[-3000:]  # 3 horizons
    assert re.search(r"\[calibration\] 15m: n=\d+ cov50/80/90=", out), out[-3000:]  # the online scorer's view
    assert "stopped cleanly" in out

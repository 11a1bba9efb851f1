"""The command line shortens libgomp's idle spin before torch loads (worker/cli/__init__.py), and an
operator's own OpenMP settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import worker.cli.main, os, torch; "
         "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(("env", "seen"), [
    ({}, "20000 None"),
    ({"GOMP_SPINCOUNT": "300000"}, "300000 None"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
])
def test_the_cli_sets_a_short_openmp_spin_unless_the_environment_says_otherwise(env: dict[str, str],
                                                                              seen: str) -> None:
    assert _probe(**env) == seen


def test_the_setting_is_made_before_torch_loads() -> None:
    """Importing the entry point must not have loaded torch before the package's __init__ ran (libgomp
    reads its environment once): the entry module imports torch only after worker.cli."""
    out = subprocess.run([sys.executable, "-c", "import sys, worker.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"

"""The pure scoring package stays pure: no torch, no model, no backtest; the online scorer uses it."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_scoring_rules_and_baselines_import_neither_torch_nor_the_model_driven_runs() -> None:
    mods = _modules_after("import worker.scoring.rules, worker.scoring.baselines")
    assert "torch" not in mods
    assert not {m for m in mods if m.startswith(("worker.evaluation", "worker.model"))}


def test_the_online_scorer_imports_only_the_pure_part() -> None:
    mods = _modules_after("import worker.service.scoring")
    assert "worker.scoring.rules" in mods and "torch" not in mods
    assert not {m for m in mods if m.startswith("worker.evaluation")}


def test_quantile_levels_have_one_source() -> None:
    from schemas.forecast import QUANTILE_KEYS, QUANTILE_LEVELS
    from worker.model import summary
    from worker.scoring import rules

    assert summary.QUANTILE_LEVELS is QUANTILE_LEVELS and summary.QUANTILE_KEYS is QUANTILE_KEYS
    assert rules.QUANTILE_LEVELS == QUANTILE_LEVELS

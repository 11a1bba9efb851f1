"""docs/configuration.md is generated and current; docs/operations.md covers every metric."""

from __future__ import annotations

import re
from pathlib import Path

from worker.observability import Metrics
from worker.settings import all_env_names
from worker.settings_doc import main, render

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == render(), "docs/configuration.md is stale: run python -m worker.settings_doc"


def test_configuration_reference_lists_every_variable() -> None:
    text = render()
    for name in all_env_names():
        assert f"`{name}`" in text


def test_generator_check_mode(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert main(["--check", "--output", str(out)]) == 1
    assert main(["--output", str(out)]) == 0
    assert main(["--check", "--output", str(out)]) == 0


def _metric_names() -> set[str]:
    """Family names as registered (counters without ``_total``, the Info without ``_info``)."""
    return {family.name for family in Metrics().registry.collect()}


def test_operations_guide_explains_every_metric() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for name in _metric_names():
        assert name in guide, f"docs/operations.md does not mention {name}"


def test_operations_guide_uses_only_real_metrics() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    series = set()
    for name in _metric_names():
        series |= {name, f"{name}_total", f"{name}_info", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    unknown = {m for m in re.findall(r"\bsignal_worker_[a-z0-9_]+", guide)} - series
    assert not unknown, f"docs/operations.md names metrics that do not exist: {sorted(unknown)}"

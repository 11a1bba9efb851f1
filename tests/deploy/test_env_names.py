"""Every SIGNAL_WORKER_* name written in deploy/, the Dockerfile or the operations guide is a
real setting, so a renamed or misspelled variable cannot silently do nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"SIGNAL_WORKER_[A-Z0-9_]+")
SUFFIXES = {".yaml", ".yml", ".md", ".txt", ".py", ".json", ".env", ".sh", ""}


def _files() -> list[Path]:
    files = [ROOT / "Dockerfile", ROOT / "docs" / "operations.md"]
    files += [p for p in sorted((ROOT / "deploy").rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return files


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_names_exist_in_the_settings_model(path: Path, env_names: set[str]) -> None:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing")
    sections = {name.split("__")[0] + "__" for name in env_names}
    unknown = set()
    for found in NAME.findall(path.read_text(encoding="utf-8")):
        if found in env_names or found in sections:  # a whole section, e.g. SIGNAL_WORKER_KAFKA__
            continue
        unknown.add(found)
    assert not unknown, f"{path.relative_to(ROOT)} names unknown settings: {sorted(unknown)}"


def test_scan_finds_the_names_it_should(env_names: set[str]) -> None:
    text = (ROOT / "deploy" / "k8s" / "configmap.yaml").read_text()
    assert "SIGNAL_WORKER_SERVICE__SHUTDOWN_GRACE_S" in NAME.findall(text)

"""Shared fixtures of the offline deployment checks (no cluster, no Docker daemon needed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


@pytest.fixture(scope="session")
def k8s_files(kustomization: dict[str, Any]) -> list[Path]:
    return [K8S / name for name in kustomization["resources"]]


@pytest.fixture(scope="session")
def k8s_objects(k8s_files: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest the kustomization applies, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in k8s_files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} defined twice"
                objects[key] = doc
    return objects


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return data


@pytest.fixture(scope="session")
def env_names() -> set[str]:
    from worker.settings import all_env_names

    return set(all_env_names())


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SIGNAL_WORKER_* from the outside and no .env file, for load_settings() checks."""
    for name in list(os.environ):
        if name.startswith("SIGNAL_WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield

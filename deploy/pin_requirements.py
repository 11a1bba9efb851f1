"""Write deploy/requirements.txt: exact pins of the runtime dependency closure of pyproject.toml,
as installed in the current environment (the project's venv), without torch.

    .venv/bin/python deploy/pin_requirements.py          # rewrite deploy/requirements.txt
    .venv/bin/python deploy/pin_requirements.py --check  # exit 1 if the pins differ from the venv

torch (and the CUDA libraries its CUDA wheels pull in) is left out: the Dockerfile installs it
first from the PyTorch index of the chosen variant (CUDA or CPU). Pins are resolved for the
platform this runs on (linux x86_64, CPython 3.11, like the image).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import cast

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "deploy" / "requirements.txt"
# Installed per image variant, from the PyTorch index; see the Dockerfile.
EXCLUDED = {"torch", "triton"}
EXCLUDED_PREFIXES = ("nvidia-",)

HEADER = """\
# Runtime dependency pins for the container image (generated; do not edit by hand).
# Regenerate from the project venv:  .venv/bin/python deploy/pin_requirements.py
# torch is not listed: the Dockerfile installs torch==$TORCH_VERSION from the PyTorch index of
# the chosen variant (CUDA by default, CPU with --build-arg TORCH_VARIANT=cpu) before these.
"""


def _excluded(name: str) -> bool:
    return name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES)


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    for extra in extras or {""}:
        env: dict[str, str] = {**cast(dict[str, str], default_environment()), "extra": extra}
        if req.marker.evaluate(env):
            return True
    return False


def closure(roots: list[str]) -> dict[str, str]:
    """``{canonical name: installed version}`` of ``roots`` and everything they need."""
    pins: dict[str, str] = {}
    stack = [r for r in map(Requirement, roots) if _applies(r, set())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required but not installed in {sys.prefix}") from None
        if not _excluded(name):
            pins[name] = dist.version
        for spec in dist.requires or []:
            child = Requirement(spec)
            if _applies(child, set(req.extras)):
                stack.append(child)
    return pins


def render() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = closure(list(project["dependencies"]))
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if deploy/requirements.txt is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUTPUT} differs from the installed packages; rerun {Path(__file__).name}", file=sys.stderr
            )
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The static checks `make test` runs before the tests: wired into the Makefile, their tools pinned alike in
pyproject's dev extras and requirements/lock.txt, and the pinned versions the ones installed."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"typecheck": "pyright", "lint": "ruff"}  # make target -> the tool it runs


def _exact_pins(requirements: list[str]) -> dict[str, str]:
    pins = (re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", r.strip()) for r in requirements)
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def test_make_test_runs_typecheck_and_lint() -> None:
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = re.search(r"^test:(.*)$", makefile, re.M)
    assert prerequisites, "no test target"
    assert set(CHECKS) <= set(prerequisites.group(1).split())
    for target, tool in CHECKS.items():
        recipe = re.search(rf"^{target}:.*\n\t(.*)$", makefile, re.M)
        assert recipe and recipe.group(1).startswith(f"$(BIN)/{tool}"), (target, recipe)


def test_check_tools_are_pinned_alike_and_installed_as_pinned() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    in_pyproject = _exact_pins(dev)
    in_lock = _exact_pins((ROOT / "requirements" / "lock.txt").read_text().splitlines())
    for tool in CHECKS.values():
        assert tool in in_pyproject, f"{tool} is not pinned with == in the dev extras"
        assert in_lock.get(tool) == in_pyproject[tool], (tool, in_lock.get(tool), in_pyproject[tool])
        assert version(tool) == in_pyproject[tool], f"{tool} {version(tool)} installed, {in_pyproject[tool]} pinned"

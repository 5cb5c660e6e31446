"""Deployables as their targets see them: unpacked into a folder (or installed), run by an interpreter that can
import that and the locked third-party packages, and nothing of the repository.

The interpreter is a throw-away virtualenv (no pip of its own) whose one ``.pth`` file lists the given folders,
then this environment's site-packages (the packages installed from requirements/lock.txt). A ``.pth`` line only
adds a folder to ``sys.path``: the ``.pth`` files inside it, among them the editable install of this project, are
not run, so the repository's packages cannot be imported. Run it with ``-I`` (isolated mode: no ``PYTHON*``
variables, no user site-packages, not the current folder).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from gcp_iot_bridge.infra import packaging

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("archive_probe.py")
# The repository's source folders: a module loaded from one of them did not come from the deployable.
SOURCE_DIRS = tuple(ROOT / d for d in ("iotbridge", "dataflow_jobs", "functions", "gcp_iot_bridge", "bench"))


def unpack(files: Mapping[str, str | bytes], into: Path) -> Path:
    """Write an archive's ``path -> content`` into ``into``, as unzip would."""
    return packaging.stage(files, into)


def isolated_python(venv: Path, *folders: Path) -> Path:
    """The interpreter of a new virtualenv at ``venv`` that imports ``folders`` and the locked packages only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    locked = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site_packages(python), "archive.pth").write_text("\n".join([*map(str, folders), *locked]) + "\n")
    return python


def site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, timeout=60).stdout.strip())


def imports(files: Mapping[str, str | bytes]) -> dict[str, list[str]]:
    """Shipped module -> the module names its import statements load (packaging's reading of them)."""
    out = {}
    for rel, text in files.items():
        if rel.endswith(".py"):
            module = packaging.module_name(rel)
            out[module] = packaging.imported_names(module, rel.endswith("__init__.py"), ast.parse(text))
    return out


def probe(python: Path, files: Mapping[str, str | bytes], tmp: Path) -> list[str]:
    """What fails when ``python`` imports every module of ``files`` and runs every import statement in them."""
    spec = tmp / "imports.json"
    spec.write_text(json.dumps(imports(files)))
    out = subprocess.run([str(python), "-I", str(PROBE), str(spec), *map(str, SOURCE_DIRS)], capture_output=True,
                         text=True, timeout=300, cwd=tmp)
    assert out.returncode in (0, 1) and out.stdout.strip(), out.stderr[-3000:]
    failures: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == (1 if failures else 0), out.stderr[-3000:]
    return failures

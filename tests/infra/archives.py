"""Deployable archives as their targets see them: unpacked into a folder, run by an interpreter that can import
that folder and the locked third-party packages, and nothing of the repository.

The interpreter is a throw-away virtualenv (no pip) whose one ``.pth`` file puts the unpacked folder first, then
this environment's site-packages (the packages installed from requirements/lock.txt). A ``.pth`` line only adds a
folder to ``sys.path``: the ``.pth`` files inside it, among them the editable install of this project, are not
run, so the repository's packages cannot be imported. Run it with ``-I`` (isolated mode: no ``PYTHON*``
variables, no user site-packages, not the current folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("archive_probe.py")
# The repository's source folders: a module loaded from one of them did not come from the archive.
SOURCE_DIRS = tuple(ROOT / d for d in ("iotbridge", "dataflow_jobs", "functions", "gcp_iot_bridge", "bench"))


def unpack(files: Mapping[str, str | bytes], into: Path) -> Path:
    """Write an archive's ``path -> content`` into ``into``, as unzip would."""
    for rel, content in files.items():
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return into


def isolated_python(app: Path, venv: Path) -> Path:
    """The interpreter of a new virtualenv at ``venv`` that imports ``app`` and the locked packages only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    locked = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "archive.pth").write_text("\n".join([str(app), *locked]) + "\n")
    return python


def probe(python: Path, app: Path) -> list[str]:
    """What fails when ``python`` imports every module of ``app`` and runs every import statement in it."""
    out = subprocess.run([str(python), "-I", str(PROBE), str(app), *map(str, SOURCE_DIRS)], capture_output=True,
                         text=True, timeout=300, cwd=app)
    assert out.returncode in (0, 1) and out.stdout.strip(), out.stderr[-3000:]
    failures: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == (1 if failures else 0), out.stderr[-3000:]
    return failures

"""Program evaluation: seconds to evaluate the prod stack's Pulumi program under mocks, and what it declares.

The program (``infra/__main__.py``) runs through the mock harness of the infra tests (``tests/infra/harness.py``,
``run_program("prod")``) in a fresh process: the first evaluation includes importing pulumi and pulumi_gcp
(what a `pulumi preview` pays too), the second is the program alone. Resources are counted as the harness
recorded them (components included), with the number of distinct types.

Reproduce: ``.venv/bin/python -m bench program``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.core import Figure

COMMAND = ".venv/bin/python -m bench program"
ROOT = Path(__file__).resolve().parents[1]
STACK = "prod"

_CHILD = """
import json, time
t0 = time.perf_counter()
from tests.infra.harness import run_program
t1 = time.perf_counter()
first = run_program({stack!r})
t2 = time.perf_counter()
second = run_program({stack!r})
t3 = time.perf_counter()
components = sum(1 for r in first.resources if r.type.startswith("gcp-iot-bridge:"))
print(json.dumps({{"import_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2,
                  "resources": len(first.resources), "resources_second": len(second.resources),
                  "components": components, "types": len({{r.type for r in first.resources}}),
                  "outputs": len(first.outputs)}}))
"""


def run() -> list[Figure]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(stack=STACK)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"program evaluation failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["resources"] != r["resources_second"]:
        raise AssertionError(f"two evaluations declared {r['resources']} and {r['resources_second']} resources")
    note = (f"{r['resources']} resources ({r['components']} components, {r['types']} types), "
            f"{r['outputs']} outputs")
    return [
        Figure("program", f"{STACK} stack evaluation under mocks, cold process", round(r["import_s"] + r["first_s"], 2),
               "s", COMMAND, f"imports {r['import_s']:.2f} s + first run {r['first_s']:.2f} s; {note}"),
        Figure("program", f"{STACK} stack evaluation under mocks, warm", round(r["second_s"], 2), "s", COMMAND,
               "second run in the same process; " + note),
        Figure("program", f"{STACK} stack resources declared", r["resources"], "resources", COMMAND, note),
    ]

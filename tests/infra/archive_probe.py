"""Run by a deployable's own interpreter (tests/infra/archives.py): import every module it ships and carry out
every import statement in them, those inside functions too, as the deployed code would.

    python -I archive_probe.py IMPORTS_JSON SOURCE_DIR...

IMPORTS_JSON maps each shipped module to the module names its import statements load (``from a import b`` gives
``a`` and ``a.b``; ``b`` may also be a name defined in ``a``). Prints the failures as a JSON list on its last line
and exits 1 if any: an import that fails, or a module loaded from one of the repository's SOURCE_DIRs (it would
import here and fail where the deployable runs). Standard library only.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def _load(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        parent, _, attr = name.rpartition(".")
        # `from parent import attr` of a name defined in parent, not a submodule.
        if exc.name != name or not parent or not hasattr(importlib.import_module(parent), attr):
            raise


def main() -> int:
    imports: dict[str, list[str]] = json.loads(Path(sys.argv[1]).read_text())
    sources = [Path(a).resolve() for a in sys.argv[2:]]
    failures: list[str] = []
    for module, names in sorted(imports.items()):
        for name in [module, *names]:
            try:
                _load(name)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not only ImportError
                failures.append(f"{module}: import {name}: {exc!r}")
    for name, loaded in sorted(sys.modules.items()):
        origin = Path(getattr(loaded, "__file__", None) or "/").resolve()
        if any(origin.is_relative_to(s) for s in sources):
            failures.append(f"{name} loaded from the repository ({origin}), not from the deployable")
    print(json.dumps(failures))  # the last line of the output
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

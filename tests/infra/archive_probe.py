"""Run by an archive's own interpreter (tests/infra/archives.py): import every module of the unpacked archive and
carry out every import statement in it, those inside functions too, as the deployed code would.

    python -I archive_probe.py APP_DIR SOURCE_DIR...

Prints the failures as a JSON list on its last line and exits 1 if any: an import that fails, or a module loaded
from one of the repository's SOURCE_DIRs (it would import here and fail where the archive is deployed). Standard
library only.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path


def module_name(app: Path, path: Path) -> str:
    parts = path.relative_to(app).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``, which never run."""
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(n for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(module: str, is_package: bool, tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name or None) for every import statement; relative imports resolved against ``module``."""
    skip = _type_checking_only(tree)
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(base, alias.name) for alias in node.names]
    return found


def main() -> int:
    app, sources = Path(sys.argv[1]).resolve(), [Path(a).resolve() for a in sys.argv[2:]]
    failures: list[str] = []
    for path in sorted(app.rglob("*.py")):
        module = module_name(app, path)
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not only ImportError
            failures.append(f"{module}: {exc!r}")
            continue
        for target, name in imports(module, path.name == "__init__.py", ast.parse(path.read_text())):
            try:
                imported = importlib.import_module(target)
                if name and name != "*" and not hasattr(imported, name):
                    importlib.import_module(f"{target}.{name}")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{module}: import {target}{'.' + name if name else ''}: {exc!r}")
    for name, loaded in sorted(sys.modules.items()):
        origin = Path(getattr(loaded, "__file__", None) or "/").resolve()
        if any(origin.is_relative_to(s) for s in sources):
            failures.append(f"{name} loaded from the repository ({origin}), not from the archive")
    print(json.dumps(failures))  # the last line of the output
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Parts meet only where docs/architecture.md allows: every import of every module, read with ``ast``.

The rules are the table of docs/architecture.md ("Who may import whom"), parsed here, so the page and the test
cannot say different things. Imports inside functions count too: a lazy import fails on a host just the same.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Top-level folders holding the project's Python code (everything else is tooling: .venv, notebooks, scripts).
PACKAGES = ("iotbridge", "dataflow_jobs", "functions", "gcp_iot_bridge", "infra", "provider", "examples", "policy",
            "bench", "tests")
# Programs that run with their own folder on sys.path and import their siblings by bare name.
PROGRAM_DIRS = (ROOT / "infra", ROOT / "policy", *sorted(p for p in (ROOT / "functions").iterdir() if p.is_dir()))


@dataclass(frozen=True)
class Part:
    name: str
    modules: tuple[str, ...]
    may_import: tuple[str, ...]
    pulumi: bool


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def parse_rules(text: str) -> list[Part]:
    """The rows of the table that follows the ``import-rules`` marker in docs/architecture.md."""
    _, marker, rest = text.partition("<!-- import-rules")
    assert marker, f"{ARCHITECTURE} has no import-rules table"
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), rest.splitlines()[1:]))
    header, _sep, *body = rows
    assert [c.strip() for c in header.strip("|").split("|")] == ["Part", "Modules", "May import", "Pulumi"]
    parts = []
    for row in body:
        name, modules, may, pulumi = (c.strip() for c in row.strip("|").split("|"))
        assert pulumi in ("yes", "no"), f"row {name}: Pulumi is yes or no, not {pulumi!r}"
        parts.append(Part(name, tuple(re.findall(r"`([\w.]+)`", modules)), tuple(re.findall(r"`([\w.]+)`", may)),
                          pulumi == "yes"))
    return parts


RULES = parse_rules(ARCHITECTURE.read_text())


def part_of(module: str) -> Part:
    matches = [(len(m), p) for p in RULES for m in p.modules if _under(module, m)]
    assert matches, f"{module} belongs to no part of docs/architecture.md: add it to the table"
    return max(matches, key=lambda x: x[0])[1]


# ------------------------------------------------------------------------------------------ reading imports


def module_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of the project."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = module_files()
FILES = {path: name for name, path in MODULES.items()}


def _resolve(name: str, roots: list[Path]) -> str | None:
    """The project module ``name`` denotes (searched from each root in turn), or None for a third-party one."""
    for root in roots:
        candidate = root.joinpath(*name.split("."))
        for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if path in FILES:
                return FILES[path]
    return None


def imports_of(path: Path) -> set[tuple[str, str | None]]:
    """(what the code names, the project module it resolves to, or None when it is not the project's)."""
    module = FILES[path]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    roots = [ROOT, *(d for d in PROGRAM_DIRS if d in path.parents)][::-1]
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join([*base, *([node.module] if node.module else [])])
                names = [f"{base_name}.{a.name}" if _resolve(f"{base_name}.{a.name}", [ROOT]) else base_name
                         for a in node.names]
                found.update((n, _resolve(n, [ROOT])) for n in names)
                continue
            assert node.module is not None
            # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg.
            names = [f"{node.module}.{a.name}" if _resolve(f"{node.module}.{a.name}", roots) else node.module
                     for a in node.names]
        found.update((n, _resolve(n, roots)) for n in names)
    return found


def edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import of one project module by another."""
    return {(FILES[path], target) for path in FILES for _, target in imports_of(path)
            if target is not None and target != FILES[path]}


EDGES = edges()


# ------------------------------------------------------------------------------------------ the rules


def part_violations(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(importer, the part prefix it reached) for each import the table does not allow."""
    out = set()
    for importer, imported in edges:
        mine, theirs = part_of(importer), part_of(imported)
        if mine is theirs or any(_under(imported, allowed) for allowed in mine.may_import):
            continue
        reached = max((m for m in theirs.modules if _under(imported, m)), key=len)
        out.add((importer, reached))
    return out


def test_the_table_covers_every_module_and_names_only_modules_that_exist():
    for module in MODULES:
        part_of(module)
    for part in RULES:
        for name in (*part.modules, *part.may_import):
            assert any(_under(m, name) for m in MODULES), f"docs/architecture.md names {name} ({part.name}), no module"


def test_the_parts_form_no_cycle():
    allowed = {p.name: {part_of(m).name for m in p.may_import} - {p.name} for p in RULES}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in allowed[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cyclic = sorted(name for name in allowed if name in reach(name) and name != "Tests")
    assert not cyclic, f"docs/architecture.md lets these parts reach themselves through others: {cyclic}"


def test_every_import_follows_the_architecture():
    violations = sorted(part_violations(EDGES))
    assert not violations, ("imports docs/architecture.md does not allow (importer -> part reached): "
                            + "; ".join(f"{a} -> {b}" for a, b in violations))


def test_the_data_plane_never_imports_pulumi():
    offenders = sorted(
        (FILES[path], name) for path in FILES for name, target in imports_of(path)
        if target is None and name.split(".")[0].startswith("pulumi") and not part_of(FILES[path]).pulumi
    )
    assert not offenders, f"Pulumi imported outside the parts allowed to: {offenders}"


def broker_archive() -> set[str]:
    """The modules the broker archive ships (gcp_iot_bridge/infra/packaging.py derives them from its imports)."""
    from gcp_iot_bridge.infra import packaging

    return set(packaging.BROKER.package().modules())


def test_what_a_broker_host_runs_imports_only_what_it_ships_with():
    shipped = broker_archive()
    outside = sorted((a, b) for a, b in EDGES if a in shipped and b not in shipped)
    assert not outside, f"broker-host modules importing what the broker archive leaves out: {outside}"


# ------------------------------------------------------------------------------------------ the checker itself


@pytest.mark.parametrize(("importer", "imported", "allowed"), [
    ("dataflow_jobs.telemetry_pipeline", "iotbridge.spec", True),
    ("dataflow_jobs.telemetry_pipeline", "iotbridge.local.stack", False),
    ("functions.config_push.main", "iotbridge.registry", True),
    ("functions.config_push.main", "iotbridge.local.provision", False),
    ("gcp_iot_bridge.infra.warehouse", "iotbridge.spec", True),
    ("gcp_iot_bridge.infra.broker", "iotbridge.bridge.front", False),
    ("infra.__main__", "gcp_iot_bridge.infra.iot_bridge", True),
    ("gcp_iot_bridge.infra.iot_bridge", "infra.__main__", False),
    ("examples.byo_network_and_dataset.__main__", "gcp_iot_bridge.infra.broker", True),
    ("examples.byo_network_and_dataset.__main__", "iotbridge.local", False),
    ("iotbridge.registry", "iotbridge.spec", False),
    ("iotbridge.local.broker_host", "iotbridge.bridge.settings", True),
    ("iotbridge.bridge.__main__", "iotbridge.local.broker_host", False),
    ("iotbridge.bridge.front", "iotbridge.cli", False),
    ("iotbridge.cli", "iotbridge.bridge.fanout", True),
])
def test_the_rules_allow_and_refuse(importer: str, imported: str, allowed: bool):
    assert (not part_violations({(importer, imported)})) is allowed


def test_imports_are_resolved_the_way_python_does():
    main = ROOT / "infra" / "__main__.py"
    assert ("gcp_iot_bridge.infra.config", "gcp_iot_bridge.infra.config") in imports_of(main)
    assert ("gcp_iot_bridge.infra.iot_bridge", "gcp_iot_bridge.infra.iot_bridge") in imports_of(main)
    assert ("pulumi", None) in imports_of(main)
    assert ("rules", "policy.rules") in imports_of(ROOT / "policy" / "__main__.py")
    # `from iotbridge import registry as reg` is the module, found even inside a function body.
    assert ("iotbridge.registry", "iotbridge.registry") in imports_of(ROOT / "functions" / "config_push" / "main.py")
    assert ("iotbridge.bridge.front", "iotbridge.bridge.front") in imports_of(ROOT / "iotbridge" / "bridge" /
                                                                             "__main__.py")
    assert ("tests.bridge.conftest", "tests.bridge.conftest") in imports_of(ROOT / "tests" / "bridge" /
                                                                           "test_attacks.py")

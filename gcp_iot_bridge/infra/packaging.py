"""One way to package the code the stack deploys: the broker hosts' archive, the config-push function's zip and
the pipeline's Flex Template build context.

A deployable is named by its entry points, the modules its target starts (``iotbridge.bridge.__main__`` on a
broker host, the function's ``main``, ``dataflow_jobs.telemetry_pipeline`` and the rest of its package in the
image). What it ships is derived, never listed by hand:

- **Files**: the closure of the project's imports from the entry points, read with ``ast`` (imports inside
  functions count, a lazy import fails on a host just the same; those under ``if TYPE_CHECKING:`` never run), with
  the ``__init__.py`` of every package on the way, since importing a module runs its packages first. A module is
  the project's when it resolves in one of the deployable's source folders; everything else is the standard
  library or a third-party distribution. Adding an import to a shipped module adds the module it names.
- **Requirements**: the distributions that the shipped modules import, found by which installed distribution owns
  the imported module, with the extras the project itself declares for them (``apache-beam[gcp]``), each pinned at
  its ``requirements/lock.txt`` version. **Constraints**: the lock's pin of every distribution those requirements
  pull in (their installed metadata, walked with the markers of this Python), so a target installs the versions the
  tests ran with and not whatever resolves that day.
- **Hash**: of paths and contents, in name order. It names the broker's object, the function's zip and the image's
  tag, so a change to any shipped file (or pin) deploys anew, and a change to anything else does not.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

from gcp_iot_bridge.infra.sources import SOURCE_ROOT

LOCK = SOURCE_ROOT / "requirements" / "lock.txt"
# The distribution whose declared dependencies carry the extras a deployable's requirement needs.
PROJECT_DISTRIBUTION = "gcp-iot-bridge"


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str | None = None) -> dict[str, str]:
    """Canonical name -> ``Name==version`` line of requirements/lock.txt (or of ``text`` in its format)."""
    pins = {}
    for line in (LOCK.read_text() if text is None else text).splitlines():
        name, sep, _ = line.strip().partition("==")
        if sep and not name.startswith("#"):
            pins[canonical_name(name)] = line.strip()
    return pins


@dataclass(frozen=True)
class Source:
    """A folder modules are found in (relative to the source root) and where its files go in the archive."""
    folder: str = ""
    into: str = ""


@dataclass(frozen=True)
class Package:
    """What one deployable ships: ``files`` (path in the archive -> bytes, the code only), ``requirements`` and
    ``constraints`` (requirements.txt lines, lock-pinned) and the content ``hash`` of all three."""
    files: Mapping[str, bytes]
    requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", content_hash({
            **self.files, "requirements.txt": self.requirements_txt.encode(),
            "constraints.txt": self.constraints_txt.encode()}))

    @property
    def requirements_txt(self) -> str:
        return "".join(line + "\n" for line in self.requirements)

    @property
    def constraints_txt(self) -> str:
        return "".join(line + "\n" for line in self.constraints)

    def modules(self) -> list[str]:
        return sorted(module_name(rel) for rel in self.files if rel.endswith(".py"))


def content_hash(files: Mapping[str, bytes]) -> str:
    """Of paths and contents, independent of the order the files were listed in."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:24]


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(n for stmt in node.body for n in ast.walk(stmt))
    return skip


def imported_names(module: str, is_package: bool, tree: ast.Module) -> list[str]:
    """Every module name an import statement of ``module`` may load: ``import a.b`` gives ``a.b``; ``from a import
    b`` gives ``a`` and ``a.b`` (``b`` may be a submodule); relative imports resolved against ``module``."""
    skip = _type_checking_only(tree)
    names: list[str] = []
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    return names


@dataclass(frozen=True)
class Deployable:
    """A deployable by its entry modules and the folders its modules come from, first match wins. Every module of
    the ``whole_packages`` is an entry point too (the pipeline's package: decoders named only in configuration).
    ``data``: files other than modules it ships as they are (paths from the source root, the same in the archive)."""
    name: str
    entry_points: tuple[str, ...]
    sources: tuple[Source, ...] = (Source(),)
    whole_packages: tuple[str, ...] = ()
    root: Path = SOURCE_ROOT
    data: tuple[str, ...] = ()

    def entries(self) -> list[str]:
        out = list(self.entry_points)
        for package in self.whole_packages:
            found = self.resolve(package)
            if found is None:
                raise FileNotFoundError(f"{self.name}: package {package} is not in {self.sources}")
            folder = found[0].parent
            out += sorted(module_name(f"{package.replace('.', '/')}/{p.relative_to(folder).as_posix()}")
                          for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
        return out

    def resolve(self, module: str) -> tuple[Path, str] | None:
        """(file, path in the archive) of a project module, or None when it is not the project's."""
        rel = module.replace(".", "/")
        for source in self.sources:
            base = self.root / source.folder
            for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
                if (base / candidate).is_file():
                    return base / candidate, f"{source.into}{candidate}"
        return None

    def closure(self) -> tuple[dict[str, Path], set[str]]:
        """(path in the archive -> file) of every project module reached, and the other modules they import."""
        files: dict[str, Path] = {}
        external: set[str] = set()
        entry_modules = set(self.entries())
        todo = sorted(entry_modules)
        while todo:
            module = todo.pop()
            parts = module.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                found = self.resolve(name)
                if found is None:
                    if name == module and module in entry_modules:
                        raise FileNotFoundError(f"{self.name}: entry point {module} is not in {self.sources}")
                    if name == ".".join(parts[:1]) and not self._is_project(name):
                        external.add(module)
                    break
                path, rel = found
                if rel in files:
                    continue
                files[rel] = path
                todo += imported_names(name, path.name == "__init__.py", ast.parse(path.read_text(), str(path)))
        return files, external

    def _is_project(self, top: str) -> bool:
        return any((self.root / s.folder / top).is_dir() or (self.root / s.folder / f"{top}.py").is_file()
                   for s in self.sources)

    def package(self) -> Package:
        files, external = self.closure()
        files.update({rel: self.root / rel for rel in self.data})
        third_party = sorted(m for m in external if m.split(".")[0] not in sys.stdlib_module_names)
        needed = sorted({d for d in (distribution_of(m) for m in third_party) if d is not None})
        requirements = pinned(needed, f"{self.name} imports")
        constraints = pinned(sorted(installed_closure([requirement_for(d) for d in needed])),
                             f"{self.name}'s requirements pull in", extras=False)
        return Package({rel: files[rel].read_bytes() for rel in sorted(files)}, tuple(requirements),
                       tuple(constraints))


def pinned(names: Iterable[str], why: str, extras: bool = True) -> list[str]:
    """``name[extras]==version`` for each distribution, the version from requirements/lock.txt; without the extras
    for a constraints file (pip refuses them there)."""
    lock = lock_pins()
    missing = [n for n in names if canonical_name(n) not in lock]
    if missing:
        raise ValueError(f"{why} {missing}, which {LOCK} does not pin: add them to pyproject.toml and the lock")
    out = []
    for name in names:
        pin = lock[canonical_name(name)]
        suffix = _project_extras().get(canonical_name(name), "") if extras else ""
        out.append(pin.replace("==", f"{suffix}==", 1))
    return out


def requirement_for(name: str) -> str:
    extras = _project_extras().get(canonical_name(name), "")
    return f"{name}{extras}"


@cache
def _project_extras() -> dict[str, str]:
    """Canonical name -> ``[extras]`` of the project's own dependencies (``apache-beam[gcp]``)."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(PROJECT_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed: its pyproject.toml
        import tomllib

        declared = tomllib.loads((SOURCE_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for line in declared:
        req = Requirement(line)
        if req.extras and req.marker is None:
            out[canonical_name(req.name)] = "[" + ",".join(sorted(req.extras)) + "]"
    return out


@cache
def _module_owners() -> dict[str, set[str]]:
    """Module path as in a distribution's RECORD (``google/cloud/pubsub_v1``) -> canonical distribution names."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonical_name(dist.metadata["Name"])
        for f in dist.files or []:
            path = str(f)
            if path.endswith(".py") and not path.startswith(".."):
                stem = path.removesuffix(".py").removesuffix("/__init__")
                owners.setdefault(stem, set()).add(name)
    return owners


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides ``module``: the one owning the longest of its dotted prefixes.
    None for a namespace package (``google.cloud``, which many distributions share and none owns)."""
    owners = _module_owners()
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = owners.get("/".join(parts[:n]))
        if found:
            if len(found) > 1:
                raise LookupError(f"{module} is provided by several distributions: {sorted(found)}")
            return next(iter(found))
    if "/".join(parts) in _namespaces():
        return None
    raise LookupError(f"{module} is imported by deployed code, and no distribution installed here provides it")


@cache
def _namespaces() -> frozenset[str]:
    """Every folder above an owned module (``google``, ``google/cloud``)."""
    return frozenset("/".join(stem.split("/")[:i]) for stem in _module_owners() for i in range(1, stem.count("/") + 1))


def installed_closure(roots: Iterable[str]) -> set[str]:
    """Canonical names of ``roots`` (requirement strings) and every distribution they require, from the installed
    metadata, markers evaluated for this Python."""
    from packaging.requirements import Requirement

    found: set[str] = set()
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name, extras = canonical_name(req.name), frozenset(req.extras)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        found.add(name)
        for line in metadata.requires(name) or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append(dep)
    return found


def pyproject(name: str, package: Package) -> str:
    """A ``pyproject.toml`` that makes ``package``'s files the installable distribution ``name`` (version: its
    hash), depending on its lock-pinned requirements: a deployable installed as a package, not read from a path."""
    packages = sorted(module_name(rel) for rel in package.files if rel.endswith("/__init__.py"))
    modules = sorted(module_name(rel) for rel in package.files if "/" not in rel and rel.endswith(".py"))
    lines = [
        "[build-system]", 'requires = ["setuptools>=69"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", f"name = {json.dumps(name)}", f'version = "0+{package.hash}"',
        f"dependencies = {json.dumps(list(package.requirements))}", "",
        "[tool.setuptools]", f"packages = {json.dumps(packages)}", f"py-modules = {json.dumps(modules)}",
    ]
    return "\n".join(lines) + "\n"


def stage(files: Mapping[str, bytes | str], dest: Path) -> Path:
    """Write ``files`` under ``dest`` (a build context, a deployable folder)."""
    for rel, data in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            target.write_text(data)
        else:
            target.write_bytes(data)
    return dest


# The stack's deployables, by the modules their targets start.
# The broker archive ships the device plugin's C source too: a host in device_auth mosquitto compiles it at boot.
BROKER = Deployable("the broker archive", ("iotbridge.bridge.__main__",),
                    data=("iotbridge/bridge/mosquitto_plugin/iotbridge_auth.c",))
CONFIG_PUSH = Deployable("the config-push function", ("main",), sources=(Source("functions/config_push"), Source()))
HOST_REGISTRAR = Deployable("the host registrar function", ("main",),
                            sources=(Source("functions/host_registrar"), Source()))
PIPELINE = Deployable("the pipeline image", ("dataflow_jobs.telemetry_pipeline",), whole_packages=("dataflow_jobs",))

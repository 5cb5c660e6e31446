"""One way to package deployable code (gcp_iot_bridge/infra/packaging.py): each deployable holds exactly the closure
of its imports, every module in it imports from it alone, its hash follows what it ships and nothing else, and its
requirements are the lock's pins of what it imports. The broker archive is also run as a host runs it:
tests/infra/test_broker.py::test_a_host_runs_the_bridge_from_the_archive_alone."""

from __future__ import annotations

import dataclasses
import modulefinder
import shutil
import subprocess
from pathlib import Path

import pytest

from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.packaging import BROKER, CONFIG_PUSH, PIPELINE, Deployable
from tests.infra import archives

DEPLOYABLES = {"broker": BROKER, "config-push": CONFIG_PUSH, "pipeline": PIPELINE}


def found_by_modulefinder(deployable: Deployable) -> set[str]:
    """The project modules the standard library's ModuleFinder reaches from the entry points (it reads bytecode,
    nested functions included): a second reading of the imports, independent of packaging's ``ast`` walk."""
    folders = [str(deployable.root / s.folder) for s in deployable.sources]
    finder = modulefinder.ModuleFinder(path=folders)  # only the project: third-party names stay unresolved
    for entry in deployable.entries():
        finder.import_hook(entry)
    return {name for name, m in finder.modules.items() if m.__file__}


@pytest.mark.parametrize("name", DEPLOYABLES)
def test_each_deployable_holds_exactly_the_closure_of_its_imports(name: str):
    deployable = DEPLOYABLES[name]
    assert set(deployable.package().modules()) == found_by_modulefinder(deployable)


def test_the_closures_are_what_each_target_runs():
    assert set(BROKER.package().modules()) == {
        "iotbridge", "iotbridge.spec", "iotbridge.registry", "iotbridge.bridge", "iotbridge.bridge.__main__",
        *(f"iotbridge.bridge.{m}" for m in ("auth", "authd", "batching", "fanout", "front", "gateway", "http_bridge",
                                             "limits", "metrics", "mqtt", "plugin", "ratelimit", "regcache",
                                             "registrar", "resends", "service", "settings"))}
    # Besides the modules, the device plugin's C source, which a device_auth mosquitto host compiles at boot.
    assert {rel for rel in BROKER.package().files if not rel.endswith(".py")} == {
        "iotbridge/bridge/mosquitto_plugin/iotbridge_auth.c"}
    assert set(CONFIG_PUSH.package().files) == {"main.py", "iotbridge/__init__.py", "iotbridge/registry.py",
                                                "iotbridge/spec.py"}
    assert set(PIPELINE.package().modules()) == {
        "iotbridge", "iotbridge.spec", "dataflow_jobs", *(f"dataflow_jobs.{m}" for m in (
            "telemetry_pipeline", "telemetry", "rules", "schema", "sinks"))}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployables' source folders copied, so that a test can edit them."""
    root = tmp_path_factory.mktemp("sources")
    for folder in ("iotbridge", "dataflow_jobs", "functions"):
        shutil.copytree(packaging.SOURCE_ROOT / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize(("name", "shipped"), [
    ("broker", "iotbridge/bridge/front.py"),
    ("config-push", "iotbridge/registry.py"),
    ("pipeline", "iotbridge/spec.py"),
])
def test_the_hash_changes_with_a_shipped_file_and_not_with_another(source_copy: Path, name: str, shipped: str):
    deployable = dataclasses.replace(DEPLOYABLES[name], root=source_copy)
    before = deployable.package()
    assert before.hash == DEPLOYABLES[name].package().hash  # the copy is the repository's code
    for unrelated in ("iotbridge/cli.py", "iotbridge/local/stack.py"):
        original = (source_copy / unrelated).read_text()
        (source_copy / unrelated).write_text(original + "\n# edited\n")
        try:
            assert deployable.package().hash == before.hash, unrelated
        finally:
            (source_copy / unrelated).write_text(original)
    original = (source_copy / shipped).read_text()
    (source_copy / shipped).write_text(original + "\n# edited\n")
    try:
        assert deployable.package().hash != before.hash
    finally:
        (source_copy / shipped).write_text(original)
    assert deployable.package().hash == before.hash


def test_every_module_of_the_pipelines_package_ships(source_copy: Path):
    """A payload decoder is named in configuration only, never imported: the pipeline's whole package ships."""
    deployable = dataclasses.replace(PIPELINE, root=source_copy)
    decoder = source_copy / "dataflow_jobs" / "decoders" / "vendor.py"
    decoder.parent.mkdir()
    (decoder.parent / "__init__.py").write_text("")
    decoder.write_text("from iotbridge import registry\n\n\ndef decode(data):\n    return registry\n")
    try:
        files = deployable.package().files
        assert {"dataflow_jobs/decoders/__init__.py", "dataflow_jobs/decoders/vendor.py",
                "iotbridge/registry.py"} <= set(files)
    finally:
        shutil.rmtree(decoder.parent)


def test_a_new_import_ships_the_module_it_names(source_copy: Path):
    deployable = dataclasses.replace(BROKER, root=source_copy)
    front = source_copy / "iotbridge" / "bridge" / "front.py"
    original = front.read_text()
    assert "iotbridge/dashboards.py" not in deployable.package().files
    # Inside a function, as a lazy import would be: it fails on a host all the same if it is not shipped.
    front.write_text(original + "\n\ndef _link():\n    from iotbridge import dashboards\n    return dashboards\n")
    try:
        assert "iotbridge/dashboards.py" in deployable.package().files
    finally:
        front.write_text(original)


def test_requirements_are_the_locks_pins_of_what_the_code_imports():
    lock = packaging.lock_pins()
    for deployable in DEPLOYABLES.values():
        package = deployable.package()
        for line in (*package.requirements, *package.constraints):
            name, _, version = line.partition("==")
            assert lock[packaging.canonical_name(name.partition("[")[0])].partition("==")[2] == version, line
        assert not any("[" in line for line in package.constraints), "pip refuses extras in a constraints file"
    assert "apache-beam[gcp]==2.77.0" in PIPELINE.package().requirements  # the extra the project declares


def test_an_import_the_lock_does_not_pin_stops_the_deploy(source_copy: Path):
    deployable = dataclasses.replace(BROKER, root=source_copy)
    settings = source_copy / "iotbridge" / "bridge" / "settings.py"
    original = settings.read_text()
    settings.write_text(original + "\n\ndef _tooling():\n    import pip\n    return pip\n")
    try:
        with pytest.raises(ValueError, match=r"imports \['pip'\], which .*lock.txt does not pin"):
            deployable.package()
    finally:
        settings.write_text(original)


@pytest.mark.parametrize("name", ["config-push", "pipeline"])
def test_every_module_of_a_deployable_imports_from_it_alone(tmp_path: Path, name: str):
    package = DEPLOYABLES[name].package()
    app = archives.unpack(package.files, tmp_path / "app")
    python = archives.isolated_python(tmp_path / "venv", app)
    assert archives.probe(python, package.files, tmp_path) == []


def test_the_pipeline_installs_as_a_package_and_starts_from_it(tmp_path: Path):
    """The image's build context installed as the Dockerfile installs it (``pip install --no-deps``; the
    dependencies are this environment's, the lock's), then the entry point started from the installed package, and
    every import of the installed modules carried out."""
    from gcp_iot_bridge.infra import pipeline

    context = packaging.stage(pipeline.build_context(), tmp_path / "context")
    python = archives.isolated_python(tmp_path / "venv")  # the locked packages, no project folder
    # Built as in the image: in pip's isolated build environment, setuptools from PyPI.
    built = subprocess.run([str(python), "-I", "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                            str(context)], timeout=300, cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.rmtree(context)
    site = archives.site_packages(python)
    installed = {p.relative_to(site).as_posix() for p in site.rglob("*.py")}
    assert installed == set(pipeline.build_context()) - {"pyproject.toml", "requirements.txt", "constraints.txt"}
    started = subprocess.run([str(python), "-I", "-m", "dataflow_jobs.telemetry_pipeline", "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "--input_subscription" in started.stdout and "--threshold_rules" in started.stdout
    assert archives.probe(python, packaging.PIPELINE.package().files, tmp_path) == []

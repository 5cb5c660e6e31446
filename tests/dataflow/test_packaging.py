"""The Flex Template packaging: Beam pins agree, metadata.json matches the pipeline's flags, and the files the
Dockerfile copies are enough to import and start the pipeline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import apache_beam
import pytest

from dataflow_jobs.telemetry_pipeline import FLAGS, flag_parser, template_metadata

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "dataflow_jobs"
DOCKERFILE = (JOBS / "Dockerfile").read_text()
METADATA = json.loads((JOBS / "metadata.json").read_text())


def beam_pin(text: str) -> str:
    m = re.search(r"apache-beam\[gcp\]==([0-9][0-9a-z.]*)", text)
    assert m, "no apache-beam[gcp]== pin"
    return m.group(1)


def test_beam_is_the_same_version_everywhere():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project_pin = beam_pin("\n".join(pyproject["project"]["dependencies"]))
    docker_arg = re.search(r"^ARG BEAM_VERSION=(\S+)$", DOCKERFILE, re.M)
    assert docker_arg
    lock = re.search(r"^apache-beam==(\S+)$", (ROOT / "requirements/lock.txt").read_text(), re.M)
    assert lock
    assert {project_pin, docker_arg.group(1), beam_pin((JOBS / "requirements.txt").read_text()), lock.group(1),
            apache_beam.__version__} == {project_pin}
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in DOCKERFILE


def test_dockerfile_uses_googles_launcher_base_and_checks_dependencies():
    assert re.search(r"^FROM gcr\.io/dataflow-templates-base/python311-template-launcher-base:", DOCKERFILE, re.M)
    assert re.search(r"&& pip check", DOCKERFILE)
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in DOCKERFILE
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", DOCKERFILE, re.M)
    assert py_file and py_file.group(1) == "/template/dataflow_jobs/telemetry_pipeline.py"


def test_metadata_parameters_match_the_flags_exactly():
    parser = flag_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    params = {p["name"]: p for p in METADATA["parameters"]}
    assert list(params) == [f.name for f in FLAGS]
    assert set(params) == set(actions)
    for name, p in params.items():
        action = actions[name]
        flag = next(f for f in FLAGS if f.name == name)
        assert p["helpText"] == action.help, name
        assert p["regexes"] == [flag.regex], name
        assert p["isOptional"] is (not action.required), name
        assert p["label"], name
        if flag.optional:  # the default must pass the template's own validation
            assert re.match(flag.regex, flag.default or "", re.DOTALL), name
    assert METADATA["streaming"] is True


def test_metadata_json_is_generated_from_the_flags():
    """Regenerate with ``python -m dataflow_jobs.telemetry_pipeline --write-metadata`` after changing a flag."""
    assert METADATA == template_metadata()
    assert [p["name"] for p in METADATA["parameters"]][-2:] == ["payload_profiles", "bigquery_endpoint"]


@pytest.mark.parametrize("name,good,bad", [
    ("input_subscription", "projects/my-project/subscriptions/iot-dev-telemetry-pipeline",
     "my-project/iot-dev-telemetry-pipeline"),
    ("bigquery_dataset", "my-project.iot", "my-project:iot"),
    ("bigtable_instance", "projects/my-project/instances/iot-dev", "iot-dev"),
    ("config_requests_topic", "projects/my-project/topics/iot-dev-config-requests", "projects/p/topics/x"),
    ("rule_min_interval_seconds", "300", "0"),
    ("allowed_lateness_seconds", "0", "-5"),
    ("bigquery_endpoint", "http://127.0.0.1:9050", "ftp://x"),
    ("payload_profiles", '{"default": ["json", "raw"]}', '["json"]'),
])
def test_template_regex_and_flag_parser_agree(name, good, bad):
    regex = next(p for p in METADATA["parameters"] if p["name"] == name)["regexes"][0]
    assert re.match(regex, good) and not re.match(regex, bad)
    base = {"input_subscription": "projects/my-project/subscriptions/abc",
            "bigquery_dataset": "my-project.iot", "bigtable_instance": "projects/my-project/instances/iot-dev",
            "config_requests_topic": "projects/my-project/topics/abc"}
    argv = [f"--{k}={v}" for k, v in base.items() if k != name]
    flag_parser().parse_known_args([*argv, f"--{name}={good}"])
    with pytest.raises(SystemExit):
        flag_parser().parse_known_args([*argv, f"--{name}={bad}"])


def copied_files() -> list[tuple[str, str]]:
    """(source, destination folder) for every COPY from the build context in the Dockerfile."""
    out = []
    text = DOCKERFILE.replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, dest = line.split()[1:]
            out += [(s, dest) for s in sources]
    return out


def test_the_files_the_image_copies_are_enough_to_run_the_pipeline(tmp_path: Path):
    """Lay the files out as the Dockerfile does and start the pipeline's entry point from there alone."""
    for src, dest in copied_files():
        target = tmp_path / dest.removeprefix("/template/").lstrip("/")
        if dest.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            target = target / Path(src).name
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / src, target)
    shipped = {p.name for p in (tmp_path / "dataflow_jobs").glob("*.py")}
    assert shipped == {p.name for p in JOBS.glob("*.py")}, "every module of the package is in the image"
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['telemetry_pipeline.py', '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv_file, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "mods = {n: getattr(m, '__file__', '') for n, m in sys.modules.items()\n"
        "        if n.split('.')[0] in ('dataflow_jobs', 'iotbridge')}\n"
        "assert all(f.startswith(sys.argv_root) for f in mods.values()), mods\n"
        "assert not any(n.split('.')[0] == 'pulumi' for n in sys.modules)\n"
        "print(sorted(mods))\n"
    ).replace("sys.argv_file", repr(str(tmp_path / "dataflow_jobs/telemetry_pipeline.py"))) \
     .replace("sys.argv_root", repr(str(tmp_path)))
    # The working directory and PYTHONPATH are the image's /template; -P keeps the repo checkout off sys.path.
    proc = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--input_subscription" in proc.stdout and "--threshold_rules" in proc.stdout
    assert "'iotbridge.spec'" in proc.stdout


def test_dockerignore_lets_through_exactly_what_the_image_copies():
    """The build context is the repository root; its ignore file must not send .venv, yet keep every COPY source."""
    import fnmatch

    lines = [ln.strip() for ln in (JOBS / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = [ln[1:] for ln in lines[1:] if ln.startswith("!")]
    sources = [src for src, _ in copied_files()]
    assert all(any(fnmatch.fnmatch(src, pat) for pat in allowed) for src in sources), sources
    assert all(any(fnmatch.fnmatch(src, pat) for src in sources) for pat in allowed), allowed

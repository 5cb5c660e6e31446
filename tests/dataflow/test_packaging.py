"""The Flex Template packaging: Beam pins agree, metadata.json matches the pipeline's flags. What the image is
built from, and that it installs and starts the pipeline: tests/infra/test_packaging.py."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import apache_beam
import pytest

from dataflow_jobs.telemetry_pipeline import FLAGS, flag_parser, template_metadata
from gcp_iot_bridge.infra import pipeline

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
    image_requirements = pipeline.build_context()["requirements.txt"].decode()
    assert {project_pin, docker_arg.group(1), beam_pin(image_requirements), lock.group(1),
            apache_beam.__version__} == {project_pin}
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in DOCKERFILE


def test_dockerfile_uses_googles_launcher_base_and_checks_dependencies():
    assert re.search(r"^FROM gcr\.io/dataflow-templates-base/python311-template-launcher-base:", DOCKERFILE, re.M)
    assert re.search(r"&& pip check", DOCKERFILE)
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in DOCKERFILE
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", DOCKERFILE, re.M)
    assert py_file and py_file.group(1) == "/template/dataflow_jobs/telemetry_pipeline.py"
    assert py_file.group(1).removeprefix("/template/") in pipeline.build_context()
    # The dependencies from the context's lock-pinned files, then the pipeline as a package of its own.
    assert "pip install --no-cache-dir -r requirements.txt -c constraints.txt" in DOCKERFILE
    assert "pip install --no-cache-dir --no-deps /template && pip check" in DOCKERFILE


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

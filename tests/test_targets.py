"""`--stack NAME`: a deployed stack's outputs become a CLI target (recorded output; no Pulumi CLI here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iotbridge import targets

RECORDED = Path(__file__).parent / "fixtures" / "stack-output-dev.json"


def recorded_runner(calls: list[list[str]]):
    def run(argv: list[str]) -> str:
        calls.append(argv)
        return RECORDED.read_text()

    return run


def test_recorded_stack_output_parses_into_a_target(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[list[str]] = []
    t = targets.from_stack("dev", runner=recorded_runner(calls))
    assert calls == [["pulumi", "stack", "output", "--json", "--stack", "dev"]]  # never --show-secrets
    assert (t.kind, t.project_id, t.region, t.registry_id) == ("stack", "acme-iot-dev", "europe-west1",
                                                               "iot-dev-registry")
    assert (t.mqtt_host, t.mqtt_port) == ("34.77.10.20", 8883)
    assert t.topic("config-requests") == "projects/acme-iot-dev/topics/iot-dev-config-requests"
    assert t.bigquery_endpoint is None and t.env == {}
    assert t.prefix == "iot-dev"
    ca = Path(t.mqtt_ca_cert or "")
    assert ca.read_text() == json.loads(RECORDED.read_text())["mqtt_ca_cert"]


def test_bare_topic_names_are_qualified(tmp_path):
    outputs = json.loads(RECORDED.read_text()) | {"telemetry_topic": "iot-dev-telemetry"}
    t = targets.from_stack_outputs("dev", outputs, cache=tmp_path)
    assert t.topic("telemetry") == "projects/acme-iot-dev/topics/iot-dev-telemetry"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mqtt_endpoint": "no-port"}, "not host:port"),
        ({"mqtt_ca_cert": "[secret]"}, "not a PEM certificate"),
    ],
)
def test_bad_outputs_give_one_line_reasons(tmp_path, change, message):
    outputs = json.loads(RECORDED.read_text()) | change
    with pytest.raises(targets.TargetError, match=message):
        targets.from_stack_outputs("dev", outputs, cache=tmp_path)


def test_missing_outputs_are_named(tmp_path):
    outputs = json.loads(RECORDED.read_text())
    del outputs["registry_id"], outputs["mqtt_endpoint"]
    with pytest.raises(targets.TargetError, match="lacks outputs: registry_id, mqtt_endpoint"):
        targets.from_stack_outputs("dev", outputs, cache=tmp_path)


def test_non_json_output_is_reported():
    with pytest.raises(targets.TargetError, match="did not print JSON"):
        targets.from_stack("dev", runner=lambda argv: "error: no stack named 'dev' found")

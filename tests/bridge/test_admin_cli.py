"""``iotctl registries`` and ``iotctl devices credentials / metadata / states``: through the device manager API
(the process ``python -m iotbridge.admin``), against the emulators."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from iotbridge import cli, cliutil
from iotbridge.device import generate_key
from iotbridge.targets import Target

from .conftest import PROJECT, REGION, REGISTRY

pytestmark = pytest.mark.emulator


@pytest.fixture
def target(api_url, bridge_env, monkeypatch) -> Target:
    t = Target(kind="local", name="local", project_id=PROJECT, region=REGION, registry_id=REGISTRY, mqtt_host=None,
               mqtt_port=None, mqtt_ca_cert=None, topics={}, bigquery_dataset="iot", env=dict(bridge_env),
               admin_api_url=api_url)
    monkeypatch.setattr(cliutil, "resolve", lambda stack: t)
    return t


def run(*args: str) -> object:
    out = CliRunner().invoke(cli.app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_registries_and_device_settings_through_the_api(target, registry, tmp_path):
    tag = uuid.uuid4().hex[:8]
    topic = f"projects/{PROJECT}/topics/cli-{tag}"
    created = run("registries", "create", f"cli-{tag}", "--event-topic", topic, "--event-topic", f"alerts={topic}",
                  "--state-topic", topic)
    assert [r.get("subfolderMatches") for r in created["eventNotificationConfigs"]] == ["alerts", None]
    assert f"cli-{tag}" in [r["id"] for r in run("registries", "list")]
    assert run("registries", "get", f"cli-{tag}")["stateNotificationConfig"]["pubsubTopicName"] == topic
    run("registries", "delete", f"cli-{tag}")
    refused = CliRunner().invoke(cli.app, ["registries", "get", f"cli-{tag}", "--json"])
    assert refused.exit_code == 1 and json.loads(refused.stdout)["error"].startswith("NOT_FOUND")

    device_id, key_files = f"cli-dev-{tag}", []
    for i in range(2):
        _, public = generate_key("ES256")
        path = tmp_path / f"key{i}.pem"
        path.write_text(public)
        key_files.append(path)
    run("devices", "create", device_id, "--public-key", str(key_files[0]))
    assert [c["format"] for c in run("devices", "credentials", "list", device_id)] == ["ES256_PEM"]
    rotated = run("devices", "credentials", "set", device_id, "--public-key", str(key_files[0]), "--public-key",
                  str(key_files[1]), "--expires", "2999-01-01T00:00:00Z")
    assert rotated["credentials"] == 2
    stored = registry.get_device(device_id).credentials
    assert [c.public_key_pem for c in stored] == [p.read_text() for p in key_files]
    assert all(c.expiration_time is not None and c.expiration_time.year == 2999 for c in stored)

    assert run("devices", "metadata", "set", device_id, "site=lyon", "floor=2") == {"site": "lyon", "floor": "2"}
    assert run("devices", "metadata", "get", device_id) == {"site": "lyon", "floor": "2"}

    registry.record_state(device_id, b"\xffone")
    registry.record_state(device_id, b"two")
    states = run("devices", "states", device_id, "--limit", "1")
    assert [s["data"] for s in states] == ["two"]
    assert [s["data"] for s in run("devices", "states", device_id)] == ["two", "\\xffone"]  # not UTF-8: escaped

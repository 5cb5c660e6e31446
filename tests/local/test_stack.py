"""`iotctl local up/status/down`: the stack records what it starts and `down` stops exactly that."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
from typer.testing import CliRunner

from iotbridge.cli import app
from iotbridge.local import services
from iotbridge.local.stack import LocalStack

pytestmark = pytest.mark.emulator

STATUS_FIELDS = {
    "project_id", "region", "registry_id", "mqtt_host", "mqtt_port", "mqtt_ca_cert", "http_bridge_url",
    "pubsub_emulator_host",
    "firestore_emulator_host", "bigtable_emulator_host", "bigquery_endpoint", "bigquery_dataset", "bigtable_instance",
    "admin_api_url",
}


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("IOT_LOCAL_STATE_DIR", str(d))
    yield d
    LocalStack(d).down()  # never leave a process behind, whatever the test did


def test_up_status_kill_one_down_leaves_nothing(state_dir):
    runner = CliRunner()
    up = runner.invoke(app, ["local", "up", "--detach", "--json"])
    assert up.exit_code == 0, up.output
    status = runner.invoke(app, ["local", "status", "--json"])
    assert status.exit_code == 0, status.output
    info = json.loads(status.stdout)
    assert STATUS_FIELDS <= set(info)
    assert info["healthy"] is True
    # The HTTP bridge answers over TLS with the MQTT CA file (a request without a JWT: 401, IoT Core's body).
    refused = requests.post(f"{info['http_bridge_url']}/v1/projects/{info['project_id']}/locations/{info['region']}"
                            f"/registries/{info['registry_id']}/devices/nobody:publishEvent", json={},
                            verify=info["mqtt_ca_cert"], timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["status"] == "UNAUTHENTICATED"
    procs = info["processes"]
    ports = [p["port"] for p in procs.values() if p["port"]]
    assert all(services.port_open("127.0.0.1", port) for port in ports)
    # The device manager API serves the stack's own registry.
    registry_name = f"projects/{info['project_id']}/locations/{info['region']}/registries/{info['registry_id']}"
    served = requests.get(f"{info['admin_api_url']}v1/{registry_name}", timeout=10)
    assert served.status_code == 200 and served.json()["id"] == info["registry_id"], served.text

    # A component dies: status reports it and exits non-zero; down still stops everything else.
    victim = procs["bigtable"]["pid"]
    os.killpg(victim, signal.SIGKILL)
    services.stop_process_group(victim, 5)  # reaps nothing of ours: it only waits until the group is gone
    status = runner.invoke(app, ["local", "status", "--json"])
    assert status.exit_code == 1
    assert json.loads(status.stdout)["processes"]["bigtable"]["alive"] is False

    down = runner.invoke(app, ["local", "down", "--json"])
    assert down.exit_code == 0, down.output
    assert "bigtable" not in json.loads(down.stdout)["stopped"]
    for name, p in procs.items():
        assert services.process_start_ticks(p["pid"]) is None or name == "bigtable", f"{name} still running"
    assert not any(services.port_open("127.0.0.1", port) for port in ports)
    gone = runner.invoke(app, ["local", "status", "--json"])
    assert gone.exit_code == 1 and "no local stack" in json.loads(gone.stdout)["error"]


def test_second_up_is_refused_while_running(state_dir):
    runner = CliRunner()
    assert runner.invoke(app, ["local", "up", "--detach"]).exit_code == 0
    again = runner.invoke(app, ["local", "up", "--detach", "--json"])
    assert again.exit_code == 1
    assert "already running" in json.loads(again.stdout)["error"]

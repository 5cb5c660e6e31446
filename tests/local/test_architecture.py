"""The whole architecture on this machine: a device nobody here wrote (mosquitto_pub with a JWT) and the fleet
simulator publish telemetry that the pipeline writes into telemetry_raw; an operator's config push reaches a
device over MQTT."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from iotbridge.cli import app
from iotbridge.local.provision import bigquery_client
from iotbridge.local.stack import LocalStack
from tests.waiting import wait_for

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("arch-state")
    mp = pytest.MonkeyPatch()
    mp.setenv("IOT_LOCAL_STATE_DIR", str(state))
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg")))
    result = CliRunner().invoke(app, ["local", "up", "--detach", "--json"])
    try:
        assert result.exit_code == 0, result.output
        yield json.loads(result.stdout)
    finally:
        LocalStack(state).down()
        mp.undo()


def rows(status: dict, sql: str) -> list:
    client = bigquery_client(status["project_id"], status["bigquery_endpoint"])
    return list(client.query(sql.format(t=f"`{status['project_id']}.{status['bigquery_dataset']}.telemetry_raw`"))
                .result(timeout=30))


def test_mosquitto_pub_with_a_jwt_reaches_telemetry_raw(stack, tmp_path):
    if not shutil.which("mosquitto_pub"):
        pytest.fail("mosquitto_pub missing: apt-get install -y mosquitto-clients")
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "ext.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    created = CliRunner().invoke(app, ["devices", "create", "ext-dev-1", "--public-key", str(pub),
                                       "--format", "ES256_PEM"])
    assert created.exit_code == 0, created.output
    now = int(time.time())
    token = jwt.encode({"iat": now, "exp": now + 600, "aud": stack["project_id"]}, key, algorithm="ES256")
    client_id = (f"projects/{stack['project_id']}/locations/{stack['region']}/registries/{stack['registry_id']}"
                 "/devices/ext-dev-1")
    payload = json.dumps({"ts": now * 1000, "metrics": {"temperature": 22.5}, "seq": 1, "fw": "1.2.3"})
    subprocess.run(["mosquitto_pub", "-h", stack["mqtt_host"], "-p", str(stack["mqtt_port"]), "--cafile",
                    stack["mqtt_ca_cert"], "-i", client_id, "-u", "unused", "-P", token, "-q", "1",
                    "-t", "/devices/ext-dev-1/events", "-m", payload], check=True, timeout=30)
    got = wait_for("the row in telemetry_raw",
                   lambda: rows(stack, "SELECT device_id, seq, extra, registry_id FROM {t} "
                                       "WHERE device_id = 'ext-dev-1'"),
                   lambda r: len(r) == 1, timeout=90, interval=0.5)
    assert (got[0]["seq"], got[0]["registry_id"]) == (1, stack["registry_id"])
    assert json.loads(got[0]["extra"]) == {"fw": "1.2.3"}


def test_fleet_telemetry_lands_and_a_config_push_reaches_the_device(stack):
    runner = CliRunner()
    sim = runner.invoke(app, ["simulate", "--devices", "4", "--rate", "20", "--duration", "3", "--prefix", "arch",
                              "--json"])
    assert sim.exit_code == 0, sim.output
    summary = json.loads(sim.stdout)
    assert summary["sent"] == summary["acknowledged"] == 60
    count = wait_for("60 rows",
                     lambda: rows(stack, "SELECT COUNT(DISTINCT CONCAT(device_id, '#', CAST(seq AS STRING)))"
                                                    " AS n FROM {t} WHERE STARTS_WITH(device_id, 'arch-')")[0]["n"],
                     lambda n: n >= 60, timeout=90, interval=0.5)
    assert count == 60

    # The device comes back online (same key as the simulator's) and waits for its config.
    from iotbridge.cli import key_dir_for
    from iotbridge.registry import Registry
    from iotbridge.simulate import Fleet
    from iotbridge.targets import resolve

    target = resolve(None)
    target.apply_env()
    fleet = Fleet(project=target.project_id, region=target.region,
                  registry=Registry(target.project_id, target.registry_id, target.region),
                  host=str(target.mqtt_host), port=int(target.mqtt_port or 0), ca_certs=target.mqtt_ca_cert,
                  key_dir=key_dir_for(target), devices=2, prefix="arch")
    fleet.connect()
    try:
        push = runner.invoke(app, ["config", "push", "arch-0001", "--data", '{"sampling_interval_s": 5}', "--json"])
        assert push.exit_code == 0, push.output
        version = json.loads(push.stdout)["config"]["version"]
        member = fleet.members[1]  # the fleet's config thread collects what arrives on /devices/arch-0001/config
        received = wait_for("the config on the device", lambda: list(member.configs), lambda c: len(c) >= 1,
                            timeout=30, interval=0.5)
        assert json.loads(received[-1]) == {"sampling_interval_s": 5}
    finally:
        fleet.close()
    got = json.loads(runner.invoke(app, ["config", "get", "arch-0001", "--json"]).stdout)
    assert got["version"] == version and got["data"] == {"sampling_interval_s": 5}

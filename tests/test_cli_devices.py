"""`iotctl devices ...` against the registry on the Firestore emulator."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from iotbridge import cli, cliutil
from iotbridge.targets import Target

pytestmark = pytest.mark.emulator


@pytest.fixture
def target(firestore_emulator, monkeypatch, request):
    t = Target(kind="local", name="local", project_id="cli-project", region="us-central1",
               registry_id=f"reg-{abs(hash(request.node.name)):x}", mqtt_host=None, mqtt_port=None,
               mqtt_ca_cert=None, topics={}, bigquery_dataset="iot", env=dict(firestore_emulator.env))
    monkeypatch.setattr(cliutil, "resolve", lambda stack: t)
    for k, v in t.env.items():
        monkeypatch.setenv(k, v)
    return t


@pytest.fixture
def public_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "dev.pub.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_create_list_get_block_unblock_delete(target, public_key):
    created = run("devices", "create", "pump-001", "--public-key", str(public_key), "--format", "ES256_PEM", "--json")
    assert created.exit_code == 0, created.output
    dev = json.loads(created.stdout)
    assert dev["id"] == "pump-001" and dev["credentials"][0]["format"] == "ES256_PEM"
    assert "BEGIN PUBLIC KEY" not in created.stdout  # key material is not echoed

    listed = json.loads(run("devices", "list", "--json").stdout)
    assert [d["id"] for d in listed] == ["pump-001"]
    assert json.loads(run("devices", "block", "pump-001", "--json").stdout)["blocked"] is True
    assert json.loads(run("devices", "get", "pump-001", "--json").stdout)["blocked"] is True
    assert json.loads(run("devices", "unblock", "pump-001", "--json").stdout)["blocked"] is False
    assert run("devices", "delete", "pump-001", "--json").exit_code == 0
    gone = run("devices", "get", "pump-001", "--json")
    assert gone.exit_code == 1 and "not found" in json.loads(gone.stdout)["error"]


@pytest.mark.parametrize(
    ("device_id", "fmt", "reason"),
    [
        ("a+b", "ES256_PEM", "invalid device id"),
        ("pump/1", "ES256_PEM", "invalid device id"),
        ("pump-002", "RSA_PEM", "expected an RSA key"),
        ("pump-003", "DSA_PEM", "unknown credential format"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line_reason(target, public_key, device_id, fmt, reason):
    result = run("devices", "create", device_id, "--public-key", str(public_key), "--format", fmt)
    assert result.exit_code == 1, result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and reason.lower() in lines[0].lower(), (result.output, result.exception)


def test_duplicate_device_is_refused(target, public_key):
    assert run("devices", "create", "pump-004", "--public-key", str(public_key)).exit_code == 0
    again = run("devices", "create", "pump-004", "--public-key", str(public_key), "--json")
    assert again.exit_code == 1 and "exists" in json.loads(again.stdout)["error"]


def test_config_request_matches_what_the_function_parses():
    import importlib.util
    import sys

    from iotbridge.local.services import REPO_ROOT

    spec_ = importlib.util.spec_from_file_location("config_push_main", REPO_ROOT / "functions/config_push/main.py")
    assert spec_ and spec_.loader
    main = importlib.util.module_from_spec(spec_)
    sys.modules["config_push_main"] = main
    spec_.loader.exec_module(main)
    as_object = main.parse_request(cli.config_request("pump-001", b'{"rpm_max": 1200}', 0))
    assert (as_object.device_id, as_object.data, as_object.version_to_update) == ("pump-001", b'{"rpm_max":1200}', 0)
    raw = bytes(range(256))
    as_bytes = main.parse_request(cli.config_request("pump-001", raw, 7))
    assert (as_bytes.data, as_bytes.version_to_update) == (raw, 7)
    as_list = main.parse_request(cli.config_request("pump-001", b"[1, 2]", 0))
    assert as_list.data == b"[1, 2]"  # not an object: sent untouched as bytes


def test_push_needs_exactly_one_payload_source(target):
    both = run("config", "push", "pump-001", "--json")
    assert both.exit_code == 1 and "exactly one of --data or --data-file" in json.loads(both.stdout)["error"]

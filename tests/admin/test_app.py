"""The admin API's app (iotbridge/admin/app.py) through Flask's test client, over the real Firestore emulator."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Request
from flask.testing import FlaskClient
from google.cloud import firestore, pubsub_v1

from iotbridge.admin import app as admin_app

PROJECT = "local-project"
REGION = "europe-west1"


def _writer_header(request: Request, writes: bool) -> bool:
    """A stand-in for the deployed authorizer: ``X-Role: writer`` may write, anyone else only read."""
    may_write = request.headers.get("X-Role") == "writer"
    if writes and not may_write:
        raise admin_app.PermissionDenied("may read but not write")
    return may_write


@pytest.fixture
def api(firestore_emulator, emulator_env, monkeypatch) -> Callable[..., tuple[FlaskClient, admin_app.Access]]:
    emulator_env(firestore_emulator)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")  # never published to here; no credentials needed

    def make(authorize: admin_app.Authorize = _writer_header) -> tuple[FlaskClient, admin_app.Access]:
        access = admin_app.Access(PROJECT, REGION, f"own-{uuid.uuid4().hex[:10]}", "iot",
                                  firestore.Client(project=PROJECT))
        access.ensure_default()
        return admin_app.create_app(access, pubsub_v1.PublisherClient(), authorize).test_client(), access

    return make


def _loc() -> str:
    return f"/v1/projects/{PROJECT}/locations/{REGION}"


def _call(client: FlaskClient, method: str, path: str, body: dict[str, Any] | None = None,
          role: str = "writer") -> tuple[int, Any]:
    response = client.open(f"{_loc()}/{path}", method=method, json=body, headers={"X-Role": role})
    return response.status_code, response.get_json()


@pytest.mark.emulator
def test_test_iam_permissions_tells_a_reader_only_the_read_permissions(api) -> None:
    client, access = api()
    asked = {"permissions": list(admin_app.PERMISSIONS)}
    path = f"registries/{access.registry_id}:testIamPermissions"
    status, writer = _call(client, "POST", path, asked, role="writer")
    assert status == 200 and writer["permissions"] == list(admin_app.PERMISSIONS)
    status, reader = _call(client, "POST", path, asked, role="reader")
    assert status == 200
    assert set(reader["permissions"]) == admin_app.READ_PERMISSIONS
    assert "cloudiot.devices.updateConfig" not in reader["permissions"]
    # The local hook lets everyone write, so it answers every permission.
    local, access = api(admin_app.allow_all)
    status, answer = _call(local, "POST", f"registries/{access.registry_id}:testIamPermissions", asked)
    assert status == 200 and answer["permissions"] == list(admin_app.PERMISSIONS)


@pytest.mark.emulator
def test_made_up_registry_ids_are_not_kept(api) -> None:
    client, access = api()
    lab = f"lab-{uuid.uuid4().hex[:10]}"
    status, _ = _call(client, "POST", "registries", {"id": lab})
    assert status == 200
    kept = dict(access._registries)
    assert set(kept) == {access.registry_id, lab}
    for i in range(200):
        status, answer = _call(client, "GET", f"registries/made-up-{i}/devices", role="reader")
        assert status == 404, answer
        status, _ = _call(client, "GET", f"registries/made-up-{i}", role="reader")
        assert status == 404
    assert access._registries == kept  # unchanged: only registries that exist are kept
    status, _ = _call(client, "GET", f"registries/{lab}", role="reader")
    assert status == 200 and access._registries[lab] is kept[lab]
    status, _ = _call(client, "DELETE", f"registries/{lab}")
    assert status == 200 and lab not in access._registries


@pytest.mark.emulator
def test_the_deployments_own_registry_cannot_be_deleted(api) -> None:
    client, access = api()
    status, answer = _call(client, "DELETE", f"registries/{access.registry_id}")  # empty, yet refused
    assert status == 400 and answer["error"]["status"] == "FAILED_PRECONDITION"
    assert "own registry" in answer["error"]["message"]
    status, _ = _call(client, "GET", f"registries/{access.registry_id}", role="reader")
    assert status == 200  # still served
    lab = f"lab-{uuid.uuid4().hex[:10]}"
    assert _call(client, "POST", "registries", {"id": lab})[0] == 200
    assert _call(client, "DELETE", f"registries/{lab}")[0] == 200  # another empty registry may go


@pytest.mark.emulator
def test_a_device_created_with_a_config_gets_it_as_version_1(api) -> None:
    client, access = api()
    devices = f"registries/{access.registry_id}/devices"
    data = b'{"rate": 5}'
    status, device = _call(client, "POST", devices,
                           {"id": f"dev-{uuid.uuid4().hex[:8]}", "config": {"binaryData": wire_b64(data)}})
    assert status == 200, device
    assert device["config"]["version"] == "1" and device["config"]["binaryData"] == wire_b64(data)
    status, versions = _call(client, "GET", f"{devices}/{device['id']}/configVersions", role="reader")
    assert status == 200 and [(v["version"], v["binaryData"]) for v in versions["deviceConfigs"]] == [
        ("1", wire_b64(data))]
    # Without one, version 1 is empty, as before; a version other than 0 on creation is refused, as IoT Core did.
    status, plain = _call(client, "POST", devices, {"id": f"dev-{uuid.uuid4().hex[:8]}"})
    assert status == 200 and plain["config"]["version"] == "1" and plain["config"].get("binaryData", "") == ""
    status, answer = _call(client, "POST", devices, {"id": f"dev-{uuid.uuid4().hex[:8]}",
                                                     "config": {"version": "3", "binaryData": wire_b64(data)}})
    assert status == 400 and "device.config.version" in answer["error"]["message"]
    big = {"binaryData": wire_b64(b"x" * (64 * 1024 + 1))}
    status, answer = _call(client, "POST", devices, {"id": f"dev-{uuid.uuid4().hex[:8]}", "config": big})
    assert status == 400 and "device.config.binary_data" in answer["error"]["message"]


def wire_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

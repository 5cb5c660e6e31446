"""The admin API's contract: every method of IoT Core's discovery document (``cloudiot.v1.json``), called through
Google's two Python clients, unmodified but for the endpoint — the discovery client (``googleapiclient``) and the
generated client (``google-cloud-iot``, REST transport, from its own virtual environment ``.venv-iot``: it needs
protobuf < 5) — answers what the document's schemas describe, and bad input gets IoT Core's status."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient import discovery
from googleapiclient.errors import HttpError

from iotbridge.device import Device, DeviceIdentity, generate_key

from .admin_server import all_methods, check, document
from .conftest import PROJECT, REGION, REGISTRY, REPO_ROOT

pytestmark = pytest.mark.emulator

LOCATION = f"projects/{PROJECT}/locations/{REGION}"
IOT_VENV = Path(os.environ.get("IOT_CLIENT_VENV", REPO_ROOT / ".venv-iot"))


class Calls:
    """Runs calls through the discovery client, checks each answer against the method's response schema and
    records which methods were called, successfully and with bad input."""

    def __init__(self) -> None:
        self.methods = all_methods()
        self.ok: set[str] = set()
        self.refused: set[str] = set()

    def _method(self, request: Any) -> dict[str, Any]:
        found = [m for m in self.methods.values() if m["httpMethod"] == request.method
                 and _matches(m["flatPath"], request.uri)]
        assert len(found) == 1, f"{request.method} {request.uri}: {len(found)} methods match"
        return found[0]

    def __call__(self, request: Any) -> dict[str, Any]:
        method = self._method(request)
        result = request.execute()
        check(method.get("response", {}).get("$ref", "Empty"), result, method["id"])
        self.ok.add(method["id"])
        return result

    def refused_with(self, status: str, request: Any, says: str = "") -> str:
        method = self._method(request)
        with pytest.raises(HttpError) as caught:
            request.execute()
        body = json.loads(caught.value.content)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "status"}, body
        assert (body["error"]["status"], caught.value.resp.status) == (status, body["error"]["code"]), \
            f"{method['id']}: {body}"
        assert says in body["error"]["message"], f"{method['id']}: {body['error']['message']!r} lacks {says!r}"
        self.refused.add(method["id"])
        return body["error"]["message"]


def _matches(flat_path: str, uri: str) -> bool:
    import re

    path = uri.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
    pattern = re.sub(r"\\\{[^}]+\\\}", "[^/:]+", re.escape(flat_path))
    return re.fullmatch(pattern, path) is not None


def key() -> str:
    return generate_key("ES256")[1]


def test_every_method_through_the_discovery_client(cloudiot, stack):
    calls = Calls()
    regs = cloudiot.projects().locations().registries()
    devs = regs.devices()
    groups = regs.groups()
    tag = uuid.uuid4().hex[:8]
    reg_id = f"contract-{tag}"
    parent = f"{LOCATION}/registries/{reg_id}"
    topic = f"projects/{PROJECT}/topics/contract-{tag}"

    # Registries.
    calls.refused_with("INVALID_ARGUMENT", regs.create(parent=LOCATION, body={"id": "1bad"}), "id")
    created = calls(regs.create(parent=LOCATION, body={
        "id": reg_id, "eventNotificationConfigs": [{"pubsubTopicName": topic, "subfolderMatches": "x"},
                                                   {"pubsubTopicName": topic}],
        "mqttConfig": {"mqttEnabledState": "MQTT_ENABLED"}, "logLevel": "ERROR"}))
    assert created["name"] == parent and created["logLevel"] == "ERROR"
    calls.refused_with("ALREADY_EXISTS", regs.create(parent=LOCATION, body={"id": reg_id}))
    assert calls(regs.get(name=parent))["eventNotificationConfigs"][0]["subfolderMatches"] == "x"
    calls.refused_with("NOT_FOUND", regs.get(name=f"{LOCATION}/registries/absent-{tag}"))
    assert reg_id in {r["id"] for r in calls(regs.list(parent=LOCATION))["deviceRegistries"]}
    calls.refused_with("INVALID_ARGUMENT", regs.list(parent=LOCATION, pageToken="%%%"), "page_token")
    patched = calls(regs.patch(name=parent, updateMask="logLevel,stateNotificationConfig.pubsubTopicName",
                               body={"logLevel": "DEBUG", "stateNotificationConfig": {"pubsubTopicName": topic}}))
    assert patched["logLevel"] == "DEBUG" and patched["stateNotificationConfig"]["pubsubTopicName"] == topic
    calls.refused_with("INVALID_ARGUMENT", regs.patch(name=parent, updateMask="id", body={"id": "other"}),
                       "update_mask")

    # Devices.
    calls.refused_with("INVALID_ARGUMENT", devs.create(parent=parent, body={
        "id": "dev-1", "credentials": [{"publicKey": {"format": "ES256_PEM", "key": "junk"}}]}),
        "device.credentials[0].publicKey.key")
    calls.refused_with("INVALID_ARGUMENT", devs.create(parent=parent, body={
        "id": "dev-1", "credentials": [{"publicKey": {"format": "ES256_PEM", "key": key()}}] * 4}),
        "device.credentials")
    private, public = generate_key("ES256")
    device = calls(devs.create(parent=parent, body={
        "id": f"dev-{tag}", "credentials": [{"publicKey": {"format": "ES256_PEM", "key": public},
                                             "expirationTime": "2999-01-01T00:00:00Z"}],
        "metadata": {"k": "v"}}))
    gateway = calls(devs.create(parent=parent, body={
        "id": f"gw-{tag}", "gatewayConfig": {"gatewayType": "GATEWAY", "gatewayAuthMethod": "ASSOCIATION_ONLY"}}))
    dev_name, gw_name = f"{parent}/devices/{device['id']}", f"{parent}/devices/{gateway['id']}"
    calls.refused_with("ALREADY_EXISTS", devs.create(parent=parent, body={"id": device["id"]}))
    assert calls(devs.get(name=f"{parent}/devices/{device['numId']}"))["id"] == device["id"]  # by numeric id too
    masked = calls(devs.get(name=dev_name, fieldMask="metadata"))
    assert set(masked) == {"id", "name", "numId", "metadata"}
    calls.refused_with("NOT_FOUND", devs.get(name=f"{parent}/devices/absent-{tag}"))
    listed = calls(devs.list(parent=parent, pageSize=1))
    assert len(listed["devices"]) == 1 and listed["nextPageToken"]
    rest = calls(devs.list(parent=parent, pageSize=1, pageToken=listed["nextPageToken"]))
    assert {listed["devices"][0]["id"], rest["devices"][0]["id"]} == {device["id"], gateway["id"]}
    assert [d["id"] for d in calls(devs.list(parent=parent, deviceIds=[device["id"]]))["devices"]] == [device["id"]]
    assert [d["id"] for d in calls(devs.list(parent=parent, gatewayListOptions_gatewayType="GATEWAY"))["devices"]] \
        == [gateway["id"]]
    calls.refused_with("INVALID_ARGUMENT", devs.list(parent=parent, fieldMask="nonsense"), "field_mask")
    patched_dev = calls(devs.patch(name=dev_name, updateMask="metadata,blocked,logLevel",
                                   body={"metadata": {"k": "w"}, "blocked": True, "logLevel": "DEBUG"}))
    assert patched_dev["metadata"] == {"k": "w"} and patched_dev["blocked"] and patched_dev["logLevel"] == "DEBUG"
    calls(devs.patch(name=dev_name, updateMask="blocked", body={"blocked": False}))
    calls.refused_with("INVALID_ARGUMENT", devs.patch(name=dev_name, updateMask="numId", body={}), "update_mask")

    # Gateways.
    calls.refused_with("INVALID_ARGUMENT", regs.bindDeviceToGateway(
        parent=parent, body={"gatewayId": device["id"], "deviceId": gateway["id"]}), "not a gateway")
    calls(regs.bindDeviceToGateway(parent=parent, body={"gatewayId": gateway["id"], "deviceId": device["id"]}))
    bound = calls(devs.list(parent=parent, gatewayListOptions_associationsGatewayId=gateway["id"]))
    assert [d["id"] for d in bound["devices"]] == [device["id"]]
    calls(regs.unbindDeviceFromGateway(parent=parent, body={"gatewayId": gateway["id"], "deviceId": device["id"]}))
    calls.refused_with("NOT_FOUND", regs.unbindDeviceFromGateway(
        parent=parent, body={"gatewayId": f"absent-{tag}", "deviceId": device["id"]}))

    # Configs, states, commands.
    data = b"\x00\xff config"
    cfg = calls(devs.modifyCloudToDeviceConfig(name=dev_name, body={
        "binaryData": base64.b64encode(data).decode(), "versionToUpdate": "1"}))
    assert cfg["version"] == "2" and base64.b64decode(cfg["binaryData"]) == data
    calls.refused_with("FAILED_PRECONDITION", devs.modifyCloudToDeviceConfig(
        name=dev_name, body={"binaryData": "AA==", "versionToUpdate": "1"}), "versionToUpdate")
    calls.refused_with("INVALID_ARGUMENT", devs.modifyCloudToDeviceConfig(
        name=dev_name, body={"binaryData": base64.b64encode(b"x" * 65537).decode()}), "binaryData")
    versions = calls(devs.configVersions().list(name=dev_name, numVersions=1))
    assert [v["version"] for v in versions["deviceConfigs"]] == ["2"]
    calls.refused_with("NOT_FOUND", devs.configVersions().list(name=f"{parent}/devices/absent-{tag}"))
    assert calls(devs.states().list(name=dev_name)) == {"deviceStates": []}
    calls.refused_with("INVALID_ARGUMENT", devs.states().list(name=dev_name, numStates=-1), "num_states")
    calls.refused_with("FAILED_PRECONDITION", devs.sendCommandToDevice(
        name=dev_name, body={"binaryData": "AA=="}), "not connected")
    calls.refused_with("INVALID_ARGUMENT", devs.sendCommandToDevice(name=dev_name, body={}), "binary_data")
    connected = Device(DeviceIdentity(PROJECT, REGION, reg_id, device["id"], private, "ES256"), stack.mqtt_host,
                       stack.mqtt_port, str(stack.ca_cert))
    connected.connect()
    try:
        connected.subscribe_commands()
        calls(devs.sendCommandToDevice(name=dev_name, body={"binaryData": "AP8="}))
        assert connected.commands.get(timeout=10) == (f"/devices/{device['id']}/commands", b"\x00\xff")
    finally:
        connected.disconnect()

    # IAM, on the registry and on its group.
    for resource, api in ((parent, regs), (f"{parent}/groups/{reg_id}", groups)):
        policy = calls(api.getIamPolicy(resource=resource, body={}))
        new = calls(api.setIamPolicy(resource=resource, body={"policy": {
            "bindings": [{"role": "roles/cloudiot.viewer", "members": ["user:ops@example.com"]}],
            "etag": policy["etag"]}}))
        assert new["bindings"] == [{"role": "roles/cloudiot.viewer", "members": ["user:ops@example.com"]}]
        calls.refused_with("ABORTED", api.setIamPolicy(resource=resource, body={"policy": {
            "bindings": [], "etag": policy["etag"]}}), "etag")
        calls.refused_with("INVALID_ARGUMENT", api.setIamPolicy(resource=resource, body={"policy": {
            "bindings": [{"role": "viewer", "members": []}]}}), "role")
        calls.refused_with("INVALID_ARGUMENT", api.getIamPolicy(resource=resource, body={"unknown": 1}), "unknown")
        granted = calls(api.testIamPermissions(resource=resource, body={
            "permissions": ["cloudiot.devices.get", "other.things.do"]}))
        assert granted["permissions"] == ["cloudiot.devices.get"]
        calls.refused_with("INVALID_ARGUMENT", api.testIamPermissions(resource=resource, body={
            "permissions": ["cloudiot.*"]}), "permission")
    assert {d["id"] for d in calls(groups.devices().list(parent=f"{parent}/groups/{reg_id}"))["devices"]} \
        == {device["id"], gateway["id"]}
    calls.refused_with("NOT_FOUND", groups.devices().list(parent=f"{parent}/groups/other-{tag}"))

    # Deletes, last.
    calls.refused_with("FAILED_PRECONDITION", regs.delete(name=parent), "devices")
    calls(devs.delete(name=dev_name))
    calls(devs.delete(name=gw_name))
    calls.refused_with("NOT_FOUND", devs.delete(name=dev_name))
    calls(regs.delete(name=parent))
    calls.refused_with("NOT_FOUND", regs.delete(name=parent))

    every = set(calls.methods)
    assert calls.ok == every, f"methods never answered: {sorted(every - calls.ok)}"
    assert calls.refused == every, f"methods never given bad input: {sorted(every - calls.refused)}"


def test_the_discovery_document_is_served_with_its_own_root(api_url):
    served = requests.get(f"{api_url}$discovery/rest", params={"version": "v1"}, timeout=10).json()
    assert served["rootUrl"] == api_url and served["baseUrl"] == api_url
    original = document()
    assert {k: v for k, v in served.items() if not k.endswith("ootUrl") and k != "baseUrl"} \
        == {k: v for k, v in original.items() if not k.endswith("ootUrl") and k != "baseUrl"}
    # Code that fetches the document builds its client from it and works.
    dynamic = discovery.build_from_document(served, credentials=AnonymousCredentials())
    assert dynamic.projects().locations().registries().get(name=f"{LOCATION}/registries/{REGISTRY}").execute()["id"] \
        == REGISTRY


def test_an_unknown_path_answers_in_googles_error_model(api_url):
    for method, path in (("GET", "v1/projects/x"), ("POST", "v2/anything"), ("PUT", f"v1/{LOCATION}/registries")):
        resp = requests.request(method, api_url + path, timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["status"] == "NOT_FOUND"
    resp = requests.post(f"{api_url}v1/{LOCATION}/registries", data=b"{not json", timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    resp = requests.get(f"{api_url}v1/projects/other/locations/{REGION}/registries", timeout=10)
    assert resp.status_code == 403 and resp.json()["error"]["status"] == "PERMISSION_DENIED"


GAPIC_SCRIPT = Path(__file__).with_name("gapic_client.py")


def run_gapic(api_url: str, *args: str) -> dict[str, Any]:
    python = IOT_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"prerequisite missing: {python} (make setup creates .venv-iot with google-cloud-iot)",
                    pytrace=False)
    out = subprocess.run([str(python), str(GAPIC_SCRIPT), api_url, PROJECT, REGION, *args], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_method_through_the_generated_client(api_url, devices):
    """google-cloud-iot's DeviceManagerClient (REST) has no groups methods; every other method is called."""
    tag = uuid.uuid4().hex[:8]
    connected = devices.connected()
    connected.subscribe_commands()
    device_name = f"{LOCATION}/registries/{REGISTRY}/devices/{connected.identity.device_id}"
    results = run_gapic(api_url, tag, key(), device_name)
    assert connected.commands.get(timeout=10) == (f"/devices/{connected.identity.device_id}/commands/ops",
                                                  b"\x00gapic")
    methods = all_methods()
    gapic = {mid for mid in methods if ".groups." not in mid}
    seen: set[str] = set()
    refused: set[str] = set()
    for entry in results["calls"]:
        mid = entry["method"]
        assert mid in methods, mid
        if "error" in entry:
            status = entry["error"]["status"]
            assert status == entry["expect"], entry
            refused.add(mid)
        else:
            check(methods[mid].get("response", {}).get("$ref", "Empty"), entry["response"], mid)
            seen.add(mid)
    assert seen == gapic, f"not answered: {sorted(gapic - seen)}"
    assert refused == gapic, f"never given bad input: {sorted(gapic - refused)}"



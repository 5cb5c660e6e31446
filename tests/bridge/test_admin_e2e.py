"""IoT Core's semantics through its own API: a device created with ``cloudiot.v1`` (Google's discovery client,
unmodified but for the endpoint) connects over MQTT through the front, gets its empty first config, a config of any
bytes, reports state, gets a command, and is disconnected when its credential is rotated; registries route their
devices' events to the topics they name. Everything real: emulators, Mosquitto, the front, the bridge, the API
as processes."""

from __future__ import annotations

import base64
import contextlib
import uuid
from typing import Any, cast

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from googleapiclient.errors import HttpError

from iotbridge.device import ConnectError, Device, DeviceIdentity, create_jwt, generate_key
from tests.waiting import wait_for

from .admin_server import check
from .conftest import PROJECT, REGION, REGISTRY, DeviceCA, connects

pytestmark = pytest.mark.emulator

LOCATION = f"projects/{PROJECT}/locations/{REGION}"


def error_status(exc: HttpError) -> tuple[int, str, str]:
    import json

    err = json.loads(exc.content)["error"]
    return exc.resp.status, err["status"], err["message"]


def new_device(cloudiot, registry_id: str = REGISTRY, device_id: str | None = None) -> tuple[str, bytes, dict]:
    device_id = device_id or f"api-{uuid.uuid4().hex[:10]}"
    private, public = generate_key("ES256")
    body = {"id": device_id, "credentials": [{"publicKey": {"format": "ES256_PEM", "key": public}}],
            "metadata": {"site": "lyon"}, "logLevel": "INFO"}
    created = cloudiot.projects().locations().registries().devices().create(
        parent=f"{LOCATION}/registries/{registry_id}", body=body).execute()
    check("Device", created)
    return device_id, private, created


def connect(stack, registry_id: str, device_id: str, private: bytes) -> Device:
    d = Device(DeviceIdentity(PROJECT, REGION, registry_id, device_id, private, "ES256"), stack.mqtt_host,
               stack.mqtt_port, str(stack.ca_cert))
    d.connect()
    return d


def test_device_lifecycle_through_the_api(cloudiot, stack):
    devices = cloudiot.projects().locations().registries().devices()
    device_id, private, created = new_device(cloudiot)
    name = f"{LOCATION}/registries/{REGISTRY}/devices/{device_id}"
    # IoT Core's first config: version 1, empty.
    assert created["config"]["version"] == "1" and created["config"].get("binaryData", "") == ""
    assert created["metadata"] == {"site": "lyon"} and created["logLevel"] == "INFO"

    # Not connected: a command is refused as IoT Core refused it.
    with pytest.raises(HttpError) as refused:
        devices.sendCommandToDevice(name=name, body={"binaryData": base64.b64encode(b"x").decode()}).execute()
    assert error_status(refused.value)[:2] == (400, "FAILED_PRECONDITION")

    dev = connect(stack, REGISTRY, device_id, private)
    try:
        dev.subscribe_config()
        assert dev.configs.get(timeout=10) == b"", "the empty first config is delivered on subscribe"

        data = b"\xff\x00\xfe not JSON \x80" + bytes(range(256))
        cfg = devices.modifyCloudToDeviceConfig(
            name=name, body={"binaryData": base64.b64encode(data).decode(), "versionToUpdate": "1"}).execute()
        check("DeviceConfig", cfg)
        assert cfg["version"] == "2"
        assert dev.configs.get(timeout=10) == data, "the config arrives byte-identical"
        with pytest.raises(HttpError) as stale:
            devices.modifyCloudToDeviceConfig(
                name=name, body={"binaryData": "AA==", "versionToUpdate": "1"}).execute()
        assert error_status(stale.value)[:2] == (400, "FAILED_PRECONDITION")

        versions = devices.configVersions().list(name=name).execute()
        check("ListDeviceConfigVersionsResponse", versions)
        assert [v["version"] for v in versions["deviceConfigs"]] == ["2", "1"]
        assert base64.b64decode(versions["deviceConfigs"][0]["binaryData"]) == data

        dev.publish_state(b"\x01state \xfe").wait_for_publish(10)
        states: Any = wait_for("the state in states.list",
                               lambda: devices.states().list(name=name).execute().get("deviceStates"), timeout=20)
        check("ListDeviceStatesResponse", {"deviceStates": states})
        assert base64.b64decode(states[0]["binaryData"]) == b"\x01state \xfe"

        dev.subscribe_commands()
        devices.sendCommandToDevice(name=name, body={"binaryData": base64.b64encode(b"\x00reboot").decode(),
                                                     "subfolder": "ops"}).execute()
        assert dev.commands.get(timeout=10) == (f"/devices/{device_id}/commands/ops", b"\x00reboot")

        # Rotating the credential ends the session the old key opened.
        _, public2 = generate_key("ES256")
        patched = devices.patch(name=name, updateMask="credentials", body={
            "credentials": [{"publicKey": {"format": "ES256_PEM", "key": public2}}]}).execute()
        check("Device", patched)
        assert patched["credentials"][0]["publicKey"]["key"] == public2
        dev.disconnects.get(timeout=10)
        assert not dev.is_connected()
    finally:
        dev.disconnect()


def test_two_registries_route_events_to_the_topics_they_name(cloudiot, stack):
    registries = cloudiot.projects().locations().registries()
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    tag = uuid.uuid4().hex[:8]
    subs: dict[str, str] = {}
    for key in ("a-events", "a-alerts", "a-state", "b-events"):
        topic = publisher.topic_path(PROJECT, f"routes-{tag}-{key}")
        publisher.create_topic(request={"name": topic})
        subs[key] = subscriber.subscription_path(PROJECT, f"routes-{tag}-{key}")
        subscriber.create_subscription(request={"name": subs[key], "topic": topic})
    topic = {k: s.replace("/subscriptions/", "/topics/") for k, s in subs.items()}
    reg_a, reg_b = f"reg-a-{tag}", f"reg-b-{tag}"
    created = registries.create(parent=LOCATION, body={
        "id": reg_a, "eventNotificationConfigs": [
            {"subfolderMatches": "alerts", "pubsubTopicName": topic["a-alerts"]},
            {"pubsubTopicName": topic["a-events"]}],
        "stateNotificationConfig": {"pubsubTopicName": topic["a-state"]}}).execute()
    check("DeviceRegistry", created)
    registries.create(parent=LOCATION, body={
        "id": reg_b, "eventNotificationConfigs": [{"pubsubTopicName": topic["b-events"]}]}).execute()
    listed = registries.list(parent=LOCATION).execute()
    check("ListDeviceRegistriesResponse", listed)
    assert {reg_a, reg_b, REGISTRY} <= {r["id"] for r in listed["deviceRegistries"]}

    id_a, key_a, _ = new_device(cloudiot, reg_a)
    id_b, key_b, _ = new_device(cloudiot, reg_b)
    # A device id is unique across the deployment's registries (they share the broker's topics).
    with pytest.raises(HttpError) as taken:
        new_device(cloudiot, reg_b, id_a)
    assert error_status(taken.value)[:2] == (409, "ALREADY_EXISTS")

    dev_a, dev_b = connect(stack, reg_a, id_a, key_a), connect(stack, reg_b, id_b, key_b)
    try:
        dev_a.publish_event(b"a plain").wait_for_publish(10)
        dev_a.publish_event(b"a alert", sub_folder="alerts").wait_for_publish(10)
        dev_a.publish_state(b"a state").wait_for_publish(10)
        dev_b.publish_event(b"b plain").wait_for_publish(10)
        got = {k: pull_one(subscriber, s) for k, s in subs.items()}
    finally:
        dev_a.disconnect()
        dev_b.disconnect()
    assert got["a-events"].data == b"a plain" and got["a-events"].attributes["deviceRegistryId"] == reg_a
    assert got["a-alerts"].data == b"a alert" and got["a-alerts"].attributes["subFolder"] == "alerts"
    assert got["a-state"].data == b"a state" and got["a-state"].attributes["deviceId"] == id_a
    assert got["b-events"].data == b"b plain" and got["b-events"].attributes["deviceRegistryId"] == reg_b

    # A device of one registry cannot claim another registry in its client id.
    wrong = Device(DeviceIdentity(PROJECT, REGION, reg_a, id_b, key_b, "ES256"), stack.mqtt_host, stack.mqtt_port,
                   str(stack.ca_cert))
    with pytest.raises(ConnectionError):
        wrong.connect(timeout=10)
    wrong.disconnect()


def pull_one(subscriber: pubsub_v1.SubscriberClient, subscription: str, timeout: float = 30.0) -> Any:
    def attempt():
        with contextlib.suppress(gexc.DeadlineExceeded):
            resp = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=2)
            if resp.received_messages:
                subscriber.acknowledge(request={"subscription": subscription,
                                                "ack_ids": [m.ack_id for m in resp.received_messages]})
                return resp.received_messages[0].message
        return None

    return cast(Any, wait_for(f"a message on {subscription}", attempt, timeout=timeout))




def new_registry(cloudiot, **body: Any) -> str:
    registry_id = f"reg-{uuid.uuid4().hex[:10]}"
    cloudiot.projects().locations().registries().create(parent=LOCATION, body={"id": registry_id, **body}).execute()
    return registry_id


def patch_registry(cloudiot, registry_id: str, mask: str, body: dict[str, Any]) -> dict[str, Any]:
    return cloudiot.projects().locations().registries().patch(
        name=f"{LOCATION}/registries/{registry_id}", updateMask=mask, body=body).execute()


def http_post(stack, registry_id: str, device_id: str, private: bytes, verb: str, body: dict[str, Any]):
    url = (f"{stack.http_bridge_url}/v1/{LOCATION}/registries/{registry_id}/devices/{device_id}{verb}")
    headers = {"authorization": f"Bearer {create_jwt(PROJECT, private, 'ES256')}"}
    return requests.post(url, json=body, headers=headers, verify=str(stack.ca_cert), timeout=30)


def http_config(stack, registry_id: str, device_id: str, private: bytes):
    url = f"{stack.http_bridge_url}/v1/{LOCATION}/registries/{registry_id}/devices/{device_id}/config"
    headers = {"authorization": f"Bearer {create_jwt(PROJECT, private, 'ES256')}"}
    return requests.get(url, params={"local_version": 0}, headers=headers, verify=str(stack.ca_cert), timeout=30)


def test_mqtt_disabled_refuses_connects_and_ends_sessions(cloudiot, stack):
    registry_id = new_registry(cloudiot)
    device_id, private, _ = new_device(cloudiot, registry_id)
    dev = connect(stack, registry_id, device_id, private)
    try:
        patched = patch_registry(cloudiot, registry_id, "mqtt_config",
                                 {"mqttConfig": {"mqttEnabledState": "MQTT_DISABLED"}})
        assert patched["mqttConfig"]["mqttEnabledState"] == "MQTT_DISABLED"
        dev.disconnects.get(timeout=10)  # the connected session ends at the next re-check
        assert not dev.is_connected()
    finally:
        dev.disconnect()
    again = Device(DeviceIdentity(PROJECT, REGION, registry_id, device_id, private, "ES256"), stack.mqtt_host,
                   stack.mqtt_port, str(stack.ca_cert))
    with pytest.raises(ConnectError) as refused:
        again.connect(timeout=10)
    assert str(refused.value.reason) == "Not authorized", refused.value
    # HTTP stays on: only MQTT was disabled. (Reads only: this registry names no topics, so its events would go
    # to the deployment's telemetry topic, which other tests read.)
    r = http_config(stack, registry_id, device_id, private)
    assert r.status_code == 200, r.text

    patch_registry(cloudiot, registry_id, "mqtt_config", {"mqttConfig": {"mqttEnabledState": "MQTT_ENABLED"}})
    wait_for("MQTT enabled again", lambda: connects(again), timeout=15)
    again.disconnect()


def test_http_disabled_refuses_http_requests(cloudiot, stack):
    registry_id = new_registry(cloudiot, httpConfig={"httpEnabledState": "HTTP_DISABLED"})
    device_id, private, _ = new_device(cloudiot, registry_id)
    for r in (http_post(stack, registry_id, device_id, private, ":publishEvent", {"binary_data": "eA=="}),
              http_config(stack, registry_id, device_id, private)):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["status"] == "PERMISSION_DENIED"
        assert "HTTP is disabled" in r.json()["error"]["message"]
    # MQTT stays on.
    connect(stack, registry_id, device_id, private).disconnect()
    patch_registry(cloudiot, registry_id, "http_config", {"httpConfig": {"httpEnabledState": "HTTP_ENABLED"}})
    wait_for("HTTP enabled again", lambda: http_config(stack, registry_id, device_id, private).status_code == 200,
             timeout=15)


def test_http_bridge_serves_the_registry_its_path_names(cloudiot, stack):
    registry_id = new_registry(cloudiot)
    device_id, private, _ = new_device(cloudiot, registry_id)
    devices = cloudiot.projects().locations().registries().devices()
    devices.modifyCloudToDeviceConfig(name=f"{LOCATION}/registries/{registry_id}/devices/{device_id}",
                                      body={"binaryData": base64.b64encode(b"\x00cfg\xff").decode()}).execute()
    r = http_config(stack, registry_id, device_id, private)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["binaryData"]) == b"\x00cfg\xff" and r.json()["version"] == "2"
    # The device is not in the deployment's own registry: named there, it is unknown.
    r = http_post(stack, REGISTRY, device_id, private, ":publishEvent", {"binary_data": "eA=="})
    assert r.status_code == 401, r.text


def test_gateway_attaches_the_devices_of_its_own_registry(cloudiot, stack):
    registry_id = new_registry(cloudiot)
    parent = f"{LOCATION}/registries/{registry_id}"
    devices = cloudiot.projects().locations().registries().devices()
    gw_id, gw_key = f"gw-{uuid.uuid4().hex[:10]}", generate_key("ES256")
    devices.create(parent=parent, body={
        "id": gw_id, "credentials": [{"publicKey": {"format": "ES256_PEM", "key": gw_key[1]}}],
        "gatewayConfig": {"gatewayType": "GATEWAY", "gatewayAuthMethod": "ASSOCIATION_ONLY"}}).execute()
    device_id, _, _ = new_device(cloudiot, registry_id)
    cloudiot.projects().locations().registries().bindDeviceToGateway(
        parent=parent, body={"gatewayId": gw_id, "deviceId": device_id}).execute()
    devices.modifyCloudToDeviceConfig(name=f"{parent}/devices/{device_id}",
                                      body={"binaryData": base64.b64encode(b"bound cfg").decode()}).execute()
    gw = connect(stack, registry_id, gw_id, gw_key[0])
    try:
        gw.subscribe_errors()
        gw.attach(device_id).wait_for_publish(10)
        # Attached (recorded once the attach passed), then it speaks for the device.
        got = wait_for("the gateway access recorded", lambda: devices.get(
            name=f"{parent}/devices/{device_id}").execute()["gatewayConfig"].get("lastAccessedGatewayId"), timeout=15)
        assert got == gw_id
        gw.subscribe_config(device_id=device_id)
        assert gw.configs_of(device_id).get(timeout=20) == b"bound cfg"
        assert gw.errors.empty(), gw.errors.get()
    finally:
        gw.disconnect()


def test_deleting_a_gateway_unbinds_its_devices(cloudiot):
    registry_id = new_registry(cloudiot)
    parent = f"{LOCATION}/registries/{registry_id}"
    registries = cloudiot.projects().locations().registries()
    devices = registries.devices()
    gw_id = f"gw-{uuid.uuid4().hex[:10]}"
    gateway = {"id": gw_id, "gatewayConfig": {"gatewayType": "GATEWAY", "gatewayAuthMethod": "ASSOCIATION_ONLY"}}
    devices.create(parent=parent, body=gateway).execute()
    device_id, _, _ = new_device(cloudiot, registry_id)
    registries.bindDeviceToGateway(parent=parent, body={"gatewayId": gw_id, "deviceId": device_id}).execute()
    of_device = {"parent": parent, "gatewayListOptions_associationsDeviceId": device_id}
    assert [d["id"] for d in devices.list(**of_device).execute()["devices"]] == [gw_id]

    devices.delete(name=f"{parent}/devices/{gw_id}").execute()
    assert devices.list(**of_device).execute().get("devices", []) == []
    # A gateway created again under the id inherits no binding.
    devices.create(parent=parent, body=gateway).execute()
    of_gateway = {"parent": parent, "gatewayListOptions_associationsGatewayId": gw_id}
    assert devices.list(**of_gateway).execute().get("devices", []) == []


def test_registry_ca_certificates_sign_the_x509_credentials(cloudiot, tmp_path):
    ca, rogue = DeviceCA(tmp_path / "ca"), DeviceCA(tmp_path / "rogue")
    registry_id = new_registry(cloudiot, credentials=[{"publicKeyCertificate": {
        "format": "X509_CERTIFICATE_PEM", "certificate": ca.path.read_text()}}])
    parent = f"{LOCATION}/registries/{registry_id}"
    devices = cloudiot.projects().locations().registries().devices()

    def x509_credential(pem: str) -> dict[str, Any]:
        return {"publicKey": {"format": "ES256_X509_PEM", "key": pem}}

    signed, _, _ = ca.issue("signed")
    devices.create(parent=parent, body={"id": f"x509-{uuid.uuid4().hex[:8]}",
                                        "credentials": [x509_credential(signed)]}).execute()
    with pytest.raises(HttpError) as refused:
        devices.create(parent=parent, body={"id": f"x509-{uuid.uuid4().hex[:8]}", "credentials": [
            x509_credential(signed), x509_credential(rogue.issue("rogue")[0])]}).execute()
    code, status, message = error_status(refused.value)
    assert (code, status) == (400, "INVALID_ARGUMENT")
    assert "device.credentials[1].publicKey.key" in message
    # A plain public key is not a certificate: no CA has to sign it; a patch to an unsigned certificate is refused.
    device_id, _, _ = new_device(cloudiot, registry_id)
    with pytest.raises(HttpError) as patched:
        devices.patch(name=f"{parent}/devices/{device_id}", updateMask="credentials",
                      body={"credentials": [x509_credential(rogue.issue("rogue-2")[0])]}).execute()
    assert error_status(patched.value)[:2] == (400, "INVALID_ARGUMENT")
    # Without CA certificates in the registry, any certificate is taken.
    other = new_registry(cloudiot)
    devices.create(parent=f"{LOCATION}/registries/{other}", body={
        "id": f"x509-{uuid.uuid4().hex[:8]}", "credentials": [x509_credential(rogue.issue("rogue-3")[0])]}).execute()


def test_a_certificate_the_registry_cas_no_longer_sign_cannot_connect(cloudiot, stack, tmp_path):
    ca, other = DeviceCA(tmp_path / "ca"), DeviceCA(tmp_path / "other")

    def ca_credentials(*cas: DeviceCA) -> list[dict[str, Any]]:
        return [{"publicKeyCertificate": {"format": "X509_CERTIFICATE_PEM", "certificate": c.path.read_text()}}
                for c in cas]

    registry_id = new_registry(cloudiot, credentials=ca_credentials(ca))
    device_id = f"x509-{uuid.uuid4().hex[:8]}"
    cert, _, key_file = ca.issue(device_id)
    cloudiot.projects().locations().registries().devices().create(
        parent=f"{LOCATION}/registries/{registry_id}",
        body={"id": device_id, "credentials": [{"publicKey": {"format": "ES256_X509_PEM", "key": cert}}]}).execute()
    connect(stack, registry_id, device_id, key_file.read_bytes()).disconnect()

    patch_registry(cloudiot, registry_id, "credentials", {"credentials": ca_credentials(other)})
    dev = Device(DeviceIdentity(PROJECT, REGION, registry_id, device_id, key_file.read_bytes(), "ES256"),
                 stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))

    def refused() -> str | None:
        try:
            dev.connect(timeout=10)
        except ConnectError as exc:
            return str(exc.reason)
        dev.disconnect()
        return None

    assert wait_for("the connect refused", refused, timeout=15) == "Bad user name or password"

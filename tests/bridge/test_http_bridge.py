"""The HTTP device bridge against the running host (real Mosquitto, front, bridge service, emulators): a device
speaks Cloud IoT Core's ``cloudiotdevice`` API with plain ``requests`` and its messages reach Pub/Sub with the same
attributes as over MQTT; refusals carry IoT Core's status codes and Google's error body."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import pytest
import requests

from iotbridge.device import Algorithm, create_jwt, generate_key
from iotbridge.registry import Credential
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY

pytestmark = pytest.mark.emulator


def _url(stack, device_id: str, verb: str, project: str = PROJECT) -> str:
    return (f"{stack.http_bridge_url}/v1/projects/{project}/locations/{REGION}/registries/{REGISTRY}"
            f"/devices/{device_id}{verb}")


class HttpDevice:
    def __init__(self, stack, registry, algorithm: Algorithm = "ES256"):
        self.stack = stack
        self.id = f"http-{uuid.uuid4().hex[:10]}"
        self.private, public = generate_key(algorithm)
        self.algorithm = algorithm
        registry.create_device(self.id, [Credential("ES256_PEM" if algorithm == "ES256" else "RSA_PEM", public)])

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or create_jwt(PROJECT, self.private, self.algorithm)}",
                "cache-control": "no-cache"}

    def post(self, verb: str, body: dict[str, Any], token: str | None = None, **kw) -> requests.Response:
        return requests.post(_url(self.stack, self.id, verb), json=body, headers=self.headers(token),
                             verify=str(self.stack.ca_cert), timeout=30, **kw)

    def config(self, local_version: int, token: str | None = None) -> requests.Response:
        return requests.get(_url(self.stack, self.id, "/config"), params={"local_version": local_version},
                            headers=self.headers(token), verify=str(self.stack.ca_cert), timeout=30)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(resp: requests.Response, code: int, status: str) -> str:
    assert resp.status_code == code, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["status"] == status
    return err["message"]


@pytest.fixture
def http_device(stack, registry) -> HttpDevice:
    return HttpDevice(stack, registry)


def test_events_and_state_reach_pubsub_with_the_mqtt_attributes(stack, registry, reader, http_device):
    dev = http_device
    num_id = registry.get_device(dev.id).num_id
    payloads = [b'{"ts": 1, "metrics": {"rpm": 1}}', bytes(range(256))]
    for p in payloads:
        r = dev.post(":publishEvent", {"binary_data": _b64(p)})
        assert (r.status_code, r.json()) == (200, {})
    assert dev.post(":publishEvent", {"binary_data": _b64(b"log line"), "sub_folder": "logs"}).status_code == 200
    assert dev.post(":setState", {"state": {"binary_data": _b64(b'{"fw": "2"}')}}).status_code == 200

    base = {"deviceId": dev.id, "deviceNumId": num_id, "deviceRegistryId": REGISTRY,
            "deviceRegistryLocation": REGION, "projectId": PROJECT}
    telemetry = reader.pull("telemetry", 2)
    assert sorted(m.data for m in telemetry) == sorted(payloads)
    assert all(dict(m.attributes) == base for m in telemetry)
    logs = reader.pull("device-logs", 1)
    assert [(m.data, dict(m.attributes)) for m in logs] == [(b"log line", {**base, "subFolder": "logs"})]
    state = reader.pull("state", 1)
    assert [(m.data, dict(m.attributes)) for m in state] == [(b'{"fw": "2"}', base)]
    wait_for("the state in the registry", lambda: registry.get_device(dev.id).state,
             lambda state: state == b'{"fw": "2"}', timeout=15)


def test_config_by_local_version(stack, registry, http_device):
    dev = http_device
    # A new device has config version 1 with empty data, as IoT Core gave it.
    first = dev.config(0).json()
    assert first["version"] == "1" and base64.b64decode(first["binaryData"]) == b""
    assert "binaryData" not in dev.config(1).json()  # up to date
    _error(dev.config(2), 400, "OUT_OF_RANGE")
    registry.update_config(dev.id, b"cfg-2", min_interval_s=0)
    registry.update_config(dev.id, b"cfg-3", min_interval_s=0)
    current = dev.config(0).json()
    assert current["version"] == "3" and base64.b64decode(current["binaryData"]) == b"cfg-3"
    assert current["cloudUpdateTime"].endswith("Z")
    newer = dev.config(2).json()  # the device holds v2: v3 is newer
    assert newer["version"] == "3" and base64.b64decode(newer["binaryData"]) == b"cfg-3"
    same = dev.config(3).json()  # up to date: no data
    assert same["version"] == "3" and "binaryData" not in same
    assert "ahead" in _error(dev.config(4), 400, "OUT_OF_RANGE")
    _error(dev.config(-1), 400, "INVALID_ARGUMENT")
    # A config the device fetched counts as received.
    assert registry.list_config_versions(dev.id)[0].device_ack_time is not None


def test_refusals_carry_iot_core_status_codes(stack, registry, reader, http_device):
    dev = http_device
    ok = {"binary_data": _b64(b"x")}
    # No token, a token signed by another key, an expired one, and an unknown device: all 401, alike.
    r = requests.post(_url(stack, dev.id, ":publishEvent"), json=ok, verify=str(stack.ca_cert), timeout=30)
    _error(r, 401, "UNAUTHENTICATED")
    other, _ = generate_key("ES256")
    _error(dev.post(":publishEvent", ok, token=create_jwt(PROJECT, other, "ES256")), 401, "UNAUTHENTICATED")
    expired = create_jwt(PROJECT, dev.private, "ES256", lifetime_s=60, now=time.time() - 3600)
    _error(dev.post(":publishEvent", ok, token=expired), 401, "UNAUTHENTICATED")
    r = requests.post(_url(stack, "no-such-device", ":publishEvent"), json=ok, headers=dev.headers(),
                      verify=str(stack.ca_cert), timeout=30)
    _error(r, 401, "UNAUTHENTICATED")
    # Another project's path.
    r = requests.post(_url(stack, dev.id, ":publishEvent", project="other-project"), json=ok, headers=dev.headers(),
                      verify=str(stack.ca_cert), timeout=30)
    _error(r, 404, "NOT_FOUND")
    # Bad base64, a wildcard subfolder, an event over 256 KB, a state over 64 KB, a body over the read limit.
    _error(dev.post(":publishEvent", {"binary_data": "12#"}), 400, "INVALID_ARGUMENT")
    _error(dev.post(":publishEvent", {"binary_data": _b64(b"x"), "sub_folder": "a/+"}), 400, "INVALID_ARGUMENT")
    _error(dev.post(":publishEvent", {"binary_data": _b64(b"x" * (256 * 1024 + 1))}), 400, "INVALID_ARGUMENT")
    _error(dev.post(":setState", {"state": {"binary_data": _b64(b"x" * (64 * 1024 + 1))}}), 400, "INVALID_ARGUMENT")
    _error(dev.post(":publishEvent", {"binary_data": _b64(b"x" * (1024 * 1024))}), 413, "INVALID_ARGUMENT")
    # Blocked: 403 once the JWT proved the device; a token the bridge remembers as verified is refused too, within
    # the re-check interval (as an MQTT session of a blocked device is dropped).
    kept = create_jwt(PROJECT, dev.private, "ES256")
    assert dev.post(":publishEvent", {"binary_data": _b64(b"before the block")}, token=kept).status_code == 200
    registry.set_blocked(dev.id, True)
    _error(dev.post(":publishEvent", ok), 403, "PERMISSION_DENIED")
    during = {"binary_data": _b64(b"within the re-check interval")}
    wait_for("the remembered token refused", lambda: dev.post(":publishEvent", during, token=kept).status_code,
             lambda code: code == 403, timeout=10)
    _error(dev.config(0), 403, "PERMISSION_DENIED")
    # Nothing refused was forwarded (what the remembered token sent before its re-check was accepted, and arrives).
    forwarded = [m.data for m in reader.pull("telemetry", 1, settle=1.0) if m.attributes["deviceId"] == dev.id]
    assert b"before the block" in forwarded
    assert set(forwarded) <= {b"before the block", b"within the re-check interval"}


def test_over_the_device_limits_is_429(bridge_env, tmp_path, registry):
    from .conftest import new_stack

    st = new_stack(tmp_path / "limited", bridge_env, device_messages_per_s=2.0, device_state_per_s=1.0)
    try:
        dev = HttpDevice(st, registry)
        codes = [dev.post(":publishEvent", {"binary_data": _b64(b"x")}).status_code for _ in range(6)]
        assert codes[:2] == [200, 200] and 429 in codes, codes
        r = dev.post(":publishEvent", {"binary_data": _b64(b"x")})
        message = _error(r, 429, "RESOURCE_EXHAUSTED")
        assert "rate limit" in message
        wait_for("the rate limit recorded", lambda: registry.get_device(dev.id).last_error_status,
                 lambda status: "rate limit" in status, timeout=15)
    finally:
        st.stop()

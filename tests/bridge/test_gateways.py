"""Gateways against the running host (real Mosquitto, front, bridge service, emulators): a gateway attaches the
devices bound to it, speaks for them (events, state, config, commands), hears of its mistakes on its errors
topic, and can never act for a device that is not bound to it or not attached."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from google.cloud import pubsub_v1

from iotbridge.bridge import fanout, mqtt
from iotbridge.bridge.gateway import MAX_UNSENT_BYTES
from iotbridge.device import DeviceIdentity, create_jwt
from iotbridge.local.broker_host import BridgeStack
from iotbridge.registry import GatewayAuthMethod, GatewayConfig
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY, DeviceFactory, new_stack, retained

pytestmark = pytest.mark.emulator


def _error(gw, device_id: str, timeout: float = 15.0) -> dict:
    """The next error the gateway received about ``device_id`` (errors about other devices are skipped)."""

    def next_error() -> dict | None:
        try:
            err = gw.errors.get(timeout=0.1)
        except queue.Empty:
            return None
        return err if err.get("device_id") == device_id else None

    found = wait_for(f"an error about {device_id} on the gateway's errors topic", next_error, timeout=timeout,
                     interval=0)
    assert found is not None
    return found


@pytest.fixture
def gateway_setup(devices, registry):
    """A gateway (ASSOCIATION_ONLY) and three devices bound to it, one asking for each auth method, plus one
    device that is not bound; each bound device has a config."""
    gw_id, gw_key = devices.register(gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
    methods: list[GatewayAuthMethod | None] = [None, "DEVICE_AUTH_TOKEN_ONLY", "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"]
    bound: dict[str, bytes] = {}
    for method in methods:
        device_id, key = devices.register(gateway_config=GatewayConfig("NON_GATEWAY", method))
        registry.bind_device_to_gateway(gw_id, device_id)
        registry.update_config(device_id, f"config of {device_id}".encode())
        bound[device_id] = key
    stranger_id, stranger_key = devices.register()
    gw = devices.device(gw_id, gw_key)
    gw.connect()
    gw.subscribe_errors()
    return gw, bound, (stranger_id, stranger_key)


def _token(key: bytes) -> str:
    return create_jwt(PROJECT, key, "ES256")


def test_gateway_speaks_for_three_bound_devices(gateway_setup, registry, reader, stack):
    gw, bound, _ = gateway_setup
    ids = list(bound)
    plain, token_only, both = ids
    # Without the device's JWT, the two devices whose auth method asks for one are refused.
    gw.attach(token_only).wait_for_publish(10)
    assert "attach refused" in _error(gw, token_only)["description"]
    gw.attach(both, token="not-a-jwt").wait_for_publish(10)
    assert _error(gw, both)["error_type"] == "GATEWAY_ATTACHMENT_ERROR"
    gw.attach(plain).wait_for_publish(10)
    gw.attach(token_only, token=_token(bound[token_only])).wait_for_publish(10)
    gw.attach(both, token=_token(bound[both])).wait_for_publish(10)
    for d in ids:
        gw.subscribe_config(device_id=d)
        gw.subscribe_commands(device_id=d)
    for d in ids:
        assert gw.configs_of(d).get(timeout=20) == f"config of {d}".encode()
    wait_for("the attached devices' presence", lambda: [fanout.is_connected(registry.client, REGISTRY, d) for d in ids],
             all, timeout=15)
    publisher = pubsub_v1.PublisherClient()
    for d in ids:
        fanout.send_command(registry, publisher, stack.settings.prefix, d, f"cmd {d}".encode())
    for d in ids:
        assert gw.commands_of(d).get(timeout=20) == (f"/devices/{d}/commands", f"cmd {d}".encode())
        gw.publish_event(f"event of {d}".encode(), device_id=d).wait_for_publish(10)
        gw.publish_state(f"state of {d}".encode(), device_id=d).wait_for_publish(10)
    gw.publish_event(b"gateway's own").wait_for_publish(10)

    telemetry = {m.data: dict(m.attributes) for m in reader.pull("telemetry", 4)}
    gw_id = gw.identity.device_id
    for d in ids:
        assert telemetry[f"event of {d}".encode()] == {
            "deviceId": d, "deviceNumId": registry.get_device(d).num_id, "deviceRegistryId": REGISTRY,
            "deviceRegistryLocation": REGION, "projectId": PROJECT, "gatewayId": gw_id}
    assert telemetry[b"gateway's own"]["deviceId"] == gw_id and "gatewayId" not in telemetry[b"gateway's own"]
    states = {m.attributes["deviceId"]: (m.data, m.attributes["gatewayId"]) for m in reader.pull("state", 3)}
    assert states == {d: (f"state of {d}".encode(), gw_id) for d in ids}
    assert registry.get_device(plain).gateway_config.last_accessed_gateway_id == gw_id


def test_gateway_cannot_act_for_unbound_or_detached_devices(gateway_setup, registry, reader):
    gw, bound, (stranger, stranger_key) = gateway_setup
    plain, token_only, _ = list(bound)
    # An unbound device: not attachable even with its own valid JWT; its topics refused.
    gw.attach(stranger, token=_token(stranger_key)).wait_for_publish(10)
    assert _error(gw, stranger)["error_type"] == "GATEWAY_ATTACHMENT_ERROR"
    gw.publish_event(b"forged", device_id=stranger).wait_for_publish(10)
    assert _error(gw, stranger)["error_type"] == "GATEWAY_DEVICE_NOT_FOUND"
    # A bound device that was never attached, then attached and detached.
    gw.publish_event(b"too early", device_id=plain).wait_for_publish(10)
    assert _error(gw, plain)["error_type"] == "GATEWAY_DEVICE_NOT_FOUND"
    gw.attach(plain).wait_for_publish(10)
    gw.publish_event(b"attached", device_id=plain).wait_for_publish(10)
    gw.detach(plain).wait_for_publish(10)
    gw.publish_event(b"after detach", device_id=plain).wait_for_publish(10)
    assert _error(gw, plain)["error_type"] == "GATEWAY_DEVICE_NOT_FOUND"
    # Unbinding detaches an attached device at the next re-check.
    gw.attach(token_only, token=_token(bound[token_only])).wait_for_publish(10)
    registry.unbind_device_from_gateway(gw.identity.device_id, token_only)
    assert "unbound" in _error(gw, token_only)["description"]
    assert [m.data for m in reader.pull("telemetry", 1, settle=2.0)] == [b"attached"]
    assert gw.is_connected()


def test_blocking_a_bound_device_stops_only_that_device(gateway_setup, registry, reader):
    gw, bound, _ = gateway_setup
    plain, token_only, both = list(bound)
    gw.attach(plain).wait_for_publish(10)
    gw.attach(both, token=_token(bound[both])).wait_for_publish(10)
    registry.set_blocked(both, True)
    assert "blocked" in _error(gw, both)["description"]
    gw.publish_event(b"from the blocked one", device_id=both).wait_for_publish(10)
    gw.publish_event(b"from the other one", device_id=plain).wait_for_publish(10)
    assert _error(gw, both)["error_type"] == "GATEWAY_DEVICE_NOT_FOUND"
    gw.attach(both, token=_token(bound[both])).wait_for_publish(10)
    assert "blocked" in _error(gw, both)["description"]
    assert [m.data for m in reader.pull("telemetry", 1, settle=2.0)] == [b"from the other one"]
    assert gw.is_connected()
    del token_only


def test_a_gateway_naming_an_invalid_device_id_is_answered_briefly_and_held_to_its_own_limits(gateway_setup, stack):
    gw, _, _ = gateway_setup
    gw_id = gw.identity.device_id
    long_id = "x" * 30_000  # longer than any device id: each publish costs about 30 KB of the gateway's bytes
    slowed = stack.front_stats()["device_slowed"]
    started = time.monotonic()
    sent = [gw.publish_event(b"", device_id=long_id) for _ in range(40)]  # 1.2 MB, over 512 KiB/s
    for info in sent:
        info.wait_for_publish(30)
    err = _error(gw, "")
    assert err["error_type"] == "GATEWAY_INVALID_MQTT_TOPIC" and len(json.dumps(err)) < 200
    # Every one of them was charged to the gateway's own bucket: the front slowed it (about a second's wait).
    assert time.monotonic() - started > 0.8
    assert stack.front_stats()["device_slowed"] > slowed
    log_text = stack.log_text("front")
    assert "x" * 400 not in log_text
    assert log_text.count(f"gateway {gw_id}, device") == 1  # logged once, not per packet
    assert gw.is_connected()


def test_an_auth_method_changed_while_the_gateway_is_connected_holds_for_its_next_attach(gateway_setup, registry,
                                                                                         reader):
    gw, bound, _ = gateway_setup
    plain = list(bound)[0]
    registry.set_gateway_auth_method(gw.identity.device_id, "DEVICE_AUTH_TOKEN_ONLY")
    gw.attach(plain).wait_for_publish(10)
    assert "attach refused" in _error(gw, plain)["description"]
    gw.attach(plain, token=_token(bound[plain])).wait_for_publish(10)
    gw.publish_event(b"attached with its JWT", device_id=plain).wait_for_publish(10)
    assert [m.data for m in reader.pull("telemetry", 1)] == [b"attached with its JWT"]


def test_a_config_subscribed_to_before_the_attach_arrives_at_the_attach(gateway_setup):
    gw, bound, _ = gateway_setup
    plain = list(bound)[0]
    gw.attach(plain).wait_for_publish(10)
    gw.subscribe_config(device_id=plain)
    assert gw.configs_of(plain).get(timeout=20) == f"config of {plain}".encode()
    # Detached, the subscription stays; the config the broker already holds comes again at the next attach.
    gw.detach(plain).wait_for_publish(10)
    gw.attach(plain).wait_for_publish(10)
    assert gw.configs_of(plain).get(timeout=20) == f"config of {plain}".encode()


def test_a_device_leaving_through_its_gateway_leaves_no_retained_config_behind(gateway_setup, stack):
    """Configs go only to the host that holds a device, so a copy the broker retains for a device no session here
    holds would go stale; a device attached through a gateway is held here like one connected itself."""
    gw, bound, _ = gateway_setup
    plain, _, _ = list(bound)
    topic = f"/devices/{plain}/config"
    gw.attach(plain).wait_for_publish(10)
    gw.subscribe_config(device_id=plain)
    assert gw.configs_of(plain).get(timeout=20) == f"config of {plain}".encode()
    assert retained(stack, topic) == f"config of {plain}".encode()
    # Detached by the gateway: cleared.
    gw.detach(plain).wait_for_publish(10)
    wait_for("retained config cleared at the detach", lambda: retained(stack, topic), lambda v: v == b"", timeout=15)
    # Attached again, then the gateway's whole session ends: cleared again.
    gw.attach(plain).wait_for_publish(10)
    wait_for("retained config back at the attach", lambda: retained(stack, topic),
             lambda v: v == f"config of {plain}".encode(), timeout=15)
    gw.disconnect()
    wait_for("retained config cleared when the gateway left", lambda: retained(stack, topic), lambda v: v == b"",
             timeout=15)


@pytest.fixture
def unlimited_stack(bridge_env, tmp_path) -> Iterator[BridgeStack]:
    """A host whose rate limits never slow a device, so only the front's cap on unsent bytes can stop a gateway."""
    st = new_stack(tmp_path, bridge_env, device_messages_per_s=1e7, device_bytes_per_s=1e10)
    yield st
    st.stop()


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + mqtt.encode_varint(len(body)) + body


def _field(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


def test_a_gateway_that_stops_reading_its_socket_is_disconnected_not_buffered(unlimited_stack, registry):
    st = unlimited_stack
    gw_id, key = DeviceFactory(registry, st).register(gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
    identity = DeviceIdentity(PROJECT, REGION, REGISTRY, gw_id, key, "ES256")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the gateway's side holds little of what it ignores
    raw.settimeout(10)
    raw.connect((st.mqtt_host, st.mqtt_port))
    conn = ssl.create_default_context(cafile=str(st.ca_cert)).wrap_socket(raw, server_hostname="localhost")
    connect = mqtt.Connect(mqtt.MQTT_311, True, 60, identity.client_id, "unused", _token(key).encode())
    conn.sendall(mqtt.encode_connect(connect))
    assert conn.recv(4) == bytes([mqtt.CONNACK << 4, 2, 0, 0])
    errors = f"/devices/{gw_id}/errors"
    conn.sendall(_packet(mqtt.SUBSCRIBE, 2, (1).to_bytes(2, "big") + _field(errors) + b"\x00"))
    assert conn.recv(5)[0] >> 4 == mqtt.SUBACK
    # QoS 1 events for a device that is not attached: each earns a PUBACK and an error, which it never reads.
    batch = b"".join(_packet(mqtt.PUBLISH, 2, _field("/devices/not-attached/events") + i.to_bytes(2, "big"))
                     for i in range(1, 2001))
    deadline = time.monotonic() + 60
    with pytest.raises(OSError):
        while time.monotonic() < deadline:
            conn.sendall(batch)
    wait_for("the front to end the gateway's session",
             lambda: f"gateway {gw_id} disconnected: it leaves over {MAX_UNSENT_BYTES} bytes unread" in st.log_text(
                 "front"), timeout=15)

"""Gateways against the running host (real Mosquitto, front, bridge service, emulators): a gateway attaches the
devices bound to it, speaks for them (events, state, config, commands), hears of its mistakes on its errors
topic, and can never act for a device that is not bound to it or not attached."""

from __future__ import annotations

import queue

import pytest
from google.cloud import pubsub_v1

from iotbridge.bridge import fanout
from iotbridge.device import create_jwt
from iotbridge.registry import GatewayAuthMethod, GatewayConfig
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY

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

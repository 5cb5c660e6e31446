"""Devices written the IoT Core way connect through the TLS front; the bridge forwards to the Pub/Sub emulator;
configs and commands come back. Everything real: Mosquitto, the front and the bridge as processes, emulators."""

from __future__ import annotations

import json
import os
import subprocess

import paho.mqtt.client as paho
import pytest
from google.cloud import pubsub_v1

from iotbridge.bridge import fanout
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY, retained

pytestmark = pytest.mark.emulator


def _attrs(msg) -> dict[str, str]:
    return dict(msg.attributes)


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_device_telemetry_and_state_reach_pubsub_byte_identical(devices, reader, registry, algorithm):
    dev = devices.connected(algorithm)
    device_id = dev.identity.device_id
    num_id = registry.get_device(device_id).num_id
    # Bytes that are not valid UTF-8 or JSON must pass untouched.
    events = [json.dumps({"ts": 1764252000000 + i, "metrics": {"rpm": i}, "seq": i}).encode() for i in range(5)]
    events.append(bytes(range(256)))
    for payload in events:
        dev.publish_event(payload).wait_for_publish(10)
    dev.publish_event(b"log line", sub_folder="logs").wait_for_publish(10)
    dev.publish_event(b"aux", sub_folder="aux").wait_for_publish(10)
    dev.publish_state(b'{"firmware": "1.2"}').wait_for_publish(10)

    telemetry = reader.pull("telemetry", len(events) + 1)
    base = {"deviceId": device_id, "deviceNumId": num_id, "deviceRegistryId": REGISTRY,
            "deviceRegistryLocation": REGION, "projectId": PROJECT}
    plain = [m for m in telemetry if "subFolder" not in m.attributes]
    assert sorted(m.data for m in plain) == sorted(events)
    assert all(_attrs(m) == base for m in plain)
    aux = [m for m in telemetry if m.attributes.get("subFolder") == "aux"]
    assert [m.data for m in aux] == [b"aux"] and _attrs(aux[0]) == {**base, "subFolder": "aux"}

    logs = reader.pull("device-logs", 1)  # the "logs" subfolder route
    assert [m.data for m in logs] == [b"log line"] and _attrs(logs[0]) == {**base, "subFolder": "logs"}
    state = reader.pull("state", 1)
    assert [m.data for m in state] == [b'{"firmware": "1.2"}'] and _attrs(state[0]) == base

    # Registry activity is written (coalesced) by the bridge.
    wait_for("state in registry", lambda: registry.get_device(device_id).state,
             lambda v: v == b'{"firmware": "1.2"}', timeout=15)
    assert registry.get_device(device_id).last_event_time is not None


def test_config_reaches_device_also_after_reconnect_and_ack_is_recorded(devices, registry, stack):
    device_id, private = devices.register("ES256")
    dev = devices.device(device_id, private)
    dev.connect()
    dev.subscribe_config()
    assert dev.configs.get(timeout=20) == b""  # its first config, empty, delivered on subscribe (IoT Core's)
    publisher = pubsub_v1.PublisherClient()
    cfg = fanout.push_config(registry, publisher, stack.settings.prefix, device_id, b'{"rate": 5}')
    assert dev.configs.get(timeout=20) == b'{"rate": 5}'
    wait_for("config ack", lambda: registry.list_config_versions(device_id)[0].device_ack_time,
             timeout=15)
    assert registry.get_device(device_id).last_config_ack_time is not None
    assert registry.get_config(device_id).version == cfg.version

    # A newer version while disconnected: stored, sent to no host (the device is connected nowhere). The host it
    # left cleared its retained copy (later versions go elsewhere); on reconnect the device gets the latest only,
    # from the registry.
    dev.disconnect()
    wait_for("presence removed", lambda: registry.connected_host(device_id) is None, timeout=10)
    wait_for("retained config cleared", lambda: stack_has_retained(stack, device_id, b""), timeout=10)
    # (min_interval_s=0: the registry's 1/s rate limit is not what this test is about)
    fanout.push_config(registry, publisher, stack.settings.prefix, device_id, b'{"rate": 7}', min_interval_s=0)
    assert stack_has_retained(stack, device_id, b"")  # nothing published to the host meanwhile
    again = devices.device(device_id, private)
    again.connect()
    again.subscribe_config()
    assert again.configs.get(timeout=20) == b'{"rate": 7}'
    wait_for("ack of v2", lambda: registry.list_config_versions(device_id)[0].device_ack_time, timeout=15)


def stack_has_retained(stack, device_id: str, expected: bytes) -> bool:
    return retained(stack, f"/devices/{device_id}/config") == expected


def test_config_from_registry_is_synced_on_connect_without_fanout(devices, registry):
    """A host that never saw the fan-out (joined later, or lost its broker state) still delivers the config."""
    device_id, private = devices.register("ES256")
    registry.update_config(device_id, b"from-registry")  # no fan-out message at all
    dev = devices.device(device_id, private)
    dev.connect()
    dev.subscribe_config()
    assert dev.configs.get(timeout=20) == b"from-registry"


def test_commands_reach_connected_device_and_fail_for_disconnected(devices, registry, stack):
    publisher = pubsub_v1.PublisherClient()
    dev = devices.connected("ES256")
    device_id = dev.identity.device_id
    dev.subscribe_commands()
    wait_for("presence", lambda: fanout.is_connected(registry.client, REGISTRY, device_id), timeout=10)
    fanout.send_command(registry, publisher, stack.settings.prefix, device_id, b"reboot", sub_folder="power")
    assert dev.commands.get(timeout=20) == (f"/devices/{device_id}/commands/power", b"reboot")
    dev.disconnect()
    wait_for("presence removed", lambda: not fanout.is_connected(registry.client, REGISTRY, device_id), timeout=10)
    with pytest.raises(fanout.DeviceNotConnected):
        fanout.send_command(registry, publisher, stack.settings.prefix, device_id, b"reboot")


def test_mqtt5_device_and_mosquitto_pub_as_foreign_client(devices, reader, registry, stack):
    """An MQTT 5 paho device, and mosquitto_pub (not written here) with a JWT, both get through."""
    dev = devices.connected("RS256", protocol=paho.MQTTv5)
    dev.publish_event(b"v5").wait_for_publish(10)

    device_id, private = devices.register("ES256")
    from iotbridge.device import create_jwt

    token = create_jwt(PROJECT, private, "ES256")
    client_id = f"projects/{PROJECT}/locations/{REGION}/registries/{REGISTRY}/devices/{device_id}"
    subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(stack.mqtt_port), "--cafile", str(stack.ca_cert),
         "-i", client_id, "-u", "unused", "-P", token, "-q", "1", "-t", f"/devices/{device_id}/events",
         "-m", "from mosquitto_pub"], check=True, timeout=20, env={**os.environ})
    got = {m.data: m.attributes["deviceId"] for m in reader.pull("telemetry", 2)}
    assert got == {b"v5": dev.identity.device_id, b"from mosquitto_pub": device_id}


def test_heartbeat_is_recorded_from_pingreq(devices, registry):
    dev = devices.connected("ES256", keepalive=1)  # paho pings every second while idle
    wait_for("last_heartbeat_time",
             lambda: registry.get_device(dev.identity.device_id).last_heartbeat_time, timeout=15)

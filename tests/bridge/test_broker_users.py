"""The broker's internal users are confined, against the real Mosquitto of the running bridge: with the ``backend``
password one cannot take a device's client id (disconnecting it, then publishing as it through the ACL's %c
patterns) nor the bridge service's persistent session, and cannot publish a device's events."""

from __future__ import annotations

import json
import queue
import time

import pytest

from iotbridge.bridge.settings import backend_client_id
from tests.waiting import wait_for

from .conftest import broker_session
from .test_attacks import Spy

pytestmark = pytest.mark.emulator


def backend_refused(stack, client_id: str) -> bool:  # noqa: ANN001
    try:
        session = broker_session(stack, "backend", client_id)
    except AssertionError:
        return True
    session.disconnect()
    session.loop_stop()
    return False


def wait_for_telemetry(reader, data: bytes, timeout: float = 20.0) -> None:  # noqa: ANN001
    """``data`` reaches the telemetry topic (other tests' late messages may come first)."""
    wait_for(f"{data!r} on the telemetry topic (the payloads pulled last)",
             lambda: [m.data for m in reader.drain("telemetry", wait=0.5)], lambda got: data in got,
             timeout=timeout, interval=0)


def test_backend_cannot_take_a_devices_client_id(stack, devices, reader):
    dev = devices.connected("ES256")
    assert backend_refused(stack, dev.identity.device_id)
    time.sleep(0.5)
    with pytest.raises(queue.Empty):  # the device was never disconnected
        dev.disconnects.get_nowait()
    dev.publish_event(b"still here").wait_for_publish(10)
    wait_for_telemetry(reader, b"still here")


def test_backend_cannot_take_the_bridges_client_id(stack, devices, reader):
    assert backend_refused(stack, f"iotbridge:bridge:{stack.settings.host_id}")
    dev = devices.connected("ES256")
    dev.publish_event(b"bridge session intact").wait_for_publish(10)
    wait_for_telemetry(reader, b"bridge session intact")


def test_backend_cannot_publish_a_devices_events_but_still_writes_configs(stack, devices, reader):
    device_id, _ = devices.register("ES256")
    spy = Spy(stack)
    try:
        for client_id in (device_id, backend_client_id(stack.settings)):
            try:
                session = broker_session(stack, "backend", client_id)
            except AssertionError:
                continue
            session.publish(f"/devices/{device_id}/events", b"forged", qos=1).wait_for_publish(10)
            session.publish(f"/devices/{device_id}/config", b"from backend", qos=1).wait_for_publish(10)
            session.disconnect()
            session.loop_stop()
        # What backend may do still arrives (so the refusals above are about the events only)...
        wait_for("backend's config", lambda: (f"/devices/{device_id}/config", b"from backend") in spy.seen,
                 timeout=10)
        # ...and nothing it published as the device did.
        assert (f"/devices/{device_id}/events", b"forged") not in spy.seen
        assert [m for m in reader.drain("telemetry", wait=1.0) if m.data == b"forged"] == []
    finally:
        spy.close()


@pytest.mark.parametrize("user", ["front", "bridge", "backend"])
def test_no_broker_user_can_reconfigure_the_dynamic_security_plugin(stack, user):
    """The plugin takes commands on $CONTROL/dynamic-security/v1 from whoever may publish there: nobody may."""
    client_id = backend_client_id(stack.settings) if user == "backend" else f"iotbridge:test-{user}"
    session = broker_session(stack, user, client_id)
    intruder = f"intruder-{user}"
    command = {"commands": [{"command": "createClient", "username": intruder, "password": "pw"}]}
    try:
        session.publish("$CONTROL/dynamic-security/v1", json.dumps(command), qos=1).wait_for_publish(10)
    finally:
        session.disconnect()
        session.loop_stop()
    time.sleep(0.5)
    with pytest.raises(AssertionError, match="refused"):
        broker_session(stack, intruder, "iotbridge:intruder", password="pw")

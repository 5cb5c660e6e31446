"""A broker host in ``device_auth: mosquitto``, end to end on this machine: the device plugin compiled here, the auth
daemon, Mosquitto terminating TLS on the devices' port, the bridge service; no front. Devices are the project's device
SDK (``iotbridge.device``, paho), registered in the Firestore emulator; Pub/Sub is its emulator.

A device connects to Mosquitto itself with its JWT, gets the config the registry holds for it at connect, its
telemetry and state reach Pub/Sub, and a config pushed while it is connected reaches it; a connected device blocked in
the registry is disconnected, and a blocked device is refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from google.cloud import pubsub_v1

from iotbridge.bridge import fanout, plugin
from iotbridge.local.broker_host import BridgeStack
from tests.waiting import wait_for

from .conftest import DeviceFactory, PubSubReader, connects, new_stack

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def mq_stack(bridge_env, tmp_path_factory) -> Iterator[BridgeStack]:
    try:
        st = new_stack(tmp_path_factory.mktemp("mq-host"), bridge_env, recheck_interval_s=0.5,
                       device_auth="mosquitto")
    except plugin.BuildError as exc:
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
    yield st
    st.stop()


@pytest.fixture
def mq_devices(registry, mq_stack) -> Iterator[DeviceFactory]:
    f = DeviceFactory(registry, mq_stack)
    yield f
    for d in f.created:
        d.disconnect()


def test_the_host_runs_no_front_and_mosquitto_holds_the_devices_port(mq_stack):
    assert set(mq_stack.procs) == {"authd", "mosquitto", "service"}
    conf = (mq_stack.workdir / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert f"listener {mq_stack.settings.front_port} {mq_stack.settings.front_host}" in conf
    assert f"plugin {mq_stack.workdir / 'plugin' / plugin.LIBRARY}" in conf
    assert mq_stack.http_bridge_url == ""


def test_a_device_connects_to_mosquitto_gets_its_config_and_reaches_pubsub(registry, mq_stack, mq_devices):
    reader = PubSubReader(mq_stack.settings.project, mq_stack.settings.prefix)
    reader.attach(uuid.uuid4().hex[:8])
    device_id, private = mq_devices.register("ES256")
    registry.update_config(device_id, b"config-before-connect")
    dev = mq_devices.device(device_id, private)
    # A device registered a moment ago is in the daemon's map after the change feed's next round.
    wait_for(f"the auth daemon to admit {device_id}", lambda: connects(dev, timeout=5), timeout=15, interval=0.5)
    dev.subscribe_config()
    # The config the registry holds, delivered at connect (the daemon's sync request, the service's retained config).
    assert dev.configs.get(timeout=20) == b"config-before-connect"
    # A config pushed while it is connected: routed to this host by the presence record the daemon wrote, delivered by
    # the bridge service through Mosquitto.
    fanout.push_config(registry, pubsub_v1.PublisherClient(), mq_stack.settings.prefix, device_id, b"config-pushed",
                       min_interval_s=0)
    assert dev.configs.get(timeout=20) == b"config-pushed"
    dev.publish_event(b"telemetry via mosquitto").wait_for_publish(10)
    dev.publish_state(b"state via mosquitto").wait_for_publish(10)
    (event,) = reader.pull("telemetry", 1)
    (state,) = reader.pull("state", 1)
    assert (event.data, event.attributes["deviceId"]) == (b"telemetry via mosquitto", device_id)
    assert (state.data, state.attributes["deviceId"]) == (b"state via mosquitto", device_id)
    assert event.attributes["deviceRegistryId"] == mq_stack.settings.registry_id
    # Blocked in the registry while connected: the change feed's next round has the plugin end the session.
    registry.set_blocked(device_id, True)
    assert dev.disconnects.get(timeout=15) is not None


def test_a_blocked_device_is_refused(mq_stack, mq_devices):
    device_id, private = mq_devices.register("ES256", blocked=True)
    dev = mq_devices.device(device_id, private)
    reason = f"/devices/{device_id} from 127.0.0.1: device is blocked"

    def refused_as_blocked() -> bool:
        assert not connects(dev, timeout=5), f"blocked device {device_id} was admitted"
        return reason in mq_stack.log_text("authd")

    wait_for(f"the daemon to refuse {device_id} as blocked", refused_as_blocked, timeout=15, interval=0.5)

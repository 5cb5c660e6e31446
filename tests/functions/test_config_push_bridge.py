"""Config push through the whole local architecture: the function (served from its archive behind a push
subscription) → the bridge's broker host (TLS front with IoT Core JWT auth, loopback Mosquitto, bridge service)
→ a device written the IoT Core way, whose PUBACK the front records as the config's ack time (IoT Core's
"after the device acknowledges, its ack time")."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from iotbridge import spec
from iotbridge.bridge.settings import backend_client_id
from iotbridge.device import Device, DeviceIdentity, generate_key
from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import Credential
from tests.functions.served import PROJECT, serve
from tests.waiting import wait_for

pytestmark = pytest.mark.emulator
REGION = "europe-west1"


@pytest.fixture(scope="module")
def system(pubsub_emulator, firestore_emulator, tmp_path_factory) -> Iterator[tuple[BridgeStack, dict[str, str]]]:
    env = {**pubsub_emulator.env, **firestore_emulator.env}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        prefix = f"cp{uuid.uuid4().hex[:8]}"
        publisher = pubsub_v1.PublisherClient()
        for key in spec.TOPICS:
            with contextlib.suppress(gexc.AlreadyExists):
                publisher.create_topic(name=publisher.topic_path(PROJECT, spec.topic_name(prefix, key)))
        try:
            stack = start_bridge_stack(tmp_path_factory.mktemp("bridge"), PROJECT, REGION,
                                       f"reg-{uuid.uuid4().hex[:8]}", prefix, env)
        except services.MissingPrerequisite as exc:
            pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
        try:
            yield stack, env
        finally:
            stack.stop()


@pytest.mark.parametrize("delivery", ["fanout", "mqtt"])
def test_a_request_reaches_a_bridged_device_and_its_ack_is_recorded(system, delivery, tmp_path) -> None:
    stack, env = system
    s = stack.settings
    if delivery == "fanout":  # every broker host's bridge publishes it on its own Mosquitto
        extra = {"CONFIG_DELIVERY": "fanout",
                 "FANOUT_TOPIC": f"projects/{PROJECT}/topics/{spec.topic_name(s.prefix, 'device-commands')}"}
    else:  # paho straight to the host's Mosquitto as its `backend` user (write-only on configs and commands)
        extra = {"MQTT_HOST": s.broker_host, "MQTT_PORT": str(s.broker_port), "MQTT_USERNAME": "backend",
                 "MQTT_PASSWORD": s.secrets()["backend"], "MQTT_CLIENT_ID": backend_client_id(s)}
    with serve(env, tmp_path, extra, registry_id=s.registry_id) as served:
        device_id = f"dev-{delivery}-{uuid.uuid4().hex[:6]}"
        private, public = generate_key("ES256")
        served.registry.create_device(device_id, [Credential("ES256_PEM", public)])
        device = Device(DeviceIdentity(PROJECT, REGION, s.registry_id, device_id, private, "ES256"),
                        stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
        device.connect()
        try:
            device.subscribe_config()
            mid = served.publish({"device_id": device_id, "config": {"delivery": delivery}})
            assert device.configs.get(timeout=30) == f'{{"delivery":"{delivery}"}}'.encode()
            cfg = wait_for("the device's ack in the registry",
                           lambda: (c := served.registry.get_config(device_id)) and c.device_ack_time and c,
                           timeout=15)
        finally:
            device.disconnect()
        assert cfg.version == 1 and cfg.device_ack_time >= cfg.cloud_update_time
        assert served.registry.get_device(device_id).last_config_ack_time == cfg.device_ack_time
        assert [e["outcome"] for e in served.log_entries(mid)] == ["delivered"]
        log_text = served.function.log_path.read_text()
    assert s.secrets()["backend"] not in log_text

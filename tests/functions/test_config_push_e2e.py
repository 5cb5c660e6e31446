"""Config push function, level 3: functions-framework serving the packaged function over HTTP, fed by a push
subscription of the Pub/Sub emulator, with the Firestore emulator and a real Mosquitto; a device subscribed to
its config topic receives what an operator requested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from components import config_push as cpc
from iotbridge import registry as reg
from iotbridge.local import services
from tests.functions.conftest import DeviceClient, mosquitto_config

pytestmark = pytest.mark.emulator
PROJECT = "local-project"


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_broker(port: int, workdir: Path) -> services.Service:
    where = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}"
    where.mkdir(parents=True)
    return services.start_mosquitto(mosquitto_config(port), port, where)


@dataclass
class Served:
    registry: reg.Registry
    publisher: object
    subscriber: object
    requests_topic: str
    dead_letters: str  # a pull subscription on the dead-letter topic
    broker: services.Service
    broker_port: int
    function_log: Path
    workdir: Path

    def publish(self, payload: dict | bytes) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.publisher.publish(self.requests_topic, data, origin="e2e").result(timeout=30)  # type: ignore[attr-defined]

    def log_entries(self, message_id: str) -> list[dict]:
        out = []
        for line in self.function_log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("messageId") == message_id:
                    out.append(entry)
        return out


@pytest.fixture(scope="module")
def served(pubsub_emulator, firestore_emulator, tmp_path_factory) -> Iterator[Served]:
    from google.cloud import pubsub_v1

    workdir = tmp_path_factory.mktemp("config-push-e2e")
    suffix = uuid.uuid4().hex[:8]
    emulators = {**pubsub_emulator.env, **firestore_emulator.env}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in emulators.items():
            mp.setenv(k, v)
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        requests_topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/cfg-requests-{suffix}").name
        dlq_topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/cfg-dead-letter-{suffix}").name
        dead_letters = subscriber.create_subscription(
            name=f"projects/{PROJECT}/subscriptions/cfg-dead-letter-audit-{suffix}", topic=dlq_topic).name

        broker_port = services.free_port()
        broker = start_broker(broker_port, workdir)

        # Serve exactly what would be deployed: the staged archive, started from its own folder.
        stage = cpc.stage(cpc.archive_contents(), workdir / "function")
        port = services.free_port()
        log_path = workdir / "function.log"
        env = {**os.environ, **emulators, "PROJECT_ID": PROJECT, "REGISTRY_ID": f"reg-{suffix}",
               "REGION": "local", "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(broker_port), "MQTT_TLS": "false",
               "MQTT_TIMEOUT_S": "2", "DEAD_LETTER_TOPIC": dlq_topic, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--source", str(stage / "main.py"),
                 "--target", "handle", "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port)],
                cwd=stage, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        function = services.Service("config-push", proc, "127.0.0.1", port, log_path, workdir=stage)
        served = Served(reg.Registry(PROJECT, f"reg-{suffix}", "local"), publisher, subscriber, requests_topic,
                        dead_letters, broker, broker_port, log_path, workdir)
        try:
            services.wait_for_port(function, timeout=60)
            # The push subscription Eventarc would own in the cloud, with the same dead-letter safety net.
            subscriber.create_subscription(request={
                "name": f"projects/{PROJECT}/subscriptions/cfg-requests-push-{suffix}",
                "topic": requests_topic,
                "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/"},
                "ack_deadline_seconds": 30,
                "dead_letter_policy": {"dead_letter_topic": dlq_topic, "max_delivery_attempts": 100},
                "retry_policy": {"minimum_backoff": "1s", "maximum_backoff": "2s"},
            })
            yield served
        finally:
            function.stop()
            served.broker.stop()


def test_a_request_reaches_the_subscribed_device(served: Served) -> None:
    served.registry.create_device("thermo-1")
    device = DeviceClient("127.0.0.1", served.broker_port, "thermo-1")
    try:
        mid = served.publish({"device_id": "thermo-1", "config": {"setpoint": 21.5}})
        got = device.next(timeout=30)
        assert (got.topic, got.payload, got.qos) == ("/devices/thermo-1/config", b'{"setpoint":21.5}', 1)
    finally:
        device.close()
    cfg = served.registry.get_config("thermo-1")
    assert cfg is not None and cfg.version == 1 and cfg.data == b'{"setpoint":21.5}'
    delivered = wait_for(lambda: [e for e in served.log_entries(mid) if e.get("version") == 1
                                  and "delivered" in e["message"]], 10, "the function's delivery log")
    assert delivered[0]["deviceId"] == "thermo-1" and delivered[0]["severity"] == "INFO"


def test_a_bad_request_is_acknowledged_and_dead_lettered_with_its_reason(served: Served) -> None:
    mid = served.publish({"device_id": "nobody-home", "config": {"x": 1}})
    letters: list = []

    def dead_lettered() -> bool:
        resp = served.subscriber.pull(subscription=served.dead_letters, max_messages=10, timeout=5)  # type: ignore[attr-defined]
        if resp.received_messages:
            served.subscriber.acknowledge(subscription=served.dead_letters,  # type: ignore[attr-defined]
                                          ack_ids=[m.ack_id for m in resp.received_messages])
            letters.extend(m.message for m in resp.received_messages)
        return any(m.attributes.get("sourceMessageId") == mid for m in letters)

    wait_for(dead_lettered, 30, "the refused request on the dead-letter topic", interval=0.2)
    letter = next(m for m in letters if m.attributes.get("sourceMessageId") == mid)
    assert letter.attributes["error"] == "unknown_device" and letter.attributes["origin"] == "e2e"
    assert json.loads(letter.data) == {"device_id": "nobody-home", "config": {"x": 1}}
    # Written by the function on the first delivery, not by the subscription after exhausting its attempts.
    assert "CloudPubSubDeadLetterSourceDeliveryCount" not in letter.attributes
    refused = served.log_entries(mid)
    assert [e["reason"] for e in refused] == ["unknown_device"] and refused[0]["severity"] == "WARNING"


def test_broker_outage_is_retried_and_yields_one_version(served: Served) -> None:
    served.registry.create_device("thermo-2")
    served.broker.stop()
    mid = served.publish({"device_id": "thermo-2", "config": {"mode": "eco"}})
    # Each failed delivery answers 500; the subscription redelivers the same message id.
    wait_for(lambda: len([e for e in served.log_entries(mid) if e.get("reason") == "broker_unavailable"]) >= 2,
             60, "two failed deliveries while the broker is down", interval=0.2)
    assert served.registry.get_device("thermo-2").config_version == 1

    served.broker = start_broker(served.broker_port, served.workdir)
    device = DeviceClient("127.0.0.1", served.broker_port, "thermo-2")
    try:
        got = device.next(timeout=60)  # retained: arrives whether the retry came before or after the subscribe
        assert got.payload == b'{"mode":"eco"}'
    finally:
        device.close()
    attempts = served.log_entries(mid)
    assert any("delivered" in e["message"] for e in attempts)
    assert {e["version"] for e in attempts if "version" in e} == {1}
    assert [v.version for v in served.registry.list_config_versions("thermo-2")] == [1]

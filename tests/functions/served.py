"""The config-push function served as it would be deployed, on this machine.

``serve(pubsub_env, firestore_env, workdir)`` stages the deployment archive (``gcp_iot_bridge/infra/config_push.py``),
starts functions-framework on it from its own folder on a free loopback port, starts a Mosquitto for it to
publish to, creates the config-requests and dead-letter topics in the Pub/Sub emulator, and a push subscription
that feeds the function — the subscription Eventarc owns in the cloud. Used by the end-to-end tests and by
``latency_probe``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gcp_iot_bridge.infra import config_push as cpc
from iotbridge import registry as reg
from iotbridge.local import services

PROJECT = "local-project"


def mosquitto_config(port: int) -> str:
    # Anonymous plaintext on loopback: this broker stands for the backend listener the function publishes to,
    # not for the device-facing endpoint (which is TLS + JWT, docs/device-protocol.md).
    return (f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
            "max_queued_messages 100000\n")


def start_broker(port: int, workdir: Path) -> services.Service:
    where = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}"
    where.mkdir(parents=True)
    return services.start_mosquitto(mosquitto_config(port), port, where)


@dataclass
class Served:
    registry: reg.Registry
    publisher: Any  # pubsub_v1.PublisherClient
    subscriber: Any  # pubsub_v1.SubscriberClient
    requests_topic: str
    dead_letters: str  # a pull subscription on the dead-letter topic
    broker: services.Service
    broker_port: int
    function: services.Service
    workdir: Path

    def publish(self, payload: dict | bytes) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.publisher.publish(self.requests_topic, data, origin="e2e").result(timeout=30)

    def log_entries(self, message_id: str) -> list[dict]:
        out = []
        for line in self.function.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("messageId") == message_id:
                    out.append(entry)
        return out


@contextlib.contextmanager
def serve(emulator_env: Mapping[str, str], workdir: Path, extra_env: Mapping[str, str] | None = None,
          registry_id: str | None = None) -> Iterator[Served]:
    """``emulator_env``: PUBSUB_EMULATOR_HOST and FIRESTORE_EMULATOR_HOST; they must also be set in this
    process's environment for the clients created here. ``extra_env`` overrides the function's environment
    (e.g. another broker, or CONFIG_DELIVERY=fanout)."""
    from google.cloud import pubsub_v1

    suffix = uuid.uuid4().hex[:8]
    registry_id = registry_id or f"reg-{suffix}"
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    requests_topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/cfg-requests-{suffix}").name
    dlq_topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/cfg-dead-letter-{suffix}").name
    dead_letters = subscriber.create_subscription(
        name=f"projects/{PROJECT}/subscriptions/cfg-dead-letter-audit-{suffix}", topic=dlq_topic).name

    broker_port = services.free_port()
    broker = start_broker(broker_port, workdir)
    function: services.Service | None = None
    try:
        stage = cpc.stage(cpc.archive_contents(), workdir / f"function-{suffix}")
        port = services.free_port()
        log_path = workdir / f"function-{suffix}.log"
        env = {**os.environ, **emulator_env, "PROJECT_ID": PROJECT, "REGISTRY_ID": registry_id,
               "REGION": "local", "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(broker_port), "MQTT_TLS": "false",
               "MQTT_TIMEOUT_S": "2", "DEAD_LETTER_TOPIC": dlq_topic, "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--source", str(stage / "main.py"),
                 "--target", "handle", "--signature-type", "cloudevent", "--host", "127.0.0.1",
                 "--port", str(port)],
                cwd=stage, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        function = services.Service("config-push", proc, "127.0.0.1", port, log_path, workdir=stage)
        services.wait_for_port(function, timeout=60)
        subscriber.create_subscription(request={
            "name": f"projects/{PROJECT}/subscriptions/cfg-requests-push-{suffix}",
            "topic": requests_topic,
            "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/"},
            "ack_deadline_seconds": 30,
            "dead_letter_policy": {"dead_letter_topic": dlq_topic, "max_delivery_attempts": 100},
            "retry_policy": {"minimum_backoff": "1s", "maximum_backoff": "2s"},
        })
        served = Served(reg.Registry(PROJECT, registry_id, "local"), publisher, subscriber, requests_topic,
                        dead_letters, broker, broker_port, function, workdir)
        yield served
        broker = served.broker  # a test may have restarted it
    finally:
        if function is not None:
            function.stop()
        broker.stop()


class DeviceClient:
    """A device's MQTT session subscribed to its config topic (QoS 1), collecting what arrives."""

    def __init__(self, host: str, port: int, device_id: str):
        self.device_id = device_id
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=True)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"/devices/{device_id}/config", qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"{device_id}: no SUBACK within 10s")

    def next(self, timeout: float = 15.0) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

"""Config push latency: a request published on the config-requests topic → the device has the config.

The whole path runs for real on loopback: the Pub/Sub emulator's push subscription (the one Eventarc owns in the
cloud) → functions-framework serving the staged deployment archive (``gcp_iot_bridge/infra/config_push.py``), warm
→ the registry transaction on the Firestore emulator → delivery → one broker host (Mosquitto, TLS front, bridge
service) → a device on the device SDK (paho over TLS, JWT), subscribed to its config topic at QoS 1.

Two deliveries, measured one after the other with the same devices:

- ``fanout`` (``CONFIG_DELIVERY=fanout``, for several broker hosts): the function publishes the version on the
  device-commands topic; each host's bridge service pulls it and publishes it retained on the device's topic;
- ``mqtt`` (the default): the function publishes retained at QoS 1 on the host's Mosquitto as the ``backend``
  user (its loopback listener; the function waits for the broker's PUBACK).

Requests are sent one at a time (the next after the device has the previous one), round-robin over devices so
that none gets more than one update per second (the function's flood limit). Latency = the device's receipt
− the publish call of the request, in this process.

Reproduce: ``.venv/bin/python -m bench config_push``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

from bench import local
from bench.core import Figure, summary_ms
from iotbridge import spec
from iotbridge.bridge.settings import backend_client_id
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local import services
from iotbridge.local.broker_host import start_bridge_stack
from iotbridge.registry import Registry

COMMAND = ".venv/bin/python -m bench config_push"
SECTION = "config_push"
ROOT = Path(__file__).resolve().parents[1]
DEVICES = 20
WARMUP = 5
SAMPLES = 60
MIN_GAP_S = 1.1  # per device: the function refuses more than one update per second


def stage_function(dest: Path) -> Path:
    from gcp_iot_bridge.infra import config_push as cpc

    return cpc.stage(cpc.archive_contents(), dest)


def serve_function(stage: Path, env: dict[str, str], log_path: Path) -> services.Service:
    port = services.free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "functions_framework", "--source", str(stage / "main.py"), "--target", "handle",
             "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port)],
            cwd=stage, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    svc = services.Service("config-push", proc, "127.0.0.1", port, log_path, workdir=stage)
    services.wait_for_port(svc, timeout=60)
    return svc


def measure(publisher, topic: str, devices: list[Device], tag: str) -> tuple[list[float], int]:  # noqa: ANN001
    """Latencies of SAMPLES requests (after WARMUP), and how many did not arrive within 30 s."""
    last_sent: dict[str, float] = {}
    latencies: list[float] = []
    missing = 0
    for i in range(WARMUP + SAMPLES):
        dev = devices[i % len(devices)]
        device_id = dev.identity.device_id
        wait = last_sent.get(device_id, 0.0) + MIN_GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # pacing for the function's per-device flood limit, not synchronisation
        want = json.dumps({"bench": tag, "n": i}, separators=(",", ":"))
        t0 = time.perf_counter()
        last_sent[device_id] = time.monotonic()
        publisher.publish(topic, spec.config_request(device_id, want.encode())).result(timeout=30)
        deadline = t0 + 30
        got = None
        while time.perf_counter() < deadline:
            try:
                data = dev.configs.get(timeout=max(0.01, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if data is None:  # no more configs
                break
            if not data:  # the empty latest config a device gets when it subscribes before its first config
                continue
            if json.loads(data) == json.loads(want):
                got = time.perf_counter()
                break
        if got is None:
            missing += 1
        elif i >= WARMUP:
            latencies.append(got - t0)
    return latencies, missing


def run() -> list[Figure]:
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    env = local.emulators()
    prefix = local.new_prefix("bp")
    local.create_topics(local.PROJECT, prefix)
    registry_id = f"{prefix}-reg"
    registry = Registry(local.PROJECT, registry_id, local.REGION)
    wd = local.workdir() / prefix
    wd.mkdir(parents=True)
    stack = start_bridge_stack(wd / "host", local.PROJECT, local.REGION, registry_id, prefix, env)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(local.PROJECT, spec.topic_name(prefix, "config-requests"))
    dead_letter = publisher.topic_path(local.PROJECT, spec.topic_name(prefix, "dead-letter"))
    devices: list[Device] = []
    figures: list[Figure] = []
    stage = stage_function(wd / "function")
    try:
        for device_id, key in local.register_devices(registry, DEVICES, f"{prefix}-d"):
            d = Device(DeviceIdentity(local.PROJECT, local.REGION, registry_id, device_id, key, "ES256"),
                       stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
            d.connect(timeout=30)
            d.subscribe_config()
            devices.append(d)
        secrets = stack.settings.secrets()
        deliveries = {
            "fanout": {"CONFIG_DELIVERY": "fanout",
                       "FANOUT_TOPIC": publisher.topic_path(local.PROJECT, spec.topic_name(prefix, "device-commands"))},
            "mqtt": {"CONFIG_DELIVERY": "mqtt", "MQTT_HOST": stack.settings.broker_host,
                     "MQTT_PORT": str(stack.settings.broker_port), "MQTT_TLS": "false",
                     "MQTT_USERNAME": "backend", "MQTT_PASSWORD": secrets["backend"],
                     "MQTT_CLIENT_ID": backend_client_id(stack.settings)},
        }
        for mode, extra in deliveries.items():
            fn_env = {**env, "PROJECT_ID": local.PROJECT, "REGISTRY_ID": registry_id, "REGION": local.REGION,
                      "DEAD_LETTER_TOPIC": dead_letter, **extra}
            fn = serve_function(stage, fn_env, wd / f"function-{mode}.log")
            push = subscriber.subscription_path(local.PROJECT, f"{prefix}-config-requests-push-{mode}")
            try:
                subscriber.create_subscription(request={
                    "name": push, "topic": topic, "ack_deadline_seconds": 30,
                    "push_config": {"push_endpoint": f"http://127.0.0.1:{fn.port}/"},
                    "retry_policy": {"minimum_backoff": "1s", "maximum_backoff": "2s"}})
                latencies, missing = measure(publisher, topic, devices, mode)
            finally:
                with contextlib.suppress(gexc.NotFound):
                    subscriber.delete_subscription(request={"subscription": push})
                fn.stop()
            if missing:
                raise AssertionError(f"config push ({mode}): {missing} of {WARMUP + SAMPLES} configs never reached "
                                     f"the device; function log {fn.log_path}")
            s = summary_ms(latencies)
            note = (f"{len(latencies)} requests after {WARMUP} warm-up, one at a time; CONFIG_DELIVERY={mode}: "
                    + ("function → device-commands topic → bridge service → Mosquitto → TLS front → device"
                       if mode == "fanout" else "function → Mosquitto (backend user, PUBACK) → TLS front → device"))
            figures += [
                Figure(SECTION, f"request→device p50 ({mode})", s["p50_ms"], "ms", COMMAND, note, s),
                Figure(SECTION, f"request→device p99 ({mode})", s["p99_ms"], "ms", COMMAND, note, s),
            ]
    finally:
        for d in devices:
            with contextlib.suppress(Exception):  # best effort at teardown
                d.disconnect()
        stack.stop()
    return figures

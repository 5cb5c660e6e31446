"""The HTTP device bridge next to MQTT QoS 1, on one broker host (the real front, Mosquitto and bridge service, the
Pub/Sub and Firestore emulators), same devices, same payloads, same concurrency.

Each load is ``WORKERS`` devices, one thread each, closed loop: a device sends its next message once the previous
one was acknowledged — over HTTP, the 200 of ``publishEvent`` (a keep-alive ``requests`` session, a fresh JWT per
device reused across its requests, as IoT Core's samples did); over MQTT, the PUBACK of a QoS 1 PUBLISH (the device
SDK). Both acknowledgements mean the same thing: the host's broker holds the message, and the bridge service
forwards it to Pub/Sub. The figures: acknowledged messages a second over ``DURATION_S``, and the p50/p99 of the
send → acknowledgement time. The per-device rate limits are lifted (as in the bridge section): the figures are the
host's, not the limiter's. Afterwards every acknowledged message is counted on a telemetry subscription (the
section fails if one is missing).

Reproduce: ``.venv/bin/python -m bench http``.
"""

from __future__ import annotations

import base64
import threading
import time

import requests
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from bench import local
from bench.core import Figure, summary_ms
from bench.loadgen import payload
from iotbridge.device import Device, DeviceIdentity, create_jwt
from iotbridge.local.broker_host import init_host, start_bridge_stack
from iotbridge.registry import Registry

COMMAND = ".venv/bin/python -m bench http"
SECTION = "http"
WORKERS = 8
DURATION_S = 10.0
UNLIMITED_MESSAGES_PER_S = 1e9
UNLIMITED_BYTES_PER_S = 1e12


def _closed_loop(send, workers: int) -> tuple[int, float, list[float]]:  # noqa: ANN001 - send(worker, seq) -> ok
    """(acknowledged, elapsed seconds, latencies) of ``workers`` threads sending for DURATION_S."""
    latencies: list[list[float]] = [[] for _ in range(workers)]
    failures: list[BaseException] = []
    start = threading.Barrier(workers + 1)
    t_end = [0.0]

    def work(w: int) -> None:
        start.wait()
        seq = 0
        try:
            while time.monotonic() < t_end[0]:
                seq += 1
                t = time.perf_counter()
                if not send(w, seq):
                    raise AssertionError(f"device {w}: message {seq} not acknowledged")
                latencies[w].append(time.perf_counter() - t)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller: a refused message fails the section
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for th in threads:
        th.start()
    t_end[0] = time.monotonic() + DURATION_S
    t0 = time.monotonic()
    start.wait()
    for th in threads:
        th.join()
    if failures:
        raise failures[0]
    flat = [x for part in latencies for x in part]
    return len(flat), time.monotonic() - t0, flat


def _count(subscription: str, expected: int, timeout: float = 120.0) -> int:
    sub = pubsub_v1.SubscriberClient()
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < expected and time.monotonic() < deadline:
        try:
            resp = sub.pull(request={"subscription": subscription, "max_messages": 1000}, timeout=5)
        except gexc.DeadlineExceeded:
            continue
        if resp.received_messages:
            sub.acknowledge(request={"subscription": subscription,
                                     "ack_ids": [m.ack_id for m in resp.received_messages]})
            seen += len(resp.received_messages)
    return seen


def run() -> list[Figure]:
    env = local.emulators()
    prefix = local.new_prefix("bh")
    local.create_topics(local.PROJECT, prefix)
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    wd = local.workdir() / f"{prefix}-host"
    init_host(wd, local.PROJECT, local.REGION, local.REGISTRY, prefix,
              device_messages_per_s=UNLIMITED_MESSAGES_PER_S, device_bytes_per_s=UNLIMITED_BYTES_PER_S)
    stack = start_bridge_stack(wd, local.PROJECT, local.REGION, local.REGISTRY, prefix, env)
    figures: list[Figure] = []
    try:
        devices = local.register_devices(registry, WORKERS, f"{prefix}-d")
        subscription = local.create_pull_subscription(local.PROJECT, prefix, "telemetry", "count")
        ca = str(stack.ca_cert)

        # HTTP: one keep-alive session per device, its JWT minted once.
        sessions = []
        for device_id, key in devices:
            s = requests.Session()
            s.headers.update({"authorization": f"Bearer {create_jwt(local.PROJECT, key, 'ES256')}",
                              "cache-control": "no-cache"})
            url = (f"{stack.http_bridge_url}/v1/projects/{local.PROJECT}/locations/{local.REGION}/registries/"
                   f"{local.REGISTRY}/devices/{device_id}:publishEvent")
            sessions.append((s, url))

        def http_send(w: int, seq: int) -> bool:
            s, url = sessions[w]
            body = {"binary_data": base64.b64encode(payload(w, seq, "http")).decode()}
            # verify per request: a session's own is overridden by REQUESTS_CA_BUNDLE when that is set.
            return s.post(url, json=body, timeout=30, verify=ca).status_code == 200

        http_n, http_s, http_lat = _closed_loop(http_send, WORKERS)

        # MQTT QoS 1: the device SDK, the same devices.
        mqtt_devices = []
        for device_id, key in devices:
            d = Device(DeviceIdentity(local.PROJECT, local.REGION, local.REGISTRY, device_id, key, "ES256"),
                       stack.mqtt_host, stack.mqtt_port, ca)
            d.connect(timeout=30)
            mqtt_devices.append(d)

        def mqtt_send(w: int, seq: int) -> bool:
            info = mqtt_devices[w].publish_event(payload(w, 10_000_000 + seq, "mqtt"), qos=1)
            info.wait_for_publish(30)
            return info.is_published()

        mqtt_n, mqtt_s, mqtt_lat = _closed_loop(mqtt_send, WORKERS)
        for d in mqtt_devices:
            d.disconnect()
        arrived = _count(subscription, http_n + mqtt_n)
        if arrived < http_n + mqtt_n:
            raise AssertionError(f"{http_n + mqtt_n - arrived} acknowledged messages never reached Pub/Sub")
        note = f"{WORKERS} devices, closed loop, {DURATION_S:g} s; every acknowledged message counted on Pub/Sub"
        for name, n, secs, lat, what in (("HTTP publishEvent", http_n, http_s, http_lat, "200"),
                                         ("MQTT QoS 1 publish", mqtt_n, mqtt_s, mqtt_lat, "PUBACK")):
            ms = summary_ms(lat)
            figures.append(Figure(SECTION, f"{name}: acknowledged messages/s", round(n / secs, 1), "msg/s",
                                  COMMAND, note, {"acknowledged": n, "seconds": round(secs, 2)}))
            figures.append(Figure(SECTION, f"{name}: send → {what} p99", ms["p99_ms"], "ms", COMMAND,
                                  f"p50 {ms['p50_ms']} ms; {note}", ms))
    finally:
        stack.stop()
    return figures

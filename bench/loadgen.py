"""Device load for the bridge and broker benchmarks, run as its own process (so the bench's bookkeeping does not
share a GIL with the devices): ``python -m bench.loadgen SPEC.json`` prints one JSON line of results.

SPEC: ``{"host", "port", "ca", "project", "region", "registry", "devices": [[id, private key PEM], ...],
"per_device": n, "qos": 0|1, "rate": total msg/s or 0 for as fast as possible, "run": tag, "raw": false}``.

The devices are :class:`iotbridge.device.Device` (paho-mqtt over TLS, IoT Core JWT). With ``"raw": true`` they
are plain paho clients on a bare Mosquitto (no TLS, no JWT; ``ca``, ``project``, ``region``, ``registry`` and
the keys are not used), each publishing to ``raw/{index}``: the raw paho→paho limit is measured with the publisher
in a process of its own, the same layout as the bridge's. Each payload is a telemetry message (docs/messages.md)
with keys the benchmark reads back: ``sent`` (epoch seconds when the device handed it to its MQTT client),
``dev`` (the device's index), ``seq`` and ``run``, so loss, duplicates and latency are computed from what arrived.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge.device import Device, DeviceIdentity


def payload(dev: int, seq: int, run: str) -> bytes:
    now = time.time()
    return (f'{{"ts": {int(now * 1000)}, "metrics": {{"temperature": 21.5, "rpm": 1200}}, "seq": {seq}, '
            f'"dev": {dev}, "run": "{run}", "sent": {now:.6f}}}').encode()


class Publisher(Protocol):
    def publish(self, data: bytes, qos: int) -> mqtt.MQTTMessageInfo: ...
    def close(self) -> None: ...


class SdkDevice:
    """A device on the device SDK (TLS, JWT, ``/devices/{id}/events``)."""

    def __init__(self, spec: dict, device_id: str, key: str):
        self.device = Device(DeviceIdentity(spec["project"], spec["region"], spec["registry"], device_id,
                                            key.encode(), "ES256"), spec["host"], spec["port"], spec["ca"],
                             max_inflight=100)
        self.device.connect(timeout=30)

    def publish(self, data: bytes, qos: int) -> mqtt.MQTTMessageInfo:
        return self.device.publish_event(data, qos=qos)

    def close(self) -> None:
        self.device.disconnect()


class RawClient:
    """A plain paho client on a bare broker, with the SDK's in-flight window (100) and an unbounded queue."""

    def __init__(self, spec: dict, index: int):
        self.topic = f"raw/{index}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{spec['run']}-{index}")
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.connect(spec["host"], spec["port"])
        self.client.loop_start()

    def publish(self, data: bytes, qos: int) -> mqtt.MQTTMessageInfo:
        return self.client.publish(self.topic, data, qos=qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    devices: list[Publisher] = [RawClient(spec, i) if spec.get("raw") else SdkDevice(spec, device_id, key)
                                for i, (device_id, key) in enumerate(spec["devices"])]
    per_device, qos, rate, run = spec["per_device"], spec["qos"], float(spec["rate"]), spec["run"]
    total = per_device * len(devices)
    infos = []
    interval = 1.0 / rate if rate > 0 else 0.0
    t0 = time.time()
    p0 = time.perf_counter()
    for i in range(total):
        if interval:
            # Paced: message i is due at p0 + i * interval (an open-loop schedule; lateness is not made up by
            # bursting more than the client can write, it shows up as latency).
            due = p0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        dev = i % len(devices)
        infos.append(devices[dev].publish(payload(dev, i // len(devices), run), qos))
    t_published = time.time()
    unacked = 0
    for info in infos:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(timeout=120)
        unacked += not info.is_published()
    t_acked = time.time()
    for d in devices:
        d.close()
    print(json.dumps({"t0": t0, "t_published": t_published, "t_acked": t_acked, "sent": total,
                      "unacked": unacked}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

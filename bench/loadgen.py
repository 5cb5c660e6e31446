"""Device load for the bridge benchmark, run as its own process (so the bench's bookkeeping does not share a GIL
with the devices): ``python -m bench.loadgen SPEC.json`` prints one JSON line of results.

SPEC: ``{"host", "port", "ca", "project", "region", "registry", "devices": [[id, private key PEM], ...],
"per_device": n, "qos": 0|1, "rate": total msg/s or 0 for as fast as possible, "run": tag}``.

The devices are :class:`iotbridge.device.Device` (paho-mqtt over TLS, IoT Core JWT). Each payload is a telemetry
message (docs/messages.md) with two extra keys the benchmark reads back from Pub/Sub: ``sent`` (epoch seconds when the
device handed it to its MQTT client) and ``dev`` (the device's index), so loss, duplicates and latency are
computed from what arrived.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from iotbridge.device import Device, DeviceIdentity


def payload(dev: int, seq: int, run: str) -> bytes:
    now = time.time()
    return (f'{{"ts": {int(now * 1000)}, "metrics": {{"temperature": 21.5, "rpm": 1200}}, "seq": {seq}, '
            f'"dev": {dev}, "run": "{run}", "sent": {now:.6f}}}').encode()


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    devices = []
    for device_id, key in spec["devices"]:
        d = Device(DeviceIdentity(spec["project"], spec["region"], spec["registry"], device_id, key.encode(),
                                  "ES256"), spec["host"], spec["port"], spec["ca"], max_inflight=100)
        d.connect(timeout=30)
        devices.append(d)
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
        infos.append(devices[dev].publish_event(payload(dev, i // len(devices), run), qos=qos))
    t_published = time.time()
    unacked = 0
    for info in infos:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(timeout=120)
        unacked += not info.is_published()
    t_acked = time.time()
    for d in devices:
        d.disconnect()
    print(json.dumps({"t0": t0, "t_published": t_published, "t_acked": t_acked, "sent": total,
                      "unacked": unacked}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

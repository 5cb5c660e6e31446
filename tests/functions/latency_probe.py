"""Request → device latency of the config-push function, warm, on this machine.

    .venv/bin/python -m tests.functions.latency_probe [--requests 200] [--devices 20]

Starts the Pub/Sub and Firestore emulators, Mosquitto and the function served by functions-framework from its
deployment archive behind a push subscription (``tests/functions/served.py``); registers ``--devices`` devices,
each subscribed to its config topic; after a warm-up request, publishes one config request at a time, round robin
over the devices (so the per-device rate limit of one update a second is not what is measured), and times each
from the publish call to the device's paho ``on_message``. Prints p50/p90/p99/max as JSON, with the time spent
inside the function from its logs. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from iotbridge.local import services
from tests.functions.served import DeviceClient, serve


def percentile(sorted_values: list[float], q: float) -> float:
    index = max(0, min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests (default 200)")
    parser.add_argument("--devices", type=int, default=20, help="devices taking turns (default 20)")
    args = parser.parse_args(argv)
    if args.devices < 2 or args.requests < 1:
        parser.error("--devices must be >= 2 and --requests >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="config-push-latency-"))
    pubsub = services.start_pubsub(workdir / "pubsub")
    firestore = services.start_firestore(workdir / "firestore")
    devices: list[DeviceClient] = []
    try:
        env = {**pubsub.env, **firestore.env}
        os.environ.update(env)
        with serve(env, workdir) as served:
            ids = [f"probe-{i:03d}" for i in range(args.devices)]
            for device_id in ids:
                served.registry.create_device(device_id)
                devices.append(DeviceClient("127.0.0.1", served.broker_port, device_id))
            served.publish({"device_id": ids[0], "config": {"warm": True}})  # cold start, first connections
            devices[0].next(timeout=60)
            last_sent: dict[str, float] = {ids[0]: time.monotonic()}
            samples: list[float] = []
            for n in range(args.requests):
                i = (n + 1) % args.devices
                device_id = ids[i]
                # Respect the registry's one update per second per device; with 20 devices this rarely waits.
                wait = last_sent.get(device_id, 0.0) + 1.05 - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                payload = {"n": n}
                t0 = time.monotonic()
                last_sent[device_id] = t0
                served.publish({"device_id": device_id, "config": payload})
                msg = devices[i].next(timeout=60)
                samples.append(time.monotonic() - t0)
                if json.loads(msg.payload) != payload:
                    raise RuntimeError(f"{device_id} received {msg.payload!r}, expected {payload}")
            samples.sort()
            inside = sorted(e["durationMs"] for line in served.function.log_path.read_text().splitlines()
                            if line.startswith("{") and "durationMs" in (e := json.loads(line)))[1:]  # not the warm-up
            print(json.dumps({
                "requests": len(samples), "devices": args.devices,
                "p50_ms": round(percentile(samples, 0.50) * 1000, 1),
                "p90_ms": round(percentile(samples, 0.90) * 1000, 1),
                "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
                "max_ms": round(samples[-1] * 1000, 1),
                "mean_ms": round(statistics.fmean(samples) * 1000, 1),
                # Time inside the function (parse, registry transaction, device read, PUBACK); the rest is the
                # emulator's push delivery and the broker → device hop.
                "function_p50_ms": percentile(inside, 0.50), "function_p99_ms": percentile(inside, 0.99),
            }))
    finally:
        for d in devices:
            d.close()
        firestore.stop()
        pubsub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

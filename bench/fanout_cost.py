"""Config fan-out cost per broker host: ``python -m bench.fanout_cost --hosts 2 [--configs 20]``.

Starts ``--hosts`` broker hosts (Mosquitto, bridge service, front; real processes) on one stack over the emulators,
one device on each, and pushes ``--configs`` configs spread over the devices through the targeted delivery path
(``iotbridge.bridge.fanout.push_config``). Then it reads each bridge's counters (``service-stats.json``):

- ``received``: messages the host's delivery subscription handed it;
- ``foreign``: those of them addressed to another host, which the bridge dropped;
- ``own`` = received − foreign: the messages the host needed.

The Pub/Sub emulator stores a subscription's filter without applying it, so locally ``received`` is the broadcast
cost (every host gets every config: ``received`` per host per config = 1) and ``own`` is what each host's filtered
subscription receives from real Pub/Sub (Pub/Sub acknowledges the rest itself): ``own`` per host per config ≈
1 / hosts, and one delivery per config in all. The script prints both, labelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from google.cloud import pubsub_v1

from bench import local
from iotbridge.bridge import fanout
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import Registry


def _stats(stack: BridgeStack) -> dict[str, int]:
    return json.loads((Path(stack.settings.workdir) / "service-stats.json").read_text())


def run(hosts: int, configs: int) -> dict[str, object]:
    env = local.emulators()
    prefix = local.new_prefix("fc")
    local.create_topics(local.PROJECT, prefix)
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    stacks: list[BridgeStack] = []
    devices: list[Device] = []
    try:
        for i in range(hosts):
            stacks.append(start_bridge_stack(local.workdir() / prefix / f"host-{i}", local.PROJECT, local.REGION,
                                             local.REGISTRY, prefix, env, host_id=f"host-{i}"))
        keys = local.register_devices(registry, hosts, prefix)
        for (device_id, private), st in zip(keys, stacks, strict=True):
            d = Device(DeviceIdentity(local.PROJECT, local.REGION, local.REGISTRY, device_id, private, "ES256"),
                       st.mqtt_host, st.mqtt_port, str(st.ca_cert))
            d.connect()
            d.subscribe_config()
            devices.append(d)
        deadline = time.monotonic() + 30
        while any(registry.connected_host(d.identity.device_id) is None for d in devices):
            if time.monotonic() > deadline:
                raise RuntimeError("devices' presence not recorded within 30 s")
            time.sleep(0.2)
        time.sleep(1.0)  # the counters file is rewritten every 0.5 s
        before = [_stats(st) for st in stacks]
        pub = pubsub_v1.PublisherClient()
        for n in range(configs):
            d = devices[n % hosts]
            fanout.push_config(registry, pub, prefix, d.identity.device_id, f"cfg-{n}".encode(), min_interval_s=0)
        expected_own = [len(range(i, configs, hosts)) for i in range(hosts)]
        deadline = time.monotonic() + 60
        while True:
            after = [_stats(st) for st in stacks]
            own = [(a["delivery_received"] - b["delivery_received"]) - (a["delivery_foreign"] - b["delivery_foreign"])
                   for a, b in zip(after, before, strict=True)]
            if own == expected_own or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(2.0)  # let late foreign deliveries land too
        after = [_stats(st) for st in stacks]
        rows = []
        for i, (a, b) in enumerate(zip(after, before, strict=True)):
            received = a["delivery_received"] - b["delivery_received"]
            foreign = a["delivery_foreign"] - b["delivery_foreign"]
            rows.append({"host": f"host-{i}", "received": received, "foreign": foreign, "own": received - foreign,
                         "received_per_config": received / configs, "own_per_config": (received - foreign) / configs})
        total_received = sum(int(r["received"]) for r in rows)
        total_own = sum(int(r["own"]) for r in rows)
        return {"hosts": hosts, "configs": configs, "per_host": rows,
                "received_per_host_per_config": total_received / configs / hosts,
                "own_per_host_per_config": total_own / configs / hosts,
                "own_deliveries_per_config": total_own / configs,
                "own_complete": [r["own"] for r in rows] == expected_own}
    finally:
        for d in devices:
            d.disconnect()
        for st in stacks:
            st.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--configs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.configs < 1:
        parser.error("--hosts and --configs must be at least 1")
    try:
        result = run(args.hosts, args.configs)
    finally:
        local.stop_all()
    print(json.dumps(result, indent=2))
    print(f"{args.hosts} hosts, {args.configs} configs: per host per config, the emulator's unfiltered subscriptions "
          f"received {result['received_per_host_per_config']:.2f} (broadcast); the messages each host needed (what "
          f"its filtered subscription receives from Pub/Sub): {result['own_per_host_per_config']:.2f}, "
          f"{result['own_deliveries_per_config']:.2f} deliveries per config in all", file=sys.stderr)
    return 0 if result["own_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())

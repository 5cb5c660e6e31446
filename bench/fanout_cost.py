"""Config and command fan-out cost per broker host: ``python -m bench.fanout_cost --hosts 2 [--configs 20]
[--commands 20]``; in ``make bench`` (section ``fanout``) for 2 and 6 hosts.

Starts ``--hosts`` broker hosts (Mosquitto, bridge service, front; real processes) on one stack over the emulators,
one device on each, and pushes ``--configs`` configs and sends ``--commands`` commands spread over the devices
through the targeted delivery path (``iotbridge.bridge.fanout.push_config`` and ``send_command``). Then it reads
each bridge's counters (``service-stats.json``):

- ``received``: messages the host's delivery subscription handed it;
- ``foreign``: those of them addressed to another host, which the bridge dropped;
- ``own`` = received − foreign: the messages the host needed.

The Pub/Sub emulator stores a subscription's filter without applying it, so locally ``received`` is the broadcast
cost (every host gets every message: ``received`` per host per message = 1) and ``own`` is what each host's
filtered subscription receives from real Pub/Sub (Pub/Sub acknowledges the rest itself): ``own`` per host per
message ≈ 1 / hosts, and one delivery per message in all. The script prints both, labelled; ``iotctl capacity``
reads the section's figures from the bench's reference run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1

from bench import local
from bench.core import Figure
from iotbridge.bridge import fanout
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import Registry


def _stats(stack: BridgeStack) -> dict[str, int]:
    return json.loads((Path(stack.settings.workdir) / "service-stats.json").read_text())


def measure(hosts: int, configs: int, commands: int = 0) -> dict[str, Any]:
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
            d.subscribe_commands()
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
        for n in range(commands):
            d = devices[n % hosts]
            fanout.send_command(registry, pub, prefix, d.identity.device_id, f"cmd-{n}".encode())
        messages = configs + commands
        expected_own = [len(range(i, configs, hosts)) + len(range(i, commands, hosts)) for i in range(hosts)]
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
            own = received - foreign
            rows.append({"host": f"host-{i}", "received": received, "foreign": foreign, "own": own,
                         "received_per_message": received / messages, "own_per_message": own / messages})
        total_received = sum(int(r["received"]) for r in rows)
        total_own = sum(int(r["own"]) for r in rows)
        return {"hosts": hosts, "configs": configs, "commands": commands, "per_host": rows,
                "received_per_host_per_message": total_received / messages / hosts,
                "own_per_host_per_message": total_own / messages / hosts,
                "own_deliveries_per_message": total_own / messages,
                "own_complete": [r["own"] for r in rows] == expected_own}
    finally:
        for d in devices:
            d.disconnect()
        for st in stacks:
            st.stop()


SECTION_HOSTS = (2, 6)  # make bench's fanout section: the old cap's smallest tier, and beyond the old cap of 4
SECTION_MESSAGES = 24  # configs, and as many commands: divisible by both host counts
COMMAND = "python -m bench.fanout_cost --hosts {hosts} --configs {n} --commands {n}"


def run() -> list[Figure]:
    """The ``fanout`` section of ``python -m bench``: the figures ``iotctl capacity`` reads, for 2 and 6 hosts."""
    figures = []
    for hosts in SECTION_HOSTS:
        r = measure(hosts, SECTION_MESSAGES, SECTION_MESSAGES)
        if not r["own_complete"]:
            raise RuntimeError(f"{hosts} hosts: not every host kept its own messages: {r['per_host']}")
        command = COMMAND.format(hosts=hosts, n=SECTION_MESSAGES)
        note = (f"{SECTION_MESSAGES} configs + {SECTION_MESSAGES} commands over {hosts} devices, one per host; "
                "per host, averaged over the hosts")
        figures += [
            Figure("fanout", f"messages kept per host per config or command, {hosts} hosts",
                   round(float(r["own_per_host_per_message"]), 4), "messages", command,
                   "what the host's filtered subscription delivers under real Pub/Sub: its own devices' messages; "
                   + note, extra={"per_host": r["per_host"]}),
            Figure("fanout", f"messages received per host per config or command, {hosts} hosts, unfiltered",
                   round(float(r["received_per_host_per_message"]), 4), "messages", command,
                   "the Pub/Sub emulator does not apply filters: every host is handed every message (the broadcast "
                   "cost the filter removes) and drops the foreign ones; " + note),
            Figure("fanout", f"deliveries per config or command in all, {hosts} hosts",
                   round(float(r["own_deliveries_per_message"]), 4), "deliveries", command,
                   "kept messages summed over the hosts: one per message however many hosts; " + note),
        ]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--configs", type=int, default=20)
    parser.add_argument("--commands", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.configs < 1 or args.commands < 0:
        parser.error("--hosts and --configs must be at least 1, --commands at least 0")
    try:
        result = measure(args.hosts, args.configs, args.commands)
    finally:
        local.stop_all()
    print(json.dumps(result, indent=2))
    print(f"{args.hosts} hosts, {args.configs} configs, {args.commands} commands: per host per message, the "
          f"emulator's unfiltered subscriptions received {result['received_per_host_per_message']:.2f} (broadcast); "
          f"the messages each host needed (what its filtered subscription receives from Pub/Sub): "
          f"{result['own_per_host_per_message']:.2f}, {result['own_deliveries_per_message']:.2f} deliveries per "
          "message in all", file=sys.stderr)
    return 0 if result["own_complete"] else 1

if __name__ == "__main__":
    sys.exit(main())

"""The bridge service's CPU per config sync in a reconnect storm, or per config delivery in a fleet-wide config
push (not a ``make bench`` section).

``python -m bench.sync_burst N ROUNDS [OTHER_ROOT] [--push]``: N devices registered with a config on the emulators;
then, ROUNDS times, a fresh broker host whose service gets the N config sync requests a reconnect storm of N devices
makes (published on ``iotbridge/sync`` as the front publishes them, all at once) or, with ``--push``, the N config
deliveries a push of a new config to every device makes (each device's latest version published on the
device-commands topic for this host, as ``fanout.publish_config`` does, all at once); printed per run: the service
process's CPU per sync or delivery (user + system, /proc) from the first request to the N-th retained config it
published, also less what it spends idle in as long (measured for ``IDLE_S`` just before), and the wall time (with
``--push`` that includes the Pub/Sub emulator's delivery to the service's subscription). With
OTHER_ROOT (a directory holding another version of the ``iotbridge`` package, e.g. one extracted with
``git archive``), each round runs the host once with that version and once with this checkout's, in alternating
order, so both see the same machine load. The host's processes import ``iotbridge`` from PYTHONPATH (their working
directory holds none), which each line names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as paho
from google.cloud import pubsub_v1
from paho.mqtt.enums import CallbackAPIVersion

from bench import connections, local
from bench.core import group_cpu_seconds
from iotbridge import spec
from iotbridge.bridge.front import SYNC_TOPIC
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import ConfigVersion, Registry

ROOT = Path(__file__).resolve().parents[1]
IDLE_S = 5
USAGE = "usage: python -m bench.sync_burst N ROUNDS [OTHER_ROOT] [--push]"


def _push(stack: BridgeStack, configs: dict[str, ConfigVersion]) -> None:
    """Each device's config delivered to ``stack``'s host through the delivery topic, all publishes at once."""
    publisher = pubsub_v1.PublisherClient()
    s = stack.settings
    topic = publisher.topic_path(s.project, spec.topic_name(s.prefix, "device-commands"))
    futures = [publisher.publish(topic, config.data, **spec.FanoutMessage(
        spec.FANOUT_KIND_CONFIG, device_id, config.version, host_id=s.host_id).attributes())
        for device_id, config in configs.items()]
    for future in futures:
        future.result(timeout=60)


def _storm(stack: BridgeStack, configs: dict[str, ConfigVersion], push: bool = False,
           timeout_s: float = 300) -> tuple[float, float, float]:
    """The service's CPU seconds and the wall seconds from the first sync request (or delivery) to the last config
    published, and the CPU seconds the service spends idle (its timers, its Pub/Sub stream) in as long, measured
    just before."""
    device_ids = list(configs)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="iotbridge:bench:sync", clean_session=True)
    client.username_pw_set("bridge", stack.settings.secrets()["bridge"])  # as the front's control connection
    client.max_inflight_messages_set(1000)
    client.connect(stack.settings.broker_host, stack.settings.broker_port)
    client.loop_start()
    service = stack.procs["service"].proc.pid
    try:
        time.sleep(2)  # the service's start-up work is over
        idle0, t0 = group_cpu_seconds(service), time.monotonic()
        time.sleep(IDLE_S)
        idle_rate = (group_cpu_seconds(service) - idle0) / (time.monotonic() - t0)
        before = stack.service_stats().get("configs", 0)
        cpu0, t0 = group_cpu_seconds(service), time.monotonic()
        if push:
            _push(stack, configs)
        else:
            infos = [client.publish(SYNC_TOPIC, device_id, qos=1) for device_id in device_ids]
            for info in infos:
                info.wait_for_publish(timeout=60)
        while stack.service_stats().get("configs", 0) - before < len(device_ids):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{stack.service_stats().get('configs', 0) - before} of {len(device_ids)} "
                                   "configs published")
            time.sleep(0.02)
        wall = time.monotonic() - t0
        return group_cpu_seconds(service) - cpu0, wall, idle_rate * wall
    finally:
        client.loop_stop()
        client.disconnect()


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _version(env: dict[str, str]) -> str:
    """Where the host's processes import ``iotbridge`` from under ``env``."""
    return subprocess.run([sys.executable, "-c", "import iotbridge; print(iotbridge.__file__)"], env={
        **os.environ, **env}, capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def main(argv: list[str]) -> int:
    push = "--push" in argv
    argv = [a for a in argv if a != "--push"]
    if len(argv) not in (2, 3) or not all(a.isdigit() for a in argv[:2]):
        print(USAGE, file=sys.stderr)
        return 2
    n, rounds = int(argv[0]), int(argv[1])
    roots = {"this": ROOT, **({"other": Path(argv[2]).resolve()} if len(argv) == 3 else {})}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the emulators are stopped too (atexit)
    env = local.emulators()
    tag = local.new_prefix("sb")
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    device_ids = [d for d, _ in connections.register_many(registry, n, f"{tag}-d")]
    with ThreadPoolExecutor(16) as pool:
        configs = dict(zip(device_ids, pool.map(
            lambda d: registry.update_config(d, f"config of {d}".encode()), device_ids), strict=True))
    try:
        for r in range(rounds):
            order = list(roots.items()) if r % 2 == 0 else list(reversed(roots.items()))
            for name, root in order:
                prefix = local.new_prefix("sb")
                local.create_topics(local.PROJECT, prefix)
                run_env = {**env, "PYTHONPATH": str(root)}
                stack = start_bridge_stack(local.workdir() / f"{prefix}-host", local.PROJECT, local.REGION,
                                           local.REGISTRY, prefix, run_env)
                try:
                    cpu, wall, idle = _storm(stack, configs, push)
                finally:
                    stack.stop()
                one, many = ("delivery", "deliveries") if push else ("sync", "syncs")
                print(f"round {r + 1} {name} ({_version(run_env)}): {n} {many} in {wall:.2f} s = {n / wall:.0f}/s; "
                      f"service CPU {1000 * cpu / n:.2f} ms per {one}, "
                      f"{1000 * (cpu - idle) / n:.2f} ms above its idle CPU; load average {_load()}", flush=True)
    finally:
        local.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

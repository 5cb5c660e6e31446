"""Does a hostile client slow the other devices of its host? A probe device's connect and publish times, alone and
under two attacks at once, as ratios measured in one run.

One broker host as ``iotbridge.local.broker_host`` starts it (Mosquitto, the TLS front, the bridge service) on the
Pub/Sub and Firestore emulators, with its default limits. The probe is an IoT Core device on the device SDK: each
round it connects (TLS, ES256 JWT), publishes ``PROBE_MESSAGES`` QoS 1 events, waits for every PUBACK and
disconnects. ``ROUNDS`` rounds alone, then ``ROUNDS`` rounds while, in a separate process (:func:`load_main`):

- a SUBSCRIBE flood: an authenticated device whose config the broker holds retained sends one SUBSCRIBE carrying
  ``SUBSCRIBE_COPIES`` copies of its own config filter, again and again, reconnecting whenever it is dropped;
- an unauthenticated CONNECT flood: ``CONNECTS_PER_S`` TLS connections a second from another loopback address
  (127.0.0.2), each sending a CONNECT for an unknown device id with a made-up password.

The rounds alternate: the attacker process is paused (SIGSTOP) for a round alone and resumed (SIGCONT) for a round
under attack, ``ROUNDS`` pairs, so that the machine's drift falls on both alike. Figures: the median connect and
publish times of the probe alone and under attack, and their ratios (1.0: the attacks cost the probe nothing).
The attacker shares the machine's 2 cores with the host, so some of any slowdown is the attacker's own CPU, which
the note gives with the front's.

Reproduce: ``.venv/bin/python -m bench attacks``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench import local
from bench.core import Figure, group_cpu_seconds
from iotbridge.bridge import mqtt
from iotbridge.device import ConnectError, Device, DeviceIdentity, generate_key
from iotbridge.local.broker_host import start_bridge_stack
from iotbridge.registry import Credential, Registry

COMMAND = ".venv/bin/python -m bench attacks"
SECTION = "attacks"
ROUNDS = 30
PROBE_MESSAGES = 20
SUBSCRIBE_COPIES = 3000
CONNECTS_PER_S = 400
ATTACKER_ADDRESS = "127.0.0.2"
WARMUP_S = 3.0
PAUSE_S = 0.5  # after pausing or resuming the attacker, before the probe's round


def _probe_round(dev: Device) -> tuple[float, float]:
    t0 = time.monotonic()
    dev.connect(timeout=60)
    t1 = time.monotonic()
    infos = [dev.publish_event(b"probe-%d" % i) for i in range(PROBE_MESSAGES)]
    for info in infos:
        info.wait_for_publish(60)
    t2 = time.monotonic()
    dev.disconnect()
    return t1 - t0, t2 - t1


def _alternate(dev: Device, attacker_pgid: int, rounds: int) -> tuple[list[tuple[float, float]],
                                                                        list[tuple[float, float]], float]:
    """``rounds`` pairs of probe rounds, one with the attacker paused, one with it running; and how long in all it
    ran during them."""
    alone, attacked = [], []
    running = 0.0
    for _ in range(rounds):
        os.killpg(attacker_pgid, signal.SIGSTOP)
        time.sleep(PAUSE_S)
        alone.append(_probe_round(dev))
        resumed = time.monotonic()
        os.killpg(attacker_pgid, signal.SIGCONT)
        time.sleep(PAUSE_S)
        attacked.append(_probe_round(dev))
        running += time.monotonic() - resumed
    os.killpg(attacker_pgid, signal.SIGSTOP)
    return alone, attacked, running


# ------------------------------------------------------------------------------------------- the attacker process


def _subscribe_flood(args: argparse.Namespace, stop: threading.Event, counts: dict[str, int]) -> None:
    ident = DeviceIdentity(args.project, args.region, args.registry, args.device, Path(args.key).read_bytes(),
                           "ES256")
    while not stop.is_set():
        dev = Device(ident, args.host, args.port, args.ca)
        try:
            dev.connect(timeout=30)
        except ConnectError:
            time.sleep(0.2)
            continue
        while not stop.is_set() and dev.is_connected():
            dev.client.subscribe([(dev.config_topic, 1)] * SUBSCRIBE_COPIES)
            counts["subscribes"] += 1
            time.sleep(0.1)
        dev.disconnect()


async def _connect_flood(args: argparse.Namespace, stop: threading.Event, counts: dict[str, int]) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    inflight: set[asyncio.Task[None]] = set()

    async def one() -> None:
        device = f"ghost-{uuid.uuid4().hex[:10]}"
        client_id = f"projects/{args.project}/locations/{args.region}/registries/{args.registry}/devices/{device}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                args.host, args.port, ssl=ctx, server_hostname="localhost", local_addr=(ATTACKER_ADDRESS, 0)), 10)
            writer.write(mqtt.encode_connect(mqtt.Connect(level=4, clean=True, keepalive=30, client_id=client_id,
                                                          username="unused", password=b"not-a-jwt")))
            await asyncio.wait_for(reader.read(4), 10)
            counts["connects"] += 1
            writer.close()
        except (OSError, TimeoutError, ssl.SSLError):
            counts["closed"] += 1  # turned away before or during the TLS handshake

    interval = 1.0 / CONNECTS_PER_S
    next_at = time.monotonic()
    while not stop.is_set():
        next_at = max(next_at + interval, time.monotonic())  # paced; no catch-up burst after a SIGSTOP
        counts["attempts"] += 1
        task = asyncio.ensure_future(one())
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*inflight, return_exceptions=True)


def load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attacks")
    for name in ("host", "ca", "project", "region", "registry", "device", "key", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = {"subscribes": 0, "attempts": 0, "connects": 0, "closed": 0}
    flood = threading.Thread(target=_subscribe_flood, args=(args, stop, counts), daemon=True)
    flood.start()
    asyncio.run(_connect_flood(args, stop, counts))
    flood.join(10)
    Path(args.out).write_text(json.dumps(counts))
    return 0


# ------------------------------------------------------------------------------------------- the section


def run() -> list[Figure]:
    env = local.emulators()
    prefix = f"atk{uuid.uuid4().hex[:6]}"
    local.create_topics(local.PROJECT, prefix)
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    wd = local.workdir() / f"{prefix}-host"
    stack = start_bridge_stack(wd, local.PROJECT, local.REGION, local.REGISTRY, prefix, env)
    load: subprocess.Popen[bytes] | None = None
    try:
        probe_id, attacker_id = f"{prefix}-probe", f"{prefix}-attacker"
        keys = {}
        for device_id in (probe_id, attacker_id):
            private, public = generate_key("ES256")
            registry.create_device(device_id, [Credential("ES256_PEM", public)])
            keys[device_id] = private
        registry.update_config(attacker_id, b'{"retained": true}', min_interval_s=0)
        key_file = wd / "attacker-key.pem"
        key_file.write_bytes(keys[attacker_id])
        probe = Device(DeviceIdentity(local.PROJECT, local.REGION, local.REGISTRY, probe_id, keys[probe_id], "ES256"),
                       stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
        _probe_round(probe)  # warm: first connect pays for imports and TLS session setup

        out = wd / "attacker.json"
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.attacks", "--host", stack.mqtt_host, "--port", str(stack.mqtt_port),
             "--ca", str(stack.ca_cert), "--project", local.PROJECT, "--region", local.REGION,
             "--registry", local.REGISTRY, "--device", attacker_id, "--key", str(key_file), "--out", str(out)],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=(wd / "attacker.log").open("wb"))
        time.sleep(WARMUP_S)
        front_pid, load_pid = stack.procs["front"].proc.pid, load.pid
        cpu0 = (group_cpu_seconds(front_pid), group_cpu_seconds(load_pid))
        t0 = time.monotonic()
        pairs = _alternate(probe, load.pid, ROUNDS)
        span = time.monotonic() - t0
        cpu1 = (group_cpu_seconds(front_pid), group_cpu_seconds(load_pid))
        os.killpg(load.pid, signal.SIGTERM)
        os.killpg(load.pid, signal.SIGCONT)
        load.wait(60)
        counts = json.loads(out.read_text())
        stats = stack.front_stats()
    finally:
        if load is not None and load.poll() is None:
            os.killpg(load.pid, signal.SIGKILL)
        stack.stop()

    def med(rounds: list[tuple[float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rounds)

    alone, attacked, running = pairs
    running += WARMUP_S
    c_alone, p_alone = med(alone, 0), med(alone, 1)
    c_att, p_att = med(attacked, 0), med(attacked, 1)
    attack = (f"attacker (running about {running:.0f} s): {counts['subscribes']} SUBSCRIBEs of {SUBSCRIBE_COPIES} "
              f"copies, {counts['attempts']} unauthenticated connection attempts (about "
              f"{counts['attempts'] / running:.0f}/s; {counts['connects']} got a CONNACK, {counts['closed']} closed "
              f"before or during TLS); front: {stats['address_limited']} turned away without a registry read, "
              f"{stats['registry_lookups']} registry lookups, {stats['config_acks']} config acks; CPU over the "
              f"{span:.0f} s of alternating rounds: front {cpu1[0] - cpu0[0]:.1f} s, attacker "
              f"{cpu1[1] - cpu0[1]:.1f} s")
    return [
        Figure(SECTION, "probe connect, alone (median)", round(c_alone * 1000, 1), "ms", COMMAND,
               f"{ROUNDS} rounds: TLS + JWT + CONNACK"),
        Figure(SECTION, "probe connect, under attack (median)", round(c_att * 1000, 1), "ms", COMMAND, attack),
        Figure(SECTION, "probe connect under attack / alone", round(c_att / c_alone, 2), "ratio", COMMAND,
               "1.0 = the attacks cost the probe nothing"),
        Figure(SECTION, f"probe {PROBE_MESSAGES} QoS 1 events, alone (median)", round(p_alone * 1000, 1), "ms",
               COMMAND, "publish until the last PUBACK"),
        Figure(SECTION, f"probe {PROBE_MESSAGES} QoS 1 events, under attack (median)", round(p_att * 1000, 1), "ms",
               COMMAND, attack),
        Figure(SECTION, "probe publish under attack / alone", round(p_att / p_alone, 2), "ratio", COMMAND,
               "1.0 = the attacks cost the probe nothing"),
    ]


if __name__ == "__main__":
    sys.exit(load_main(sys.argv[1:]))

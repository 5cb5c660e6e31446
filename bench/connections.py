"""Concurrent authenticated idle device connections one broker host holds, and what each costs in memory.

One broker host as ``iotbridge.local.broker_host`` starts it (Mosquitto, TLS front, bridge service) on the Pub/Sub
and Firestore emulators. ``TARGET`` devices are registered, each with its own ES256 key. The devices are not
paho clients (10,000 paho threads would measure paho): one asyncio loop in this process opens a TLS connection
per device, sends an MQTT 3.1.1 CONNECT with the device's client id path and a fresh JWT, waits for CONNACK,
and keeps the connection idle, sending PINGREQ within its keep-alive as a device would. The host authenticates
each one exactly as for any device (registry read, JWT verification, presence write, config sync).

Steps up to ``TARGET``; after each, the RSS of the front and of Mosquitto is read from /proc and a PINGREQ is
sent on every open connection: a connection counts as held only when its PINGRESP comes back through the front
and Mosquitto. Stops early at the first step where connections are refused or not held, and says why. The
processes started here get a raised open-files limit (each device costs the front two descriptors).

Reproduce: ``.venv/bin/python -m bench connections``.

``python -m bench.connections --device-auth mosquitto``: the same on a host of ``device_auth: mosquitto`` (no front:
Mosquitto terminates TLS and its plugin asks the auth daemon); the RSS and CPU counted are Mosquitto's and the auth
daemon's. Its figures are printed, not written to bench/results.json.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import resource
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench import local
from bench.core import Figure, group_cpu_seconds
from iotbridge import spec
from iotbridge.bridge import mqtt
from iotbridge.device import create_jwt
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import Registry

COMMAND = ".venv/bin/python -m bench connections"
COMMAND_ALONE = ".venv/bin/python -m bench.connections"
# The processes whose memory and CPU a connection costs, by the host's device_auth: the one that faces the devices
# first.
COUNTED = {"front": ("front", "mosquitto"), "mosquitto": ("mosquitto", "authd")}
LABEL = {"front": "front", "mosquitto": "Mosquitto", "authd": "auth daemon"}
SECTION = "connections"
STEPS = (1000, 2500, 5000, 7500, 10_000)
TARGET = STEPS[-1]
KEEPALIVE_S = 60
CONCURRENT_CONNECTS = 64
KEEPALIVE_YIELD_EVERY = 64
NOFILE = 65_536
LOCAL_RECHECK_S = 5.0  # the front's re-check in this bench (the local stack's default)


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's open-files limit (inherited by the processes it starts); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not root: as far as the hard limit allows
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nofile_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Conn:
    device_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pongs: int = 0


@dataclass
class Fleet:
    host: str
    port: int
    ctx: ssl.SSLContext | None  # None: plain TCP (bench.profile_front mosquitto-tls)
    conns: list[Conn] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    _pong: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _attempts: int = 0

    async def connect(self, device_id: str, token: str) -> None:
        client_id = f"projects/{local.PROJECT}/locations/{local.REGION}/registries/{local.REGISTRY}/devices/{device_id}"
        # Each device from an address of its own in 127.0.0.0/8, as a fleet connects from many: the front's
        # per-address limits (20 connections awaiting CONNECT) are for one address, not for a fleet.
        n = self._attempts
        self._attempts += 1
        source = f"127.{1 + n // 62_500}.{(n // 250) % 250}.{n % 250 + 1}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.ctx, local_addr=(source, 0)), 60)
            writer.write(mqtt.encode_connect(mqtt.Connect(level=mqtt.MQTT_311, clean=True, keepalive=KEEPALIVE_S,
                                                          client_id=client_id, username="unused",
                                                          password=token.encode())))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readexactly(4), 60)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.errors[type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) and exc.errno else "")] += 1
            return
        if ack[0] >> 4 != mqtt.CONNACK or ack[3] != 0:
            self.errors[f"CONNACK code {ack[3]}"] += 1
            writer.close()
            return
        conn = Conn(device_id, reader, writer)
        self.conns.append(conn)
        self._readers.append(asyncio.ensure_future(self._read(conn)))

    async def _read(self, conn: Conn) -> None:
        try:
            while True:
                first, _body, _raw = await mqtt.read_packet(conn.reader, 1 << 20)
                if first >> 4 == mqtt.PINGRESP:
                    conn.pongs += 1
                    self._pong.set()
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError, mqtt.ProtocolError):
            conn.pongs = -1  # closed by the host

    async def ping_all(self, timeout: float = 60.0) -> int:
        """PINGREQ on every connection; the number whose PINGRESP came back (the connections really held)."""
        want = {id(c): c.pongs + 1 for c in self.conns if c.pongs >= 0}
        for c in self.conns:
            if c.pongs >= 0:
                c.writer.write(bytes([mqtt.PINGREQ << 4, 0]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = sum(1 for c in self.conns if c.pongs >= want.get(id(c), 1 << 30))
            if held == len(want):
                break
            self._pong.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pong.wait(), 1.0)
        return sum(1 for c in self.conns if c.pongs >= want.get(id(c), 1 << 30))

    async def keepalive(self) -> None:
        """Each connection sends PINGREQ within its keep-alive (spread over the period), as paho would. Each ping is
        due at its own time in the pass: a sleep of a few milliseconds per connection overshoots on loaded cores,
        and a pass over 10,000 connections that took longer than 1.5 keep-alives lost the last ones to the
        broker's keep-alive timeout."""
        loop = asyncio.get_running_loop()
        while True:
            period = KEEPALIVE_S * 0.8
            conns = [c for c in self.conns if c.pongs >= 0]
            if not conns:
                await asyncio.sleep(1)
                continue
            start = loop.time()
            for i, c in enumerate(conns):
                c.writer.write(bytes([mqtt.PINGREQ << 4, 0]))
                early = start + period * (i + 1) / len(conns) - loop.time()
                if early > 0:
                    await asyncio.sleep(early)
                elif i % KEEPALIVE_YIELD_EVERY == 0:  # behind: catch up, letting the readers run now and then
                    await asyncio.sleep(0)

    async def close(self) -> None:
        for t in self._readers:
            t.cancel()
        for c in self.conns:
            c.writer.close()
        await asyncio.gather(*self._readers, return_exceptions=True)


@dataclass
class Step:
    target: int
    open: int
    held: int
    errors: dict[str, int]
    connect_s: float
    rss_kib: dict[str, int]  # per counted process (COUNTED)
    cpu_s: float  # of the front, or of Mosquitto and the auth daemon (cpu_pids)


def counted_pids(stack: BridgeStack) -> dict[str, int]:
    """The pids of the processes a connection costs on ``stack`` (COUNTED), the device-facing one first."""
    return {role: stack.procs[role].proc.pid for role in COUNTED[stack.settings.device_auth]}


def cpu_pids(stack: BridgeStack) -> list[int]:
    """Whose CPU the bench counts: the front's (Mosquitto behind it is not), or Mosquitto's and the daemon's."""
    pids = counted_pids(stack)
    return [pids["front"]] if "front" in pids else list(pids.values())


def cpu_seconds(pids: list[int]) -> float:
    return sum(group_cpu_seconds(pid) for pid in pids)


async def _run(stack: BridgeStack, devices: list[tuple[str, bytes]]) -> tuple[list[Step], float, int]:
    ctx = ssl.create_default_context(cafile=str(stack.ca_cert))
    fleet = Fleet(stack.mqtt_host, stack.mqtt_port, ctx)
    pids, busy = counted_pids(stack), cpu_pids(stack)

    def rss() -> dict[str, int]:
        return {role: rss_kib(pid) for role, pid in pids.items()}

    steps = [Step(0, 0, 0, {}, 0.0, rss(), 0.0)]
    sem = asyncio.Semaphore(CONCURRENT_CONNECTS)
    pinger = asyncio.ensure_future(fleet.keepalive())

    async def one(device_id: str, key: bytes) -> None:
        async with sem:
            token = create_jwt(local.PROJECT, key, "ES256", lifetime_s=3600)
            await fleet.connect(device_id, token)

    idle_cpu_per_s = 0.0
    try:
        done = 0
        for target in STEPS:
            cpu0, t0 = cpu_seconds(busy), time.monotonic()
            errors_before = sum(fleet.errors.values())
            await asyncio.gather(*(one(d, k) for d, k in devices[done:target]))
            connect_s = time.monotonic() - t0
            front_cpu = cpu_seconds(busy) - cpu0
            done = target
            held = await fleet.ping_all()
            steps.append(Step(target, len(fleet.conns), held, dict(fleet.errors), connect_s, rss(), front_cpu))
            if sum(fleet.errors.values()) > errors_before or held < len(fleet.conns):
                break
        # The idle cost of what is held: the front's CPU (or Mosquitto's and the auth daemon's) over 10 s with
        # nothing but keep-alives and the registry re-check (of connected devices; the daemon's change feed).
        cpu0, t0 = cpu_seconds(busy), time.monotonic()
        await asyncio.sleep(10)
        idle_cpu_per_s = (cpu_seconds(busy) - cpu0) / (time.monotonic() - t0)
        final_held = await fleet.ping_all()
    finally:
        pinger.cancel()
        await fleet.close()
    return steps, idle_cpu_per_s, final_held


def front_refusals(stack: BridgeStack) -> str:
    """The front's (or the auth daemon's) most frequent refusal reasons (its log), e.g. the open-files limit."""
    role = "front" if stack.settings.device_auth == "front" else "authd"
    reasons: collections.Counter[str] = collections.Counter()
    try:
        for line in (stack.workdir / role / f"{role}.log").read_text(errors="replace").splitlines():
            if " refused " in line and ": " in line:
                reasons[line.rsplit(": ", 1)[-1][:120]] += 1
    except OSError:
        return "no log"
    return ", ".join(f"{n} × {r}" for r, n in reasons.most_common(3)) or "no refusals logged"


def register_many(registry: Registry, n: int, tag: str, workers: int = 16) -> list[tuple[str, bytes]]:
    chunks = [range(i, min(i + 250, n)) for i in range(0, n, 250)]

    def batch(r: range) -> list[tuple[str, bytes]]:
        return local.register_devices(registry, len(r), f"{tag}-{r.start:05d}")

    with ThreadPoolExecutor(workers) as pool:
        return [d for part in pool.map(batch, chunks) for d in part]


def run(device_auth: str = "front") -> list[Figure]:
    nofile = raise_nofile()
    env = local.emulators()
    prefix = local.new_prefix("bc")
    local.create_topics(local.PROJECT, prefix)
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    t0 = time.monotonic()
    devices = register_many(registry, TARGET, f"{prefix}-d")
    register_s = time.monotonic() - t0
    # The auth daemon runs at the cloud's 30 s re-check: at the local 5 s it refused all of the first 1,000 CONNECTs
    # on this shared machine (2 cores, load 11), its first rounds re-reading the 10,000 devices just registered.
    recheck = spec.CLOUD_RECHECK_INTERVAL_S if device_auth == "mosquitto" else LOCAL_RECHECK_S
    stack = start_bridge_stack(local.workdir() / f"{prefix}-host", local.PROJECT, local.REGION, local.REGISTRY,
                               prefix, env, recheck_interval_s=recheck, device_auth=device_auth)
    roles = COUNTED[device_auth]
    first = roles[0]  # the process that holds the devices' sockets: the front, or Mosquitto
    first_nofile = _nofile_of(stack.procs[first].proc.pid)
    try:
        steps, idle_cpu, final_held = asyncio.run(_run(stack, devices))
    finally:
        stack.stop()
    base, last = steps[0], steps[-1]
    reached = max(s.held for s in steps)
    per_role = {r: (last.rss_kib[r] - base.rss_kib[r]) / max(last.open, 1) for r in roles}
    per_conn_kib = sum(per_role.values())
    accepted = sum(s.open - prev.open for prev, s in zip(steps, steps[1:], strict=False))
    connect_s = sum(s.connect_s for s in steps[1:])
    busy_cpu = sum(s.cpu_s for s in steps[1:])
    trail = "; ".join(f"{s.target}: {s.held} held, {s.connect_s:.1f} s, "
                      + ", ".join(f"{LABEL[r].lower()} {s.rss_kib[r] // 1024} MiB" for r in roles) for s in steps[1:])
    if reached >= TARGET:
        why = "all held"
    else:
        why = (f"stopped at the {last.target} step: {last.open} open, {last.held} answered PINGREQ, "
               f"client errors {last.errors}; {LABEL[roles[0] if device_auth == 'front' else 'authd']} says: "
               f"{front_refusals(stack)}")
    command = COMMAND if device_auth == "front" else f"{COMMAND_ALONE} --device-auth {device_auth}"
    names = " + ".join(LABEL[r] for r in roles)
    busy = "front" if device_auth == "front" else names
    extra = {"steps": [s.__dict__ for s in steps], "open_files_limit": nofile, "register_s": round(register_s, 1),
             f"{first}_open_files_limit": first_nofile, "device_auth": device_auth,
             "load_average": os.getloadavg()}
    if device_auth == "mosquitto":
        extra["authd_rss_at_start_kib"] = base.rss_kib["authd"]
    fds = "two per device" if device_auth == "front" else "one per device"
    return [
        Figure(SECTION, "idle authenticated connections held, 1 host", reached, "connections", command,
               f"target {TARGET}; {why}; after 10 s idle {final_held} still answered PINGREQ; open-files limit "
               f"{nofile} ({LABEL[first].lower()}: {first_nofile}; it needs {fds}); registering {TARGET} devices "
               f"took {register_s:.0f} s", extra),
        Figure(SECTION, f"memory per connection ({names} RSS)", round(per_conn_kib, 1), "KiB", command,
               " + ".join(f"{LABEL[r]} {per_role[r]:.1f} KiB" for r in roles) + f" per connection; {trail}"),
        Figure(SECTION, "connection rate (TLS + JWT + registry)", round(accepted / connect_s, 1) if connect_s else None,
               "connections/s", command,
               f"{CONCURRENT_CONNECTS} concurrent handshakes from one asyncio client in the same 2 cores; {busy} CPU "
               f"{1000 * busy_cpu / max(accepted, 1):.2f} ms per connection"),
        # The name stays the same from run to run (the count is in the note), so make bench can compare it with the
        # reference's.
        Figure(SECTION, f"{busy} CPU while holding the idle connections", round(100 * idle_cpu, 1),
               "% of one core", command, f"{last.open} idle connections; keep-alive {KEEPALIVE_S} s and the registry "
               f"re-check every {stack.settings.recheck_interval_s:.0f} s (of the devices changed since the last)"),
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.connections", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device-auth", choices=sorted(COUNTED), default="front",
                   help="the host's device_auth (default: front, as python -m bench connections)")
    args = p.parse_args(argv)
    try:
        for f in run(args.device_auth):
            print(json.dumps(f.to_json()), flush=True)
    finally:
        local.stop_all()
    print(f"load at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

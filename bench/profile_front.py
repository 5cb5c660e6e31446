"""Profiles of the TLS front (not a ``make bench`` section; the README's performance notes quote them).

``python -m bench.profile_front pyspy N OUT``: one broker host on the emulators, N registered devices connecting
(64 at a time, as ``bench connections``) while py-spy records the front (and the bridge service, which serves the
config sync each connect asks for) for 30 s, then 20 s of py-spy with the N devices idle; prints the connection
rate, the front's and the service's CPU per connection, the front's idle CPU and RSS, and leaves the raw py-spy
samples in OUT/connect.txt, OUT/connect-service.txt and OUT/idle.txt. The front's Firestore operations are counted too
(bench/firestore_ops.py): reads and writes per connection, and per idle device-hour over ``IDLE_S`` seconds that
begin ``SETTLE_S`` after the last connect (each device has sent a PINGREQ by then).

``python -m bench.profile_front pyspy-plugin N ROUNDS OUT``: where a connect's CPU goes in ``device_auth: mosquitto``
against the front: one broker host on the emulators with its front, and beside it Mosquitto with the plugin and its
auth daemon (``bench/mosquitto_auth.start_product``); per round, N fresh registered devices connect to the front and
N (the same each round) to the plugin's Mosquitto, 64 at a time, as ``connrate``, while py-spy (``--threads``, raw
samples in OUT) records the front or the daemon and the bridge service. Per burst: connections/s, CPU ms per
connection of each process, the bridge service's config sync batches (requests per batched read, from its
``sync_reads`` and ``sync_batch_items`` counters) and, per recorded process, its samples by thread and its
frames by inclusive share.

``python -m bench.profile_front mem N OUT``: where an idle connection's memory goes in the front. One broker host on
the emulators whose front runs with tracemalloc on; 200 devices connect first (one-time allocations), then N more.
Before and after the N, the front writes a tracemalloc snapshot, its live objects by type and its RSS (SIGUSR1);
printed per connection: RSS, the Python heap (traced), tracemalloc's own overhead and the rest (native: OpenSSL,
the C side of sockets, allocator slack), the heap by allocating line and by traceback, and the objects by type.
tracemalloc inflates the RSS by its own bookkeeping; ``bench connections`` measures the RSS without it.

``python -m bench.profile_front mosquitto-tls N OUT``: Mosquitto alone, N idle MQTT clients (after 200), once on a
TLS listener (Mosquitto terminating TLS with the local server certificate, as the front does) and once on plain
TCP: its RSS growth per connection, what a host would hold per device with Mosquitto terminating TLS and the
front out of the data path.

``python -m bench.profile_front idle N RECHECK_S [DEVICE_AUTH]``: the front's CPU over 90 s while it holds N idle
devices (keep-alive 60 s, as ``bench connections``) with the registry re-check every RECHECK_S seconds (the cloud's
is ``iotbridge.spec.CLOUD_RECHECK_INTERVAL_S``). DEVICE_AUTH ``mosquitto``: a host of ``device_auth: mosquitto``,
and the CPU of Mosquitto (its keep-alive handling) and of the auth daemon (its change-feed rounds), each and summed.

``python -m bench.profile_front authd-map N``: the auth daemon's memory per device of the registry (its map holds
every device, connected or not): the RSS of a daemon started on a registry of ``MEM_WARMUP`` devices, then of one
started after N more were registered (the map read whole at start, as on a host), and of the first one after its
change feed took the N in.

``python -m bench.profile_front sslobj N VARIANT``: OpenSSL's own memory per server-side TLS connection, apart from
asyncio (VARIANT ``base``, or ``norelease``: without SSL_MODE_RELEASE_BUFFERS).

``python -m bench.profile_front ops OP N``: N repetitions of one step of a device connect in this process, for
``valgrind --tool=callgrind``: OP ``jwt`` is the front's check of an ES256 device token, ``tls`` one TLS 1.3
handshake (both ends, over a socketpair) with the front's server context. Instructions per operation are the
difference of two runs (N and 0) divided by N, which the shared cores do not disturb.

``python -m bench.profile_front connrate N ROUNDS``: the connection-rate decision, three designs on the same load
generator in one run, interleaved round by round (each round: N fresh registered devices per front design, N
clients for Mosquitto): (1) the front as deployed, one process; (2) two front processes sharing the port with
SO_REUSEPORT (a prototype: the front as it is, started twice with ``reuse_port``); (3) Mosquitto terminating TLS
itself with no authentication (the ceiling of the design where a plugin would check the JWT). Per design:
connections/s, and CPU ms per connection of the front process(es), of Mosquitto, of the bridge service and of the
load generator itself; the machine's load average. Then the cost of what a plugin would add in design (3): one
ES256 JWT verification, timed in this process with the front's own ``verify_jwt`` (``cryptography``).

``python -m bench.profile_front connrate-plugin N ROUNDS HOLD``: the design where Mosquitto terminates TLS and
authenticates devices itself (``device_auth: mosquitto``; the plugins are compiled first, which needs gcc and
``mosquitto-dev``), against the front, on the same load generator as ``connrate``, interleaved round by round:
(1) the front as deployed (N fresh registered devices per round); (3) Mosquitto terminating TLS with no
authentication; (4a) the product: Mosquitto with ``iotbridge/bridge/mosquitto_plugin`` asking the auth daemon
(``iotbridge/bridge/authd.py``, its device map read at start and kept by the change feed, presence records and the
config sync request per CONNECT, which the bridge service serves: its CPU is counted); (4c) the bench's OpenSSL
prototype checking the JWT in the plugin against key files written at start (``bench/mosquitto_auth``). The
plugin designs connect the same N registered devices each round. Per design: connections/s and CPU ms per
connection of every process. Then, for (4a) and (4c), memory per idle authenticated connection: the RSS growth of
Mosquitto (and the daemon) over HOLD connections held after 200.

``python -m bench.profile_front authd N``: the auth daemon of ``device_auth: mosquitto`` in this process, without
Mosquitto: N registered devices' CONNECTs (a fresh token each) judged by its checks alone, then N CONNECTs
admitted and ended as the plugin reports them (AUTH answered, presence record written in its batches, GONE, record
removed in its batches); CPU ms per connection of this process (its registry threads included). No MQTT client:
the config sync requests are not published.

``python -m bench.profile_front syncread N``: what the bridge service's config sync costs per connect in its
Firestore read, and what batching would save: N registered devices (no config, as the bench's), read in this
process one ``Registry.get_config`` per device (what the service does per sync request today) and in batched
reads of their device documents (``Registry.get_devices``, ``get_all``) of 8 and of 64; CPU ms per device
(this process, its gRPC threads included) and wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from bench import connections, firestore_ops, local
from bench.core import group_cpu_seconds
from iotbridge import spec
from iotbridge.bridge.auth import verify_jwt
from iotbridge.bridge.front import server_ssl_context
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.device import create_jwt, generate_key
from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack, init_host, start_bridge_stack
from iotbridge.local.tls import generate_local_tls
from iotbridge.registry import Credential, Registry

SETTLE_S = 60
IDLE_S = 60


def _record(pid: int, seconds: int, out: Path, extra: tuple[str, ...] | list[str] = ()) -> subprocess.Popen[bytes]:
    pyspy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw",
                             "--output", str(out), "--nonblocking", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _fleet(stack: BridgeStack, devices: list[tuple[str, bytes]]):  # noqa: ANN202
    """The bench's device fleet for ``stack``, a fresh token per device, and a connect of one device (64 at a
    time, as ``bench connections``)."""
    fleet = connections.Fleet(stack.mqtt_host, stack.mqtt_port, ssl.create_default_context(cafile=str(stack.ca_cert)))
    sem = asyncio.Semaphore(connections.CONCURRENT_CONNECTS)
    tokens = [(d, create_jwt(local.PROJECT, k, "ES256", lifetime_s=3600)) for d, k in devices]

    async def one(device_id: str, token: str) -> None:
        async with sem:
            await fleet.connect(device_id, token)

    return fleet, tokens, one


async def _profile(stack: BridgeStack, devices: list[tuple[str, bytes]], out: Path, counts: Path) -> None:
    front = stack.procs["front"].proc.pid
    service = stack.procs["service"].proc.pid
    fleet, tokens, one = _fleet(stack, devices)

    rec = _record(front, 30, out / "connect.txt")
    rec_service = _record(service, 30, out / "connect-service.txt")
    ops0 = firestore_ops.read(counts)
    cpu0, service0, t0 = group_cpu_seconds(front), group_cpu_seconds(service), time.monotonic()
    await asyncio.gather(*(one(d, t) for d, t in tokens))
    took = time.monotonic() - t0
    n = max(1, len(fleet.conns))
    print(f"connected {len(fleet.conns)} in {took:.1f} s = {len(fleet.conns) / took:.0f}/s; front CPU "
          f"{1000 * (group_cpu_seconds(front) - cpu0) / n:.2f} ms per connection, bridge service (the config sync "
          f"each connect asks for) {1000 * (group_cpu_seconds(service) - service0) / n:.2f} ms; "
          f"errors {dict(fleet.errors)}", flush=True)
    await asyncio.sleep(1)  # the counts are written twice a second
    ops = firestore_ops.read(counts) - ops0
    print(f"Firestore per connection: {ops['reads'] / n:.3f} reads, {ops['writes'] / n:.3f} writes, "
          f"{(ops['lookups'] + ops['queries'] + ops['commits']) / n:.3f} RPCs ({dict(ops)})", flush=True)
    rec.wait()
    rec_service.wait()
    pinger = asyncio.ensure_future(fleet.keepalive())
    await asyncio.sleep(SETTLE_S)
    rec = _record(front, 20, out / "idle.txt")
    ops0 = firestore_ops.read(counts)
    cpu0, t0 = group_cpu_seconds(front), time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle_s = time.monotonic() - t0
    print(f"idle front CPU {100 * (group_cpu_seconds(front) - cpu0) / idle_s:.1f}% of a core "
          f"with {len(fleet.conns)} connections over {idle_s:.0f} s; front RSS {connections.rss_kib(front)} KiB",
          flush=True)
    await asyncio.sleep(1)
    ops = firestore_ops.read(counts) - ops0
    hours = n * idle_s / 3600
    print(f"Firestore per idle device-hour (re-check every {stack.settings.recheck_interval_s:g} s): "
          f"{ops['reads'] / hours:.2f} reads, {ops['writes'] / hours:.2f} writes ({dict(ops)})", flush=True)
    rec.wait()
    pinger.cancel()
    await fleet.close()


def _prepare(n: int, out: Path, tag: str) -> tuple[dict[str, str], str, list[tuple[str, bytes]]]:
    """The emulators' env, a fresh topic prefix and ``n`` registered devices."""
    out.mkdir(parents=True, exist_ok=True)
    connections.raise_nofile()
    env = local.emulators()
    prefix = local.new_prefix(tag)
    local.create_topics(local.PROJECT, prefix)
    return env, prefix, connections.register_many(Registry(local.PROJECT, local.REGISTRY, local.REGION), n,
                                                  f"{prefix}-d")


def pyspy(n: int, out: Path) -> None:
    env, prefix, devices = _prepare(n, out, "bp")
    counts = out / "firestore-ops"
    counts.mkdir(exist_ok=True)
    for stale in counts.glob("*.json"):
        stale.unlink()
    root = Path(__file__).resolve().parents[1]
    env = {**env, firestore_ops.ENV: str(counts), "PYTHONPATH": f"{firestore_ops.SHIM}:{root}"}
    stack = start_bridge_stack(local.workdir() / f"{prefix}-host", local.PROJECT, local.REGION, local.REGISTRY,
                               prefix, env)
    try:
        asyncio.run(_profile(stack, devices, out, counts))
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(stack.workdir / "front" / "front.log", out / "front.log")
        stack.stop()
        local.stop_all()


def _pyspy_top(raw: Path, top: int = 12) -> str:
    """py-spy's raw samples (one stack a line, ``frame;frame;... count``, thread first with ``--threads``) as the
    share of samples per thread and the ``top`` frames by inclusive share (each frame once per stack)."""
    threads: dict[str, int] = {}
    frames: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, parts = int(count), stack.split(";")
        total += n
        threads[parts[0]] = threads.get(parts[0], 0) + n
        for frame in set(parts[1:]):
            frames[frame] = frames.get(frame, 0) + n
    total = max(total, 1)

    def share(counts: dict[str, int], k: int) -> str:
        ranked = sorted(counts.items(), key=lambda x: -x[1])[:k]
        return "\n".join(f"      {100 * c / total:5.1f}%  {f}" for f, c in ranked)

    return f"    {total} samples; by thread:\n{share(threads, 6)}\n    by frame (inclusive):\n{share(frames, top)}"


def _service_sync_counts(stack: BridgeStack) -> tuple[int, int]:
    """The bridge service's (sync_reads, sync_batch_items) so far (service-stats.json, rewritten every second)."""
    import json

    stats = json.loads((stack.workdir / "service-stats.json").read_text())
    return stats.get("sync_reads", 0), stats.get("sync_batch_items", 0)


def pyspy_plugin(n: int, rounds: int, out: Path) -> None:
    """See the module docstring: py-spy on the front and on the auth daemon, the bridge service beside each."""
    from bench import mosquitto_auth

    out.mkdir(parents=True, exist_ok=True)
    product = mosquitto_auth.build_product(out)
    host, devices = _connrate_host(n * (rounds + 1))
    stack, ctx = host.stack, host.ctx
    try:
        stack.start_mosquitto()
        stack.start_service()
        front = host.front("front-x1", 1)[0]
        daemon, broker = mosquitto_auth.start_product(stack.settings, product, services.free_port(),
                                                      stack.workdir / "plugin", stack.env)
        host.parts += [broker, daemon]
        service = stack.procs["service"].proc.pid
        designs = [Design("front", front.port, ctx, ["front", "bridge service"],
                          [devices[(i + 1) * n:(i + 2) * n] for i in range(rounds)]),
                   Design("mosquitto", broker.port, ctx, ["auth daemon", "Mosquitto plugin", "bridge service"],
                          [devices[:n]] * rounds)]
        groups = {"front": [front.proc.pid], "auth daemon": [daemon.proc.pid], "Mosquitto plugin": [broker.proc.pid],
                  "Mosquitto (behind the front)": [stack.procs["mosquitto"].proc.pid], "bridge service": [service]}
        print(f"load at start {os.getloadavg()}; {n} connections per design and round, {rounds} rounds", flush=True)

        async def run_all() -> None:
            for rnd in range(rounds):
                for design in designs:
                    name = f"{design.name}-{rnd}"
                    recs = [(part, out / f"{name}-{part.replace(' ', '-')}.txt") for part in design.parts
                            if part != "Mosquitto plugin"]
                    procs = [_record(groups[part][0], 600, raw, ["--threads"]) for part, raw in recs]
                    await asyncio.sleep(1)  # py-spy attached
                    reads0, items0 = _service_sync_counts(stack)
                    await _connrate_phase(design, n, rnd, groups)  # its settle lets the last syncs be served
                    reads, items = (b - a for a, b in zip((reads0, items0), _service_sync_counts(stack), strict=True))
                    print(f"    bridge service: {items} sync requests and deliveries in {reads} batched reads = "
                          f"{items / max(reads, 1):.1f} a read", flush=True)
                    for proc in procs:
                        proc.send_signal(signal.SIGINT)
                        proc.wait()
                    for part, raw in recs:
                        print(f"    py-spy {part} ({raw}):\n{_pyspy_top(raw)}", flush=True)

        asyncio.run(run_all())
    finally:
        host.stop()
    print(f"load at end {os.getloadavg()}")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    a, b = socket.socketpair()
    client = threading.Thread(target=lambda: client_ctx.wrap_socket(b, server_hostname="localhost").close())
    client.start()
    server_ctx.wrap_socket(a, server_side=True).close()
    client.join()


def _jwt_case() -> tuple[str, list[Credential]]:
    """A device's ES256 token and its registered credential, as the front checks them."""
    private, public = generate_key("ES256")
    return create_jwt("bench-project", private, "ES256"), [Credential("ES256_PEM", public)]


def ops(op: str, n: int) -> None:
    if op == "jwt":
        token, creds = _jwt_case()
        for _ in range(n + 1):  # the first parses the key, which the credential keeps
            verify_jwt(token, creds, audience="bench-project")
    elif op == "tls":
        files = generate_local_tls(Path(tempfile.mkdtemp()))
        server_ctx = server_ssl_context(str(files.server_cert), str(files.server_key))
        client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
        for _ in range(n + 1):  # the first loads what the contexts load lazily
            _handshake(server_ctx, client_ctx)
    else:
        raise SystemExit(f"unknown op {op!r}: jwt or tls")


MEM_WARMUP = 200
REPO = Path(__file__).resolve().parents[1]
MEM_FRAMES = 12


def traced_front(settings_file: str, out: str) -> None:
    """The front as ``python -m iotbridge.bridge front`` runs it, with tracemalloc on; each SIGUSR1 writes a
    snapshot, the live objects counted by type and the RSS into ``out`` (numbered files)."""
    import collections
    import gc
    import json
    import signal
    import tracemalloc

    from iotbridge.bridge.__main__ import main as bridge_main

    tracemalloc.start(MEM_FRAMES)
    taken = [0]

    def dump(_sig: int, _frame: object) -> None:
        gc.collect()
        n = taken[0]
        taken[0] += 1
        tracemalloc.take_snapshot().dump(f"{out}/snap{n}.tm")
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        Path(f"{out}/info{n}.json").write_text(json.dumps({
            "rss_kib": connections.rss_kib(os.getpid()), "traced": tracemalloc.get_traced_memory()[0],
            "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory(), "types": types}))

    signal.signal(signal.SIGUSR1, dump)
    bridge_main(["front", "--settings", settings_file])


def _sockstat() -> str:
    return " | ".join(line.strip() for line in Path("/proc/net/sockstat").read_text().splitlines()
                      if line.startswith(("TCP:", "sockets:")))


async def _snapshot(pid: int, out: Path, n: int) -> dict:
    import json

    os.kill(pid, signal.SIGUSR1)
    info = out / f"info{n}.json"
    for _ in range(600):
        if info.exists():
            await asyncio.sleep(0.5)
            return json.loads(info.read_text())
        await asyncio.sleep(0.2)
    raise RuntimeError("the traced front wrote no snapshot")


async def _mem(stack: BridgeStack, pid: int, devices: list[tuple[str, bytes]], out: Path) -> None:
    fleet, tokens, one = _fleet(stack, devices)

    pinger = asyncio.ensure_future(fleet.keepalive())
    await asyncio.gather(*(one(d, t) for d, t in tokens[:MEM_WARMUP]))
    await fleet.ping_all()
    await asyncio.sleep(8)  # a recheck round or two
    print("before:", _sockstat(), flush=True)
    before = await _snapshot(pid, out, 0)
    await asyncio.gather(*(one(d, t) for d, t in tokens[MEM_WARMUP:]))
    held = await fleet.ping_all()
    await asyncio.sleep(8)
    print("after: ", _sockstat(), flush=True)
    after = await _snapshot(pid, out, 1)
    pinger.cancel()
    n = held - MEM_WARMUP
    print(f"{held} held ({n} measured), errors {dict(fleet.errors)}", flush=True)
    _report(before, after, n, out)
    await fleet.close()


def _report(before: dict, after: dict, n: int, out: Path) -> None:
    import tracemalloc

    def per(key: str) -> float:
        return (after[key] - before[key]) / n

    rss = (after["rss_kib"] - before["rss_kib"]) * 1024 / n
    traced, overhead = per("traced"), per("tracemalloc_overhead")
    print(f"per connection: RSS {rss / 1024:.1f} KiB = Python heap (traced) {traced / 1024:.1f} KiB + tracemalloc's "
          f"own {overhead / 1024:.1f} KiB + the rest (native: OpenSSL, sockets' asyncio-free C state, allocator "
          f"slack) {(rss - traced - overhead) / 1024:.1f} KiB")
    s0 = tracemalloc.Snapshot.load(str(out / "snap0.tm"))
    s1 = tracemalloc.Snapshot.load(str(out / "snap1.tm"))
    print("\nPython heap per connection by allocating line (top 25):")
    for stat in s1.compare_to(s0, "lineno")[:25]:
        print(f"  {stat.size_diff / n:8.0f} B  {stat.count_diff / n:6.2f} blocks  {stat.traceback[0]}")
    print("\nby traceback (top 12, innermost 6 frames):")
    for stat in s1.compare_to(s0, "traceback")[:12]:
        print(f"  {stat.size_diff / n:8.0f} B  {stat.count_diff / n:6.2f} blocks")
        for frame in list(stat.traceback)[-6:]:
            print(f"        {frame}")
    grew = {t: (after["types"].get(t, 0) - before["types"].get(t, 0)) / n for t in after["types"]}
    print("\nlive objects (gc-tracked) per connection by type:")
    for t, k in sorted(grew.items(), key=lambda kv: -kv[1])[:30]:
        if k >= 0.05:
            print(f"  {k:6.2f}  {t}")


def _spawn_front(stack: BridgeStack, name: str, args: list[str], port: int) -> services.Service:
    """A front run through this module (``python -m bench.profile_front ARGS``) for ``stack``, in a folder of its
    own named ``name``; returns once it logs that it listens."""
    wd = stack.workdir / name
    wd.mkdir(exist_ok=True)
    with open(wd / "front.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.profile_front", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=wd,
                                env={**os.environ, **stack.env, "PYTHONPATH": str(REPO)}, start_new_session=True)
    svc = services.Service(name=name, proc=proc, host=stack.settings.front_host, port=port,
                           log_path=wd / "front.log", workdir=wd)
    services.wait_for_log(svc, "front listening", 60)
    return svc


def mem(n: int, out: Path) -> None:
    env, prefix, devices = _prepare(n + MEM_WARMUP, out, "bm")
    workdir = local.workdir() / f"{prefix}-host"
    settings = init_host(workdir, local.PROJECT, local.REGION, local.REGISTRY, prefix)
    stack = BridgeStack(settings=settings, workdir=workdir.resolve(), env=dict(env),
                        ca_cert=workdir.resolve() / "tls" / "ca.pem")
    try:
        stack.start_mosquitto()
        stack.start_service()
        svc = _spawn_front(stack, "front", ["traced-front", str(stack.settings_file()), str(out.resolve())],
                           settings.front_port)
        stack.procs["front"] = svc
        asyncio.run(_mem(stack, svc.proc.pid, devices, out))
    finally:
        stack.stop()
        local.stop_all()


async def _mosquitto_fleet(port: int, n: int, ctx: ssl.SSLContext | None, pids: list[int],
                           tokens: list[tuple[str, str]] | None = None) -> tuple[int, int, dict]:
    """``n`` idle MQTT connections to Mosquitto on ``port`` (TLS when ``ctx``) after ``MEM_WARMUP`` (``tokens``:
    each one's device id and password, else made-up ids); (held, RSS growth of ``pids`` in KiB, errors)."""
    fleet = connections.Fleet("127.0.0.1", port, ctx)
    sem = asyncio.Semaphore(connections.CONCURRENT_CONNECTS)
    tokens = tokens or [(f"proto-{i:06d}", "unused") for i in range(MEM_WARMUP + n)]

    async def one(device_id: str, token: str) -> None:
        async with sem:
            await fleet.connect(device_id, token)

    def rss() -> int:
        return sum(connections.rss_kib(p) for p in pids)

    await asyncio.gather(*(one(d, t) for d, t in tokens[:MEM_WARMUP]))
    await asyncio.sleep(2)
    rss0 = rss()
    await asyncio.gather(*(one(d, t) for d, t in tokens[MEM_WARMUP:MEM_WARMUP + n]))
    held = await fleet.ping_all()
    await asyncio.sleep(2)
    grown = rss() - rss0
    await fleet.close()
    return held - MEM_WARMUP, grown, dict(fleet.errors)


def _anonymous_mosquitto(port: int, extra: list[str], wd: Path) -> services.Service:
    """Mosquitto alone on ``port`` (``extra``: its listener's TLS lines), every client admitted."""
    conf = "\n".join(["user root" if os.geteuid() == 0 else "", f"listener {port} 127.0.0.1", *extra,
                      "allow_anonymous true", "max_keepalive 65535", "log_type error", ""])
    wd.mkdir(parents=True, exist_ok=True)
    return services.start_mosquitto(conf, port, wd)


def mosquitto_tls(n: int, out: Path) -> None:
    """Mosquitto's own memory per idle connection with TLS on its listener (the design where it terminates TLS
    and the front leaves the data path), against the same without TLS."""
    out.mkdir(parents=True, exist_ok=True)
    connections.raise_nofile()
    tls = generate_local_tls(out / "tls")
    for name, ctx, extra in (
            ("TLS", ssl.create_default_context(cafile=str(tls.ca_cert)),
             [f"certfile {tls.server_cert}", f"keyfile {tls.server_key}"]),
            ("plain TCP", None, [])):
        port = services.free_port()
        svc = _anonymous_mosquitto(port, extra, out / name.replace(" ", "-"))
        try:
            held, grown, errors = asyncio.run(_mosquitto_fleet(port, n, ctx, [svc.proc.pid]))
        finally:
            svc.stop()
        print(f"Mosquitto, {name}: {held} of {n} connections held; RSS +{grown} KiB = "
              f"{grown / max(held, 1):.1f} KiB per connection; client errors {errors}", flush=True)


IDLE_WINDOW_S = 90.0


async def _idle(stack: BridgeStack, devices: list[tuple[str, bytes]]) -> None:
    pids = {connections.LABEL[r]: pid for r, pid in connections.counted_pids(stack).items()
            if pid in connections.cpu_pids(stack)}
    fleet, tokens, one = _fleet(stack, devices)
    pinger = asyncio.ensure_future(fleet.keepalive())
    await asyncio.gather(*(one(d, t) for d, t in tokens))
    held = await fleet.ping_all()
    await asyncio.sleep(5)
    cpu0, t0 = {n: group_cpu_seconds(pid) for n, pid in pids.items()}, time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)
    idle = {n: (group_cpu_seconds(pid) - cpu0[n]) / (time.monotonic() - t0) for n, pid in pids.items()}
    each = ", ".join(f"{n} {100 * v:.1f}%" for n, v in idle.items())
    print(f"{held} idle connections held (errors {dict(fleet.errors)}), re-check every "
          f"{stack.settings.recheck_interval_s:g} s: {' + '.join(pids)} CPU {100 * sum(idle.values()):.1f}% of one "
          f"core over {IDLE_WINDOW_S:g} s ({each}); still held {await fleet.ping_all()}; load {os.getloadavg()}",
          flush=True)
    pinger.cancel()
    await fleet.close()


def idle(n: int, recheck_s: float, device_auth: str = "front") -> None:
    """The front's CPU (or Mosquitto's and the auth daemon's) while it holds ``n`` idle devices, with the registry
    re-checked every ``recheck_s``."""
    env, prefix, devices = _prepare(n, local.workdir(), "bi")
    stack = start_bridge_stack(local.workdir() / f"{prefix}-host", local.PROJECT, local.REGION, local.REGISTRY,
                               prefix, env, recheck_interval_s=recheck_s, device_auth=device_auth)
    try:
        asyncio.run(_idle(stack, devices))
    finally:
        stack.stop()
        local.stop_all()


def _authd_devices(stack: BridgeStack, want: int, timeout: float = 600.0) -> None:
    """Wait until the auth daemon's map holds ``want`` devices (its health port opens a moment after it is ready)."""
    deadline = time.monotonic() + timeout
    held = 0
    while held < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the auth daemon holds {held} devices, not {want}")
        with contextlib.suppress(OSError):
            held = stack.front_stats().get("devices", 0)
        time.sleep(1)


def authd_map(n: int) -> None:
    """See the module docstring: the auth daemon's RSS per device of the registry."""
    env, prefix, _ = _prepare(MEM_WARMUP, local.workdir(), "ba")
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    stack = start_bridge_stack(local.workdir() / f"{prefix}-host", local.PROJECT, local.REGION, local.REGISTRY,
                               prefix, env, device_auth="mosquitto")
    print(f"load at start {os.getloadavg()}", flush=True)
    try:
        _authd_devices(stack, MEM_WARMUP)
        time.sleep(2 * stack.settings.recheck_interval_s)  # a few change-feed rounds: the map's steady state
        base = connections.rss_kib(stack.procs["authd"].proc.pid)
        connections.register_many(registry, n, f"{prefix}-m")
        _authd_devices(stack, MEM_WARMUP + n)
        time.sleep(2 * stack.settings.recheck_interval_s)
        fed = connections.rss_kib(stack.procs["authd"].proc.pid)
        stack.stop_part("authd")
        stack.start_authd()  # ready once its map is read whole
        _authd_devices(stack, MEM_WARMUP + n)
        time.sleep(2 * stack.settings.recheck_interval_s)
        fresh = connections.rss_kib(stack.procs["authd"].proc.pid)
    finally:
        stack.stop()
        local.stop_all()
    print(f"auth daemon RSS with {MEM_WARMUP} registry devices {base} KiB; with {MEM_WARMUP + n}: started after "
          f"them {fresh} KiB ({(fresh - base) / n:.2f} KiB per registry device), taken in by the change feed {fed} "
          f"KiB ({(fed - base) / n:.2f} KiB per registry device)", flush=True)
    print(f"load at end {os.getloadavg()}")


SSL_CTRL_MODE, SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS = 33, 78, 0x10


def _malloc_in_use() -> int:
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def sslobj(n: int, variant: str) -> None:
    """OpenSSL's memory per server-side TLS connection, apart from asyncio: N pairs of ``SSLObject`` over memory BIOs
    (as asyncio's TLS protocol holds them), each after a TLS 1.3 handshake, 100 bytes up and a reply down; malloc's
    bytes in use (glibc ``mallinfo2``) with the server ends kept minus without. ``norelease`` clears
    SSL_MODE_RELEASE_BUFFERS on the server context first."""
    import ctypes
    import gc

    files = generate_local_tls(Path(tempfile.mkdtemp()))
    server_ctx = server_ssl_context(str(files.server_cert), str(files.server_key))
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    libssl = ctypes.CDLL("libssl.so.3")
    libssl.SSL_CTX_ctrl.restype = ctypes.c_long
    libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    # CPython's SSLContext object: the object header, then its SSL_CTX pointer.
    ctx_ptr = ctypes.c_void_p.from_address(id(server_ctx) + object.__basicsize__).value
    if variant == "norelease":
        libssl.SSL_CTX_ctrl(ctx_ptr, SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS, None)
    mode = libssl.SSL_CTX_ctrl(ctx_ptr, SSL_CTRL_MODE, 0, None)

    def end(ctx: ssl.SSLContext, server: bool) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject]:
        i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
        return i, o, ctx.wrap_bio(i, o, server_side=server, server_hostname=None if server else "localhost")

    def drain(obj: ssl.SSLObject) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            while obj.read(1 << 17):
                pass

    def pair() -> tuple[tuple, tuple]:
        s, c = end(server_ctx, True), end(client_ctx, False)
        for _ in range(10):
            for obj in (c[2], s[2]):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            s[0].write(c[1].read())
            c[0].write(s[1].read())
        c[2].write(b"x" * 100)
        s[0].write(c[1].read())
        drain(s[2])
        s[2].write(b"okok")
        c[0].write(s[1].read())
        drain(c[2])
        return s, c

    def grow(keep_server: bool) -> tuple[int, list]:
        gc.collect()
        before, kept = _malloc_in_use(), []
        for _ in range(n):
            s, c = pair()
            kept.append((s if keep_server else None, c))
        gc.collect()
        return _malloc_in_use() - before, kept

    grow(True)  # one-time allocations
    clients, _a = grow(False)
    both, _b = grow(True)
    release = "on" if mode & SSL_MODE_RELEASE_BUFFERS else "off"
    print(f"server context mode {mode:#x} (SSL_MODE_RELEASE_BUFFERS {release}); {variant}: OpenSSL per server-side "
          f"connection {(both - clients) / n / 1024:.1f} KiB (malloc in use)")


def reuse_front(settings_file: str) -> None:
    """The front as ``python -m iotbridge.bridge front`` runs it, its listeners bound with SO_REUSEPORT, so that
    several such processes share one port and the kernel spreads new connections over them. Each process's
    control client gets an id of its own (with one id per host, Mosquitto's client-id takeover would cut the
    other processes' control connections in turn)."""
    import dataclasses
    import functools

    from iotbridge.bridge import front
    from iotbridge.bridge.__main__ import main as bridge_main

    setattr(asyncio, "start_server", functools.partial(asyncio.start_server, reuse_port=True))  # noqa: B010
    control = front.Front._control_client

    def own_control(self: front.Front, password: str) -> paho.Client:
        shared = self.settings
        self.settings = dataclasses.replace(shared, host_id=f"{shared.host_id}-{os.getpid()}")
        try:
            return control(self, password)
        finally:
            self.settings = shared

    setattr(front.Front, "_control_client", own_control)  # noqa: B010
    bridge_main(["front", "--settings", settings_file])


CONNRATE_SETTLE_S = 8.0  # after a design's devices disconnect, before the next design's phase starts


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Design:
    name: str
    port: int
    ctx: ssl.SSLContext
    parts: list[str]  # the process groups serving its connections: the first serves them, all make the host
    devices: list[list[tuple[str, bytes]]]  # per round: the registered devices it connects ([] for Mosquitto)
    runs: list[dict] = field(default_factory=list)


async def _connrate_phase(design: Design, n: int, rnd: int, groups: dict[str, list[int]]) -> dict:
    """One design's connect burst: ``n`` devices, 64 at a time; the CPU of every part of the host over it."""
    fleet = connections.Fleet("127.0.0.1", design.port, design.ctx)
    sem = asyncio.Semaphore(connections.CONCURRENT_CONNECTS)
    if design.devices:
        tokens = [(d, create_jwt(local.PROJECT, k, "ES256", lifetime_s=3600)) for d, k in design.devices[rnd]]
    else:
        tokens = [(f"proto-{rnd}-{i:06d}", "unused") for i in range(n)]

    async def one(device_id: str, token: str) -> None:
        async with sem:
            await fleet.connect(device_id, token)

    def cpu() -> dict[str, float]:
        return {**{k: sum(group_cpu_seconds(p) for p in pids) for k, pids in groups.items()},
                "load generator": _self_cpu()}

    cpu0, t0 = cpu(), time.monotonic()
    await asyncio.gather(*(one(d, t) for d, t in tokens))
    took = time.monotonic() - t0
    cpu1 = cpu()
    held = await fleet.ping_all()
    await fleet.close()
    served = max(1, len(fleet.conns))
    run = {"round": rnd, "connected": len(fleet.conns), "held": held, "errors": dict(fleet.errors),
           "seconds": round(took, 2), "per_s": round(len(fleet.conns) / took, 1),
           "cpu_ms_per_connection": {k: round(1000 * (cpu1[k] - cpu0[k]) / served, 3) for k in cpu0},
           "load": os.getloadavg()}
    design.runs.append(run)
    print(f"  round {rnd} {design.name}: {run['connected']} connected ({held} answered PINGREQ) in {took:.1f} s = "
          f"{run['per_s']}/s; CPU ms per connection {run['cpu_ms_per_connection']}; errors {run['errors']}; "
          f"load {run['load']}", flush=True)
    await asyncio.sleep(CONNRATE_SETTLE_S)
    return run


def _jwt_verify_ms(n: int = 1000) -> float:
    """CPU ms of one ES256 JWT verification by the front's own ``verify_jwt`` (the key parsed once, as the
    credential keeps it)."""
    token, creds = _jwt_case()
    verify_jwt(token, creds, audience="bench-project")
    t0 = time.process_time()
    for _ in range(n):
        verify_jwt(token, creds, audience="bench-project")
    return 1000 * (time.process_time() - t0) / n


def _summarize(designs: list[Design]) -> dict:
    """The medians over the rounds per design, printed; the summary."""
    import statistics

    summary = {}
    print("\nmedian over the rounds:")
    for design in designs:
        per_s = statistics.median(r["per_s"] for r in design.runs)
        keys = design.runs[0]["cpu_ms_per_connection"]
        ms = {k: statistics.median(r["cpu_ms_per_connection"][k] for r in design.runs) for k in keys}
        serving = ms[design.parts[0]]
        host = sum(ms[p] for p in design.parts)
        summary[design.name] = {"per_s": per_s, "cpu_ms": ms, "serving_ms": serving, "host_ms": host,
                                "errors": [r["errors"] for r in design.runs]}
        parts = " + ".join(f"{p} {ms[p]:.2f}" for p in design.parts)
        print(f"  {design.name}: {per_s:.0f} connections/s; CPU per connection: {parts} = whole host {host:.2f} ms "
              f"(ceiling {1000 / host if host else float('nan'):.0f}/s per core); load generator "
              f"{ms['load generator']:.2f} ms (its own ceiling "
              f"{1000 / ms['load generator'] if ms['load generator'] else float('nan'):.0f}/s on its one core)",
              flush=True)
    return summary


@dataclass
class _Host:
    """The designs' processes on the emulators: the front's stack, and what the prototypes started."""

    stack: BridgeStack
    ctx: ssl.SSLContext
    parts: list[services.Service] = field(default_factory=list)

    def front(self, name: str, count: int) -> list[services.Service]:
        import dataclasses

        settings = self.stack.settings
        own = dataclasses.replace(settings, front_port=services.free_port(), health_port=services.free_port())
        own.dump(self.stack.workdir / f"{name}.json")
        fronts = [_spawn_front(self.stack, f"{name}-{i}", ["reuse-front", str(self.stack.workdir / f"{name}.json")],
                               own.front_port) for i in range(count)]
        self.parts += fronts
        return fronts

    def anonymous_tls(self) -> services.Service:
        settings = self.stack.settings
        svc = _anonymous_mosquitto(services.free_port(), [f"certfile {settings.tls_cert}",
                                                          f"keyfile {settings.tls_key}"],
                                   self.stack.workdir / "mosquitto-tls")
        self.parts.append(svc)
        return svc

    def stop(self) -> None:
        for part in self.parts:
            part.stop()
        self.stack.stop()
        local.stop_all()


def _connrate_host(n_devices: int) -> tuple[_Host, list[tuple[str, bytes]]]:
    env, prefix, devices = _prepare(n_devices, local.workdir(), "br")
    workdir = local.workdir() / f"{prefix}-host"
    # The cloud's re-check interval; no HTTP bridge (its port is not shared by the prototype).
    settings = init_host(workdir, local.PROJECT, local.REGION, local.REGISTRY, prefix,
                         recheck_interval_s=spec.CLOUD_RECHECK_INTERVAL_S, http_port=0)
    stack = BridgeStack(settings=settings, workdir=workdir.resolve(), env=dict(env),
                        ca_cert=workdir.resolve() / "tls" / "ca.pem")
    return _Host(stack, ssl.create_default_context(cafile=str(stack.ca_cert))), devices


def _run_rounds(designs: list[Design], groups: dict[str, list[int]], n: int, rounds: int) -> None:
    print(f"load at start {os.getloadavg()}; {n} connections per design and round, {rounds} rounds", flush=True)

    async def run_all() -> None:
        for rnd in range(rounds):
            for design in designs:
                await _connrate_phase(design, n, rnd, groups)

    asyncio.run(run_all())


def connrate(n: int, rounds: int) -> None:
    """See the module docstring: the front alone, two fronts with SO_REUSEPORT, Mosquitto terminating TLS."""
    import json

    host, devices = _connrate_host(2 * n * rounds)
    stack, ctx = host.stack, host.ctx
    try:
        stack.start_mosquitto()
        stack.start_service()
        fronts = [host.front("front-x1", 1), host.front("front-x2", 2)]
        mosq_tls = host.anonymous_tls()
        by_round = [devices[i * n:(i + 1) * n] for i in range(2 * rounds)]
        behind = ["Mosquitto (behind the fronts)", "bridge service"]
        designs = [
            Design("(1) front, 1 process", fronts[0][0].port, ctx, ["front x1", *behind], by_round[0::2]),
            Design("(2) front, 2 processes, SO_REUSEPORT", fronts[1][0].port, ctx, ["front x2", *behind],
                   by_round[1::2]),
            Design("(3) Mosquitto terminating TLS, no authentication", mosq_tls.port, ctx, ["Mosquitto TLS"], []),
        ]
        groups = {"front x1": [f.proc.pid for f in fronts[0]], "front x2": [f.proc.pid for f in fronts[1]],
                  "Mosquitto (behind the fronts)": [stack.procs["mosquitto"].proc.pid],
                  "bridge service": [stack.procs["service"].proc.pid], "Mosquitto TLS": [mosq_tls.proc.pid]}
        _run_rounds(designs, groups, n, rounds)
    finally:
        host.stop()
    jwt_ms = _jwt_verify_ms()
    summary = _summarize(designs)
    sync_ms = summary[designs[0].name]["cpu_ms"]["bridge service"]
    estimate = summary[designs[2].name]["host_ms"] + jwt_ms + sync_ms
    print(f"  ES256 JWT verification (the front's verify_jwt, cryptography/OpenSSL, this process): {jwt_ms:.3f} ms "
          f"CPU. Design (3) with a plugin doing what a connect needs (an ESTIMATE, not measured as a whole): "
          f"Mosquitto's TLS {summary[designs[2].name]['host_ms']:.2f} + the JWT {jwt_ms:.2f} + the bridge service's "
          f"config sync as measured in (1) {sync_ms:.2f} = {estimate:.2f} ms per connection (ceiling "
          f"{1000 / estimate:.0f}/s per core), registry reads and presence writes not counted", flush=True)
    print(f"load at end {os.getloadavg()}")
    print(json.dumps({"summary": summary, "jwt_verify_ms": jwt_ms, "runs": {d.name: d.runs for d in designs}}))


def connrate_plugin(n: int, rounds: int, hold: int) -> None:
    """See the module docstring: the front against Mosquitto terminating TLS with the auth plugin."""
    import json

    from bench import mosquitto_auth
    from iotbridge.bridge.authd import load_devices

    out = local.workdir() / "mosquitto-auth-plugin"
    product, openssl = mosquitto_auth.build_product(out), mosquitto_auth.build(out)
    shared = max(n, hold + MEM_WARMUP)  # the plugin designs' devices, the same in every round
    host, devices = _connrate_host(n * rounds + shared)
    stack, ctx, settings = host.stack, host.ctx, host.stack.settings
    front_devices, plugin_devices = devices[:n * rounds], devices[n * rounds:]
    prefix = mosquitto_auth.client_id_prefix(local.PROJECT, local.REGION, local.REGISTRY)
    wd = stack.workdir / "plugin"
    try:
        stack.start_mosquitto()
        stack.start_service()
        front = host.front("front-x1", 1)[0]
        mosq_tls = host.anonymous_tls()
        mosquitto_auth.write_keys(load_devices(Registry(local.PROJECT, local.REGISTRY, local.REGION)), wd / "keys")

        def plugin_broker(variant: str, name: str) -> tuple[services.Service, services.Service | None]:
            """A Mosquitto of its own with a plugin: ``variant`` product (with its auth daemon) or ``openssl``."""
            port = services.free_port()
            if variant == "product":
                daemon, svc = mosquitto_auth.start_product(settings, product, port, wd / name, stack.env)
                host.parts += [svc, daemon]
                return svc, daemon
            conf = mosquitto_auth.listener_conf(port, settings.tls_cert, settings.tls_key, openssl, prefix,
                                                keydir=wd / "keys", audience=local.PROJECT)
            svc = mosquitto_auth.start_broker(conf, port, wd / name)
            host.parts.append(svc)
            return svc, None

        plugins = {variant: plugin_broker(variant, f"mosquitto-{variant}") for variant in ("product", "openssl")}
        same = [plugin_devices[:n]] * rounds
        behind = ["Mosquitto (behind the front)", "bridge service"]
        designs = [
            Design("(1) front, 1 process", front.port, ctx, ["front", *behind],
                   [front_devices[i * n:(i + 1) * n] for i in range(rounds)]),
            Design("(3) Mosquitto terminating TLS, no authentication", mosq_tls.port, ctx, ["Mosquitto TLS"], []),
            Design("(4a) device_auth mosquitto: the plugin + the auth daemon (the product)", plugins["product"][0].port,
                   ctx, ["Mosquitto plugin (4a)", "auth daemon (4a)", "bridge service"], same),
            Design("(4c) Mosquitto + plugin checking the JWT with OpenSSL (bench prototype)",
                   plugins["openssl"][0].port, ctx, ["Mosquitto plugin (4c)"], same),
        ]
        product_daemon = plugins["product"][1]
        assert product_daemon is not None
        groups = {"front": [front.proc.pid], "Mosquitto (behind the front)": [stack.procs["mosquitto"].proc.pid],
                  "bridge service": [stack.procs["service"].proc.pid], "Mosquitto TLS": [mosq_tls.proc.pid],
                  "Mosquitto plugin (4a)": [plugins["product"][0].proc.pid],
                  "Mosquitto plugin (4c)": [plugins["openssl"][0].proc.pid],
                  "auth daemon (4a)": [product_daemon.proc.pid]}
        _run_rounds(designs, groups, n, rounds)
        summary = _summarize(designs)
        # Memory on fresh Mosquitto processes (one that held the rounds' connections reuses their freed memory),
        # as mosquitto-tls: HOLD connections after 200.
        tokens = [(d, create_jwt(local.PROJECT, k, "ES256", lifetime_s=3600))
                  for d, k in plugin_devices[:hold + MEM_WARMUP]]
        memory = {}
        for name, variant in (("(3) no authentication", None), ("(4a) product", "product"),
                              ("(4c) OpenSSL", "openssl")):
            mosq, daemon = plugin_broker(variant, f"mem-{variant}") if variant else (host.anonymous_tls(), None)
            pids = [mosq.proc.pid, *([daemon.proc.pid] if daemon is not None else [])]
            held, grown, errors = asyncio.run(_mosquitto_fleet(mosq.port, hold, ctx, pids, tokens if variant else None))
            mosq.stop()
            if daemon is not None:
                daemon.stop()
            memory[name] = {"held": held, "rss_growth_kib": grown, "kib_per_connection": round(grown / max(held, 1), 1),
                            "errors": errors}
            print(f"idle connections, fresh Mosquitto, {name}: {held} of {hold} held; Mosquitto"
                  f"{' + daemon' if daemon is not None else ''} RSS +{grown} KiB = {grown / max(held, 1):.1f} KiB per "
                  f"connection; client errors {errors}", flush=True)
        print(f"auth daemon (4a) RSS {connections.rss_kib(product_daemon.proc.pid)} KiB, with "
              f"{len(devices)} devices' records read at start", flush=True)
    finally:
        host.stop()
    print(f"load at end {os.getloadavg()}")
    print(json.dumps({"summary": summary, "memory": memory, "runs": {d.name: d.runs for d in designs}}))


def authd(n: int) -> None:
    """See the module docstring: the auth daemon's own cost per connection, its checks alone and with presence."""
    from iotbridge.bridge.authd import AuthDaemon
    from iotbridge.bridge.plugin import client_id_prefix

    _env, _prefix, devices = _prepare(n, local.workdir(), "ba")
    settings = BridgeSettings(local.PROJECT, local.REGION, local.REGISTRY, "ba", auth_failure_burst=n + 1)
    daemon = AuthDaemon(settings, Registry(local.PROJECT, local.REGISTRY, local.REGION))
    prefix = client_id_prefix(settings)
    tokens = [(prefix + d, create_jwt(local.PROJECT, k, "ES256")) for d, k in devices]
    print(f"load at start {os.getloadavg()}", flush=True)

    async def run(admit: bool) -> None:
        await daemon.refresh()
        cpu0 = time.process_time()
        sids: list[int] = []
        for i, (client_id, token) in enumerate(tokens):
            if admit:
                sids.append(int(daemon.authenticate(client_id, "127.0.0.1", token).split()[-1]))
            else:
                daemon.check(client_id, "127.0.0.1", token)
            if i % 64 == 63:  # the presence batches' timers get their turn, as between a daemon's requests
                await asyncio.sleep(0.001)
        for i, sid in enumerate(sids):
            daemon.gone(sid)
            if i % 64 == 63:
                await asyncio.sleep(0.001)
        while daemon._tasks:  # noqa: SLF001 - the bench waits for the presence writes to end
            await asyncio.sleep(0.05)
        what = "admitted and ended (presence written and removed)" if admit else "checks alone"
        print(f"  {n} CONNECTs, {what}: {1000 * (time.process_time() - cpu0) / n:.3f} ms CPU per connection",
              flush=True)

    try:
        for admit in (False, True, False, True):
            asyncio.run(run(admit))
    finally:
        local.stop_all()
    print(f"load at end {os.getloadavg()}")


def syncread(n: int) -> None:
    """See the module docstring: the config sync's registry read per device, one by one and batched."""
    _env, _prefix, devices = _prepare(n, local.workdir(), "bs")
    registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
    ids = [d for d, _ in devices]
    registry.get_config(ids[0])  # the channel is up before anything is timed
    print(f"load at start {os.getloadavg()}", flush=True)
    try:
        for rnd in range(2):
            for batch in (1, 8, 64):
                cpu0, t0 = time.process_time(), time.monotonic()
                for i in range(0, n, batch):
                    if batch == 1:
                        registry.get_config(ids[i])
                    else:
                        registry.get_devices(ids[i:i + batch])
                cpu, took = time.process_time() - cpu0, time.monotonic() - t0
                how = "one get_config per device" if batch == 1 else f"get_devices of {batch}"
                print(f"  round {rnd}, {how}: {1000 * cpu / n:.3f} ms CPU and {1000 * took / n:.3f} ms wall per device",
                      flush=True)
    finally:
        local.stop_all()
    print(f"load at end {os.getloadavg()}")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pyspy":
        pyspy(int(argv[1]), Path(argv[2]))
    elif len(argv) == 4 and argv[0] == "pyspy-plugin":
        pyspy_plugin(int(argv[1]), int(argv[2]), Path(argv[3]))
    elif len(argv) == 3 and argv[0] == "mem":
        mem(int(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "sslobj":
        sslobj(int(argv[1]), argv[2])
    elif len(argv) in (3, 4) and argv[0] == "idle":
        idle(int(argv[1]), float(argv[2]), *argv[3:])
    elif len(argv) == 2 and argv[0] == "authd-map":
        authd_map(int(argv[1]))
    elif len(argv) == 3 and argv[0] == "mosquitto-tls":
        mosquitto_tls(int(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "connrate":
        connrate(int(argv[1]), int(argv[2]))
    elif len(argv) == 4 and argv[0] == "connrate-plugin":
        connrate_plugin(int(argv[1]), int(argv[2]), int(argv[3]))
    elif len(argv) == 2 and argv[0] == "authd":
        authd(int(argv[1]))
    elif len(argv) == 2 and argv[0] == "syncread":
        syncread(int(argv[1]))
    elif len(argv) == 2 and argv[0] == "reuse-front":
        reuse_front(argv[1])
    elif len(argv) == 3 and argv[0] == "traced-front":
        traced_front(argv[1], argv[2])
    elif len(argv) == 3 and argv[0] == "ops":
        ops(argv[1], int(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

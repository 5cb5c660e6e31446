"""Profiles of the TLS front (not a ``make bench`` section; the README's performance notes quote them).

``python -m bench.profile_front pyspy N OUT``: one broker host on the emulators, N registered devices connecting
(64 at a time, as ``bench connections``) while py-spy records the front for 30 s, then 20 s of py-spy with the N
devices idle; prints the connection rate, the front's CPU per connection, its idle CPU and RSS, and leaves the
raw py-spy samples in OUT/connect.txt and OUT/idle.txt. The front's Firestore operations are counted too
(bench/firestore_ops.py): reads and writes per connection, and per idle device-hour over ``IDLE_S`` seconds that
begin ``SETTLE_S`` after the last connect (each device has sent a PINGREQ by then).

``python -m bench.profile_front ops OP N``: N repetitions of one step of a device connect in this process, for
``valgrind --tool=callgrind``: OP ``jwt`` is the front's check of an ES256 device token, ``tls`` one TLS 1.3
handshake (both ends, over a socketpair) with the front's server context. Instructions per operation are the
difference of two runs (N and 0) divided by N, which the shared cores do not disturb.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import connections, firestore_ops, local
from bench.core import group_cpu_seconds
from iotbridge.bridge.auth import verify_jwt
from iotbridge.bridge.front import server_ssl_context
from iotbridge.device import create_jwt, generate_key
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.local.tls import generate_local_tls
from iotbridge.registry import Credential, Registry

SETTLE_S = 60
IDLE_S = 60


def _record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    pyspy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw",
                             "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def _profile(stack: BridgeStack, devices: list[tuple[str, bytes]], out: Path, counts: Path) -> None:
    front = stack.procs["front"].proc.pid
    fleet = connections.Fleet(stack.mqtt_host, stack.mqtt_port, ssl.create_default_context(cafile=str(stack.ca_cert)))
    sem = asyncio.Semaphore(connections.CONCURRENT_CONNECTS)
    tokens = [(d, create_jwt(local.PROJECT, k, "ES256", lifetime_s=3600)) for d, k in devices]

    async def one(device_id: str, token: str) -> None:
        async with sem:
            await fleet.connect(device_id, token)

    rec = _record(front, 30, out / "connect.txt")
    ops0 = firestore_ops.read(counts)
    cpu0, t0 = group_cpu_seconds(front), time.monotonic()
    await asyncio.gather(*(one(d, t) for d, t in tokens))
    took = time.monotonic() - t0
    n = max(1, len(fleet.conns))
    print(f"connected {len(fleet.conns)} in {took:.1f} s = {len(fleet.conns) / took:.0f}/s; front CPU "
          f"{1000 * (group_cpu_seconds(front) - cpu0) / n:.2f} ms per connection; errors {dict(fleet.errors)}",
          flush=True)
    await asyncio.sleep(1)  # the counts are written twice a second
    ops = firestore_ops.read(counts) - ops0
    print(f"Firestore per connection: {ops['reads'] / n:.3f} reads, {ops['writes'] / n:.3f} writes, "
          f"{(ops['lookups'] + ops['queries'] + ops['commits']) / n:.3f} RPCs ({dict(ops)})", flush=True)
    rec.wait()
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


def pyspy(n: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    connections.raise_nofile()
    env = local.emulators()
    prefix = local.new_prefix("bp")
    local.create_topics(local.PROJECT, prefix)
    devices = connections.register_many(Registry(local.PROJECT, local.REGISTRY, local.REGION), n, f"{prefix}-d")
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


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    a, b = socket.socketpair()
    client = threading.Thread(target=lambda: client_ctx.wrap_socket(b, server_hostname="localhost").close())
    client.start()
    server_ctx.wrap_socket(a, server_side=True).close()
    client.join()


def ops(op: str, n: int) -> None:
    if op == "jwt":
        private, public = generate_key("ES256")
        creds = [Credential("ES256_PEM", public)]
        token = create_jwt("bench-project", private, "ES256")
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


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pyspy":
        pyspy(int(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "ops":
        ops(argv[1], int(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

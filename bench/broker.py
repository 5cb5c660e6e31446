"""The raw limits of the broker on this machine, measured in the same run as the bridge figures.

- paho publisher → Mosquitto → paho subscriber, QoS 0 and QoS 1;
- mosquitto_pub → Mosquitto → mosquitto_sub at QoS 1 (the C clients);
- mosquitto_pub ×4 → Mosquitto → one paho subscriber alone at QoS 1;
- the raw limits for the bridge's loads (:func:`c_sub_rate`): the bridge's publishers (the paho load process, or
  mosquitto_pub ×4) → Mosquitto → mosquitto_sub (C, faster than any Python subscriber) at QoS 0 and 1. A paho
  subscriber acknowledging each message as it comes is slower than the bridge service, so the figures above are
  not a limit of the broker; these are.

Same layout and timing as the bridge runs (:mod:`bench.bridge`), so a ratio compares like with like: the
publishers run in processes of their own (the paho publisher is :mod:`bench.loadgen` with ``"raw": true``, the
process the bridge's devices run in) and the subscriber in this process; the payloads are the bridge's
(``loadgen.payload``: device index, sequence number and run tag), so what arrived is counted per (device, seq):
lost and duplicate messages are reported, and the rate is the unique messages that arrived divided by the time
from the first send to the last arrival (a lost message neither stretches nor shortens it). The subscriber only
keeps each payload and its arrival time in the callback and parses them afterwards, so counting does not slow it.

Reproduce: ``.venv/bin/python -m bench broker``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.core import Arrivals, Figure, group_cpu_seconds
from bench.loadgen import payload
from iotbridge.bridge.settings import MAX_INFLIGHT_MESSAGES
from iotbridge.local import services

COMMAND = ".venv/bin/python -m bench broker"
N = 20_000
DEVICES = 10  # paho publisher clients in the one load process, as the bridge's SDK devices
C_PUBLISHERS = 4
STALL_S = 20.0
ROOT = Path(__file__).resolve().parents[1]


def broker_config(port: int, data_dir: Path) -> str:
    # The bridge's Mosquitto window of unacknowledged messages per client, and its TCP_NODELAY: the raw subscriber
    # gets the same as the bridge service does (a smaller window, or Nagle holding the broker's writes to it, would
    # lower the raw limit and flatter the ratios).
    return (
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 1000000\nmax_inflight_messages {MAX_INFLIGHT_MESSAGES}\nlog_dest stderr\n"
        "log_type error\nset_tcp_nodelay true\n"
    )


def _self_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


@dataclass
class Counted:
    """What arrived of one run, counted per (device, seq) as :meth:`bench.bridge.Bench._drain` does."""

    sent: int
    received: int  # unique (dev, seq) of the run
    duplicates: int
    lost: int
    unacked: int  # QoS 1 publishes the publishers never got a PUBACK for (measured by them)
    rate: float  # unique received / (last arrival − first send)
    cpu_note: str
    cpu_ms: float = 0.0  # CPU ms per message of every process of the run, where measured

    def note(self) -> str:
        return (f"{self.received}/{self.sent} arrived, {self.lost} lost, {self.duplicates} duplicates, "
                f"{self.unacked} never PUBACKed to the publisher; {self.cpu_note}")


def count_arrivals(payloads: list[bytes], run: str) -> tuple[set[tuple[int, int]], int]:
    """(unique (dev, seq) of run ``run``, duplicates) among ``payloads``."""
    arrivals = Arrivals(run)
    for data in payloads:
        arrivals.first(data)
    return arrivals.seen, arrivals.dups


def puback_count(debug_output: bytes) -> int:
    """PUBACKs a ``mosquitto_pub -d`` received, from its debug lines."""
    return debug_output.count(b" received PUBACK ")


class RawSubscriber:
    """One paho subscriber in this process; the callback keeps each payload and the time it arrived."""

    def __init__(self, port: int, topic: str, qos: int, client_id: str):
        self.payloads: list[bytes] = []
        self.last_arrival = 0.0
        subscribed = threading.Event()

        def on_message(_c, _u, m):
            self.payloads.append(m.payload)
            self.last_arrival = time.time()

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=qos)
        self.client.loop_start()
        if not subscribed.wait(timeout=10):
            raise RuntimeError("raw subscriber got no SUBACK")

    def wait(self, n: int, stall_s: float = STALL_S) -> None:
        """Until ``n`` messages arrived or none arrived for ``stall_s``."""
        last, last_change = len(self.payloads), time.monotonic()
        while len(self.payloads) < n and time.monotonic() - last_change < stall_s:
            time.sleep(0.05)
            if len(self.payloads) != last:
                last, last_change = len(self.payloads), time.monotonic()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def spawn_loadgen(spec: dict, workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start :mod:`bench.loadgen` on ``spec`` in a process of its own (stdout: its one JSON line)."""
    fd, path = tempfile.mkstemp(suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", path], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})


def loadgen_result(proc: subprocess.Popen[bytes], timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load process exited with {proc.returncode}: "
                           f"{(err or b'').decode(errors='replace')[-500:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def payload_lines(dev: int, per_device: int, run: str) -> bytes:
    """``per_device`` payloads of device ``dev`` for ``mosquitto_pub -l``, one a line."""
    return b"".join(payload(dev, seq, run) + b"\n" for seq in range(per_device))


_runs = 0


def _tag() -> str:
    global _runs
    _runs += 1
    return f"raw{_runs}"


def paho_rate(port: int, qos: int, n: int = N, broker_pid: int = 0) -> Counted:
    """paho publishers (one load process) → Mosquitto → a paho subscriber in this process."""
    run = _tag()
    per_device = n // DEVICES
    sub = RawSubscriber(port, "raw/#", qos, f"raw-sub-{run}")
    with tempfile.TemporaryDirectory() as d:
        cpu0, broker0, children0 = _self_cpu(), group_cpu_seconds(broker_pid) if broker_pid else 0.0, _children_cpu()
        proc = spawn_loadgen({"host": "127.0.0.1", "port": port, "raw": True, "per_device": per_device, "qos": qos,
                              "rate": 0, "run": run, "devices": [[f"raw{i}", ""] for i in range(DEVICES)]}, Path(d))
        try:
            result = loadgen_result(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        sub.wait(per_device * DEVICES)
    sub.close()
    sub_ms = 1000 * (_self_cpu() - cpu0)
    pub_ms = 1000 * (_children_cpu() - children0)
    broker_ms = 1000 * ((group_cpu_seconds(broker_pid) if broker_pid else 0.0) - broker0)
    seen, dups = count_arrivals(sub.payloads, run)
    sent = per_device * DEVICES
    got = max(len(seen), 1)
    return Counted(sent, len(seen), dups, sent - len(seen), result["unacked"],
                   len(seen) / (sub.last_arrival - result["t0"]) if seen else 0.0,
                   f"CPU ms per message: paho publisher {pub_ms / got:.3f}, paho subscriber {sub_ms / got:.3f}, "
                   f"mosquitto {broker_ms / got:.3f}")


def c_publishers(port: int, topic: str, publishers: int, per: int, run: str, workdir: Path,
                 qos: int = 1) -> tuple[float, int]:
    """``publishers`` mosquitto_pub processes (in-flight window 100, as the bridge's C devices), each sending ``per``
    payloads of its own device index to ``{topic}/{i}``; waits for them: (time before the first started, PUBACKs
    they got)."""
    pub_exe = shutil.which("mosquitto_pub")
    if not pub_exe:
        raise RuntimeError("mosquitto-clients not installed")
    # Each publisher reads its payloads from a file of its own, as the bridge's mosquitto_pub devices do: fed
    # through pipes written one after the other, each publisher waited for the one before it to drain its pipe.
    # The debug lines (one per PUBACK) go to files too: pipes read in turn would stall the other publishers.
    logs = [workdir / f"{run}-pub{i}.log" for i in range(publishers)]
    inputs = [workdir / f"{run}-pub{i}.lines" for i in range(publishers)]
    for i, path in enumerate(inputs):
        path.write_bytes(payload_lines(i, per, run))
    t0 = time.time()
    procs = []
    for i, (log, lines) in enumerate(zip(logs, inputs, strict=True)):
        with open(log, "wb") as out, open(lines, "rb") as stdin:
            procs.append(subprocess.Popen(
                [pub_exe, "-h", "127.0.0.1", "-p", str(port), "-t", f"{topic}/{i}", "-q", str(qos), "-l", "-M", "100",
                 "-d", "-i", f"{topic}-pub-{run}-{i}"], stdin=stdin, stdout=out, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(timeout=120)
    return t0, sum(puback_count(log.read_bytes()) for log in logs)


def paho_subscriber_rate(port: int, n: int = N, publishers: int = C_PUBLISHERS) -> Counted:
    """The paho subscriber alone (QoS 1, auto-ack), fed by ``publishers`` mosquitto_pub processes: the limit of
    one Python MQTT subscriber, which is what the bridge service is, without a Python publisher sharing its GIL."""
    run = _tag()
    per = n // publishers
    sub = RawSubscriber(port, "psub/#", 1, f"raw-sub-alone-{run}")
    cpu0 = _self_cpu()
    with tempfile.TemporaryDirectory() as d:
        t0, acked = c_publishers(port, "psub", publishers, per, run, Path(d))
    sub.wait(per * publishers)
    sub.close()
    seen, dups = count_arrivals(sub.payloads, run)
    sent = per * publishers
    sub_ms = 1000 * (_self_cpu() - cpu0) / max(len(seen), 1)
    return Counted(sent, len(seen), dups, sent - len(seen), sent - acked,
                   len(seen) / (sub.last_arrival - t0) if seen else 0.0,
                   f"CPU ms per message: paho subscriber {sub_ms:.3f}")


class CSubscriber:
    """mosquitto_sub (the C client: libmosquitto acknowledges in C, faster than any Python subscriber, so the raw
    figure is a limit of the broker, not of its subscriber), one process, one subscription, as the bridge service
    has. Each arrival is written to a file as ``{unix time} {payload}`` (``-F "%U %p"``); the payloads are counted
    per (device, seq) afterwards."""

    def __init__(self, port: int, topic: str, qos: int, run: str, workdir: Path):
        exe, pub_exe = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
        if not exe or not pub_exe:
            raise RuntimeError("mosquitto-clients not installed")
        self.path = workdir / f"{run}-sub.out"
        base = ["-h", "127.0.0.1", "-p", str(port)]
        ready = f"{topic}/ready-{run}"
        # A retained marker arrives as soon as the subscription is active: the first line means "subscribed".
        subprocess.run([pub_exe, *base, "-t", ready, "-r", "-q", "1", "-m", "ready"], check=True, timeout=10)
        with open(self.path, "wb") as out:
            self.proc = subprocess.Popen([exe, *base, "-t", f"{topic}/#", "-q", str(qos), "-F", "%U %p",
                                          "-i", f"csub-{run}"], stdout=out, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.path.read_bytes().endswith(b"ready\n"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("mosquitto_sub did not subscribe")
            time.sleep(0.02)
        subprocess.run([pub_exe, *base, "-t", ready, "-r", "-q", "1", "-n"], check=True, timeout=10)
        self._lines, self._offset = 0, 0

    def arrived(self) -> int:
        """Lines written so far (the marker included), read on from where the last call stopped."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        self._lines += chunk.count(b"\n")
        return self._lines

    def wait(self, n: int, stall_s: float = STALL_S) -> None:
        """Until ``n`` messages arrived (besides the marker) or none arrived for ``stall_s``."""
        last, last_change = self.arrived(), time.monotonic()
        while last < n + 1 and time.monotonic() - last_change < stall_s:
            time.sleep(0.05)
            now = self.arrived()
            if now != last:
                last, last_change = now, time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def counted(self, run: str) -> tuple[set[tuple[int, int]], int, float]:
        """(unique (dev, seq) of run ``run``, duplicates, the last arrival's time)."""
        return c_arrivals(self.path.read_bytes(), run)


def c_arrivals(out: bytes, run: str) -> tuple[set[tuple[int, int]], int, float]:
    """What a ``mosquitto_sub -F "%U %p"`` wrote: (unique (dev, seq) of run ``run``, duplicates, the time of the
    last arrival of the run)."""
    times: dict[bytes, float] = {}
    payloads = []
    for line in out.splitlines():
        stamp, _, data = line.partition(b" ")
        if data.startswith(b"{"):
            payloads.append(data)
            times[data] = float(stamp)
    seen, dups = count_arrivals(payloads, run)
    last = max((t for d, t in times.items() if b'"run": "%s"' % run.encode() in d), default=0.0)
    return seen, dups, last


def c_sub_rate(port: int, qos: int, c_pubs: int = 0, n: int = N, broker_pid: int = 0) -> Counted:
    """The raw limit for the bridge's loads, with a C subscriber: the publishers of a bridge run (``c_pubs`` = 0:
    the paho devices' load process, ``DEVICES`` clients; else that many mosquitto_pub processes), the same payloads
    and in-flight windows, and mosquitto_sub at ``qos``. Timed as the bridge runs: first send → last arrival.
    ``cpu_ms`` is the CPU all its processes (publishers, Mosquitto, subscriber) spent per message."""
    run = _tag()
    children0, broker0 = _children_cpu(), group_cpu_seconds(broker_pid) if broker_pid else 0.0
    with tempfile.TemporaryDirectory() as d:
        topic = "cpub" if c_pubs else "raw"
        sub = CSubscriber(port, topic, qos, run, Path(d))
        try:
            if c_pubs:
                per = n // c_pubs
                sent = per * c_pubs
                t0, acked = c_publishers(port, topic, c_pubs, per, run, Path(d), qos)
                unacked = sent - acked if qos else 0
            else:
                per = n // DEVICES
                sent = per * DEVICES
                proc = spawn_loadgen({"host": "127.0.0.1", "port": port, "raw": True, "per_device": per, "qos": qos,
                                      "rate": 0, "run": run, "devices": [[f"raw{i}", ""] for i in range(DEVICES)]},
                                     Path(d))
                try:
                    result = loadgen_result(proc)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                t0, unacked = result["t0"], result["unacked"]
            sub.wait(sent)
        finally:
            sub.close()
        seen, dups, last = sub.counted(run)
    # The publishers and mosquitto_sub are reaped children by now; Mosquitto is measured from /proc.
    cpu_s = _children_cpu() - children0 + ((group_cpu_seconds(broker_pid) - broker0) if broker_pid else 0.0)
    cpu_ms = 1000 * cpu_s / max(len(seen), 1)
    return Counted(sent, len(seen), dups, sent - len(seen), unacked, len(seen) / (last - t0) if seen else 0.0,
                   f"subscriber: mosquitto_sub; CPU ms per message, all its processes: {cpu_ms:.3f}", cpu_ms)


def c_client_rate(port: int, n: int = N) -> tuple[float, int]:
    """mosquitto_pub → Mosquitto → mosquitto_sub: (msg/s from the first send to the last arrival, received).
    mosquitto_sub prints each message's arrival time (``-F %U``), so a lost message does not stretch the time."""
    pub_exe, sub_exe = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub_exe or not sub_exe:
        raise RuntimeError("mosquitto-clients not installed")
    base = ["-h", "127.0.0.1", "-p", str(port)]
    # A retained marker arrives as soon as the subscription is active: the first line read means "subscribed".
    subprocess.run([pub_exe, *base, "-t", "craw/ready", "-r", "-q", "1", "-m", "ready"], check=True, timeout=10)
    sub = subprocess.Popen([sub_exe, *base, "-t", "craw/#", "-q", "1", "-C", str(n + 1), "-W", "120",
                            "-F", "%U", "-i", "craw-sub"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert sub.stdout is not None
    if not sub.stdout.readline().strip():
        raise RuntimeError("mosquitto_sub did not subscribe")
    lines = b"".join(PAYLOAD + b"\n" for _ in range(n))
    t0 = time.time()
    subprocess.run([pub_exe, *base, "-t", "craw/x", "-q", "1", "-l", "-i", "craw-pub"],
                   input=lines, check=True, timeout=120)
    out, _ = sub.communicate(timeout=130)
    arrivals = out.split()
    return (len(arrivals) / (float(arrivals[-1]) - t0) if arrivals else 0.0), len(arrivals)


PAYLOAD = b'{"ts": 1764252000123, "metrics": {"temperature": 21.5, "rpm": 1200}, "seq": 42}'

_measured: list[Figure] | None = None


def measured() -> tuple[list[Figure], bool]:
    """The raw figures of this run: (figures, True) when measured now, (figures, False) when already reported."""
    if _measured is not None:
        return _measured, False
    return run(), True


@contextlib.contextmanager
def plain_broker() -> Iterator[tuple[int, int]]:
    """A Mosquitto of the raw figures on a free port: yields (port, pid), stopped on exit."""
    port = services.free_port()
    with tempfile.TemporaryDirectory() as d:
        svc = services.start_mosquitto(broker_config(port, Path(d)), port, Path(d))
        try:
            yield port, svc.proc.pid
        finally:
            svc.stop()


def run() -> list[Figure]:
    global _measured
    with plain_broker() as (port, pid):
        q0 = paho_rate(port, 0, broker_pid=pid)
        q1 = paho_rate(port, 1, broker_pid=pid)
        c1, rc = c_client_rate(port)
        s1 = paho_subscriber_rate(port)
        limits = {(qos, pubs): c_sub_rate(port, qos, pubs, broker_pid=pid)
                  for qos, pubs in ((0, 0), (1, 0), (1, C_PUBLISHERS))}
    load = f"{DEVICES} paho publishers in one load process, the subscriber in another"
    _measured = [
        Figure("broker", "raw paho→Mosquitto→paho QoS 0", round(q0.rate), "msg/s", COMMAND,
               f"{load}; QoS 0 may drop; {q0.note()}", {"lost": q0.lost}),
        Figure("broker", "raw paho→Mosquitto→paho QoS 1", round(q1.rate), "msg/s", COMMAND, f"{load}; {q1.note()}",
               {"lost": q1.lost}),
        Figure("broker", "raw mosquitto_pub→Mosquitto→mosquitto_sub QoS 1", round(c1), "msg/s", COMMAND,
               f"{rc}/{N} received"),
        Figure("broker", "raw mosquitto_pub×4→Mosquitto→paho subscriber QoS 1", round(s1.rate), "msg/s", COMMAND,
               f"the subscriber alone in its process; {s1.note()}", {"lost": s1.lost}),
        *(Figure("broker", f"raw {f'mosquitto_pub×{pubs}' if pubs else 'paho'}→Mosquitto→mosquitto_sub QoS {qos}",
                 round(c.rate), "msg/s", COMMAND, f"the raw limit for the bridge's load of the same publishers; "
                 f"{c.note()}", {"lost": c.lost}) for (qos, pubs), c in limits.items()),
    ]
    return _measured

"""The raw limits of the broker on this machine, measured in the same run as the bridge figures.

- paho publisher → Mosquitto → paho subscriber, QoS 0 and QoS 1 (one Python process each side);
- mosquitto_pub → Mosquitto → mosquitto_sub at QoS 1 (the C clients).

Reproduce: ``.venv/bin/python -m bench broker``.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.core import Figure, group_cpu_seconds
from iotbridge.local import services

COMMAND = ".venv/bin/python -m bench broker"
N = 20_000
PAYLOAD = b'{"ts": 1764252000123, "metrics": {"temperature": 21.5, "rpm": 1200}, "seq": 42}'


def broker_config(port: int, data_dir: Path) -> str:
    return (
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 100\nlog_dest stderr\nlog_type error\n"
    )


def _self_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def paho_rate(port: int, qos: int, n: int = N, broker_pid: int = 0) -> tuple[float, int, str]:
    """Messages/s a paho subscriber receives from a paho publisher; returns (rate, received, CPU note)."""
    received = 0
    first: list[float] = []
    done = threading.Event()

    def on_message(_c, _u, _m):
        nonlocal received
        if not first:
            first.append(time.perf_counter())
        received += 1
        if received >= n:
            done.set()

    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{qos}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("raw/#", qos=qos)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{qos}")
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    if not subscribed.wait(timeout=10):
        raise RuntimeError("raw subscriber got no SUBACK")
    cpu0, broker0 = _self_cpu(), group_cpu_seconds(broker_pid) if broker_pid else 0.0
    t0 = time.perf_counter()
    for i in range(n):
        pub.publish(f"raw/{i % 10}", PAYLOAD, qos=qos)
    done.wait(timeout=120)
    t1 = time.perf_counter()
    clients_ms = 1000 * (_self_cpu() - cpu0) / max(received, 1)
    broker_ms = 1000 * ((group_cpu_seconds(broker_pid) if broker_pid else 0.0) - broker0) / max(received, 1)
    pub.loop_stop()
    sub.loop_stop()
    pub.disconnect()
    sub.disconnect()
    return received / (t1 - t0), received, f"CPU ms per message: paho publisher + subscriber {clients_ms:.3f}, " \
        f"mosquitto {broker_ms:.3f}"


def paho_subscriber_rate(port: int, n: int = N, publishers: int = 4) -> tuple[float, int, str]:
    """The paho subscriber alone (QoS 1, auto-ack), fed by ``publishers`` mosquitto_pub processes: the limit of
    one Python MQTT subscriber, which is what the bridge service is, without a Python publisher sharing its GIL."""
    pub_exe = shutil.which("mosquitto_pub")
    if not pub_exe:
        raise RuntimeError("mosquitto-clients not installed")
    received = 0
    done, subscribed = threading.Event(), threading.Event()

    def on_message(_c, _u, _m):
        nonlocal received
        received += 1
        if received >= n:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-sub-alone")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("psub/#", qos=1)
    sub.loop_start()
    if not subscribed.wait(timeout=10):
        raise RuntimeError("raw subscriber got no SUBACK")
    per = n // publishers
    lines = b"".join(PAYLOAD + b"\n" for _ in range(per))
    cpu0 = _self_cpu()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([pub_exe, "-h", "127.0.0.1", "-p", str(port), "-t", f"psub/{i}", "-q", "1", "-l",
                               "-M", "100", "-i", f"psub-pub-{i}"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(publishers)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(lines)
        p.stdin.close()
    done.wait(timeout=120)
    t1 = time.perf_counter()
    for p in procs:
        p.wait(timeout=30)
    sub_ms = 1000 * (_self_cpu() - cpu0) / max(received, 1)
    sub.loop_stop()
    sub.disconnect()
    return received / (t1 - t0), received, f"CPU ms per message: paho subscriber {sub_ms:.3f}"


def c_client_rate(port: int, n: int = N) -> tuple[float, int]:
    pub_exe, sub_exe = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub_exe or not sub_exe:
        raise RuntimeError("mosquitto-clients not installed")
    base = ["-h", "127.0.0.1", "-p", str(port)]
    # A retained marker arrives as soon as the subscription is active: the first line read means "subscribed".
    subprocess.run([pub_exe, *base, "-t", "craw/ready", "-r", "-q", "1", "-m", "ready"], check=True, timeout=10)
    sub = subprocess.Popen([sub_exe, *base, "-t", "craw/#", "-q", "1", "-C", str(n + 1), "-i", "craw-sub"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != b"ready":
        raise RuntimeError("mosquitto_sub did not subscribe")
    lines = b"".join(PAYLOAD + b"\n" for _ in range(n))
    t0 = time.perf_counter()
    subprocess.run([pub_exe, *base, "-t", "craw/x", "-q", "1", "-l", "-i", "craw-pub"],
                   input=lines, check=True, timeout=120)
    out, _ = sub.communicate(timeout=120)
    t1 = time.perf_counter()
    return n / (t1 - t0), out.count(b"\n")


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
        q0, r0, cpu0 = paho_rate(port, 0, broker_pid=pid)
        q1, r1, cpu1 = paho_rate(port, 1, broker_pid=pid)
        c1, rc = c_client_rate(port)
        s1, rs, cpus = paho_subscriber_rate(port)
    _measured = [
        Figure("broker", "raw paho→Mosquitto→paho QoS 0", round(q0), "msg/s", COMMAND,
               f"{r0}/{N} received (QoS 0 may drop); {cpu0}"),
        Figure("broker", "raw paho→Mosquitto→paho QoS 1", round(q1), "msg/s", COMMAND, f"{r1}/{N} received; {cpu1}"),
        Figure("broker", "raw mosquitto_pub→Mosquitto→mosquitto_sub QoS 1", round(c1), "msg/s", COMMAND,
               f"{rc}/{N} received"),
        Figure("broker", "raw mosquitto_pub×4→Mosquitto→paho subscriber QoS 1", round(s1), "msg/s", COMMAND,
               f"{rs}/{N} received; the subscriber alone in its process; {cpus}"),
    ]
    return _measured

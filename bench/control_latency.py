"""Nagle on a loopback paho client of the broker host (not a ``make bench`` section).

``python -m bench.control_latency [--rate R] [--seconds T] [--rounds K] [--burst B]``: a broker host's Mosquitto
(the generated mosquitto.conf, so with or without its ``set_tcp_nodelay``) and two paho clients on its loopback
listener as the front's control connection is (user ``bridge``, QoS 1): one with ``TCP_NODELAY``
(``iotbridge.bridge.front.no_delay``), one without. Each in turn, K rounds, alternating which goes first, publishes
sync-request-sized messages for T seconds at R a second in bursts of B (B connects at once), on a topic nobody
subscribes to; printed per round and client: the time from the publish call to the broker's PUBACK (p50, p99,
max), and the load average. ``--mosquitto-nagle`` drops ``set_tcp_nodelay true`` from the broker's configuration
(Nagle on the broker's end of the connections: its PUBACKs).

``--forward``: the device → bridge service hop instead, with and without Mosquitto's own ``set_tcp_nodelay`` (two
brokers, the generated configuration without and with the line, taking turns): a publisher as a device session
(user ``front``, QoS 1) at R a second, a subscriber as the bridge service (user ``bridge``, QoS 1, both clients with
``TCP_NODELAY``) that acknowledges what it received every 5 ms, as the service does after a Pub/Sub batch; printed:
the time from the publish call to the subscriber's callback (p50, p99, max).
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.core import summary_ms
from iotbridge.bridge.front import no_delay
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.local import services
from iotbridge.local.broker_host import init_host

TOPIC = "/devices/bench-nobody/config"  # writable by the bridge user; not retained, no subscriber


Client = tuple[paho.Client, dict[int, float], dict[int, float]]  # the client, mid -> publish time, mid -> PUBACK time


def _client(settings: BridgeSettings, password: str, nodelay: bool) -> Client:
    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:bench:nagle-{int(nodelay)}", clean_session=True)
    c.username_pw_set("bridge", password)
    c.max_inflight_messages_set(1000)
    if nodelay:
        c.on_socket_open = no_delay

    def on_publish(client: paho.Client, userdata: object, mid: int, reason_code: object, properties: object) -> None:
        # Only a timestamp: paho calls this holding its own lock, which a publish in the main thread also takes.
        acked[mid] = time.perf_counter()

    c.on_publish = on_publish
    c.connect(settings.broker_host, settings.broker_port)
    c.loop_start()
    return c, sent, acked


def _round(c: paho.Client, sent: dict[int, float], acked: dict[int, float], rate: float, seconds: float,
           burst: int) -> dict[str, float]:
    sent.clear()
    acked.clear()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(burst):
            start = time.perf_counter()
            sent[c.publish(TOPIC, b"dev-0123456789", qos=1).mid] = start
            n += 1
        time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
    deadline = time.monotonic() + 10
    while len(acked) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    if set(acked) != set(sent) or len(sent) != n:
        raise RuntimeError(f"{n - len(acked)} of {n} publishes not acknowledged")
    latencies = [acked[mid] - sent[mid] for mid in sent]
    return {"published": n, **summary_ms(latencies), "max_ms": round(max(latencies) * 1000, 2)}


def _forward_round(settings: BridgeSettings, rate: float, seconds: float) -> dict[str, float]:
    pw = settings.secrets()
    arrivals: list[float] = []
    unacked: list[int] = []
    stop = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="iotbridge:bench:service", clean_session=True,
                      manual_ack=True)
    sub.username_pw_set("bridge", pw["bridge"])
    sub.on_socket_open = no_delay

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        arrivals.append(time.perf_counter() - struct.unpack("d", msg.payload[:8])[0])
        unacked.append(msg.mid)

    def acker() -> None:
        while not stop.wait(0.005):
            while unacked:
                sub.ack(unacked.pop(0), 1)

    sub.on_message = on_message
    sub.connect(settings.broker_host, settings.broker_port)
    sub.subscribe("/devices/+/events", 1)
    sub.loop_start()
    threading.Thread(target=acker, daemon=True).start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-device", clean_session=True)
    pub.username_pw_set("front", pw["front"])
    pub.on_socket_open = no_delay
    pub.max_inflight_messages_set(1000)
    pub.connect(settings.broker_host, settings.broker_port)
    pub.loop_start()
    try:
        time.sleep(1)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            pub.publish("/devices/bench-device/events", struct.pack("d", time.perf_counter()) + bytes(100), qos=1)
            n += 1
            time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
        deadline = time.monotonic() + 10
        while len(arrivals) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(arrivals) != n:
            raise RuntimeError(f"{len(arrivals)} of {n} messages arrived")
        return {"published": n, **summary_ms(arrivals), "max_ms": round(max(arrivals) * 1000, 2)}
    finally:
        stop.set()
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()


def _forward(rate: float, seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="nagle-") as tmp:
        brokers: dict[bool, tuple[BridgeSettings, services.Service]] = {}
        try:
            for nodelay in (False, True):
                where = Path(tmp) / f"nodelay-{nodelay}"
                settings = init_host(where, "bench", "us-central1", "bench", "bench")
                conf = (where / "mosquitto" / "mosquitto.conf").read_text()
                conf = _without_nodelay(conf) + ("set_tcp_nodelay true\n" if nodelay else "")
                brokers[nodelay] = settings, services.start_mosquitto(conf, settings.broker_port,
                                                                      where / "mosquitto")
            for r in range(rounds):
                for nodelay in ((False, True) if r % 2 == 0 else (True, False)):
                    figures = _forward_round(brokers[nodelay][0], rate, seconds)
                    print(json.dumps({"round": r + 1, "mosquitto set_tcp_nodelay": nodelay, **figures,
                                      "load": _load()}), flush=True)
        finally:
            for _, broker in brokers.values():
                broker.stop()


def _without_nodelay(conf: str) -> str:
    return "".join(line for line in conf.splitlines(keepends=True) if not line.startswith("set_tcp_nodelay "))


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.control_latency",
                                 description="Nagle on a loopback paho client of the broker host.")
    ap.add_argument("--rate", type=float, default=500.0, help="publishes a second (default 500)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per client and round (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--burst", type=int, default=1, help="publishes at once (default 1)")
    ap.add_argument("--mosquitto-nagle", action="store_true",
                    help="drop set_tcp_nodelay true from the generated mosquitto.conf")
    ap.add_argument("--forward", action="store_true",
                    help="the device -> bridge service hop, with and without Mosquitto's set_tcp_nodelay")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the brokers are stopped too (finally)
    if args.forward:
        _forward(args.rate, args.seconds, args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="nagle-") as tmp:
        settings = init_host(Path(tmp), "bench", "us-central1", "bench", "bench")
        conf = (Path(tmp) / "mosquitto" / "mosquitto.conf").read_text()
        if args.mosquitto_nagle:
            conf = _without_nodelay(conf)
        broker = services.start_mosquitto(conf, settings.broker_port, Path(tmp) / "mosquitto")
        try:
            password = settings.secrets()["bridge"]
            clients = {name: _client(settings, password, name == "nodelay") for name in ("nodelay", "nagle")}
            time.sleep(1)
            print(json.dumps({"mosquitto set_tcp_nodelay": "set_tcp_nodelay true" in conf, **vars(args)}))
            for r in range(args.rounds):
                order = ["nodelay", "nagle"] if r % 2 == 0 else ["nagle", "nodelay"]
                for name in order:
                    figures = _round(*clients[name], args.rate, args.seconds, args.burst)
                    print(json.dumps({"round": r + 1, "client": name, **figures, "load": _load()}), flush=True)
            for c, _, _ in clients.values():
                c.loop_stop()
                c.disconnect()
        finally:
            broker.stop()


if __name__ == "__main__":
    main()

"""Bridge throughput and latency: authenticated devices → TLS front → Mosquitto → bridge service → Pub/Sub emulator.

Everything is the real thing on loopback: the Pub/Sub and Firestore emulators, one broker host as
``iotbridge.local.broker_host`` starts it (Mosquitto, the front and the bridge service as their own processes),
devices on the device SDK (paho-mqtt over TLS with ES256 JWTs) in a separate load process (:mod:`bench.loadgen`).

- Maximum rate, QoS 0 and QoS 1: ``N`` messages sent as fast as the devices' clients take them; the rate is
  ``N / (last Pub/Sub publish_time − first send)``. Afterwards every message is pulled from a subscription on the
  telemetry topic and checked: lost (a (device, seq) never seen) and duplicates are reported, and a QoS 1 loss
  fails the section. Three loads: the device SDK (paho in one Python process) at QoS 0 and 1, and
  ``mosquitto_pub`` processes acting as IoT Core devices (TLS, client id path, JWT password) at QoS 1. Each is
  measured in ``ROUNDS`` interleaved rounds next to its raw limit (the same publishers on a bare Mosquitto, one
  ``mosquitto_sub`` subscriber) and next to the same bridge with a do-nothing sink in place of Pub/Sub
  (:mod:`bench.sink`); the figures are medians, the ratios the medians of the per-round ratios
  (:mod:`bench.throughput` says why).
- The same with N broker hosts. The bridge service of a host holds one persistent MQTT session
  (``iotbridge:bridge:{host}``) subscribed to every device's topics, so a second service process on the same
  Mosquitto would take over that session or, with another client id, forward every message twice: the unit of
  scale-out is the host (Mosquitto + front + service behind the load balancer). N hosts here share the 2 cores.
- Latency at 50% and 90% of the measured QoS 1 maximum (device SDK): paced open-loop publishers; latency = the
  message's Pub/Sub ``publish_time`` (set by the emulator when it accepted the bridge's publish) − the device's
  send time embedded in the payload. Same machine, same clock. Where the time goes, hop by hop, and the emulator's
  own latency at the same rate: ``python -m bench.profile_latency`` (docs/broker-scaling.md, "Latency").
- Each figure also gives the CPU each process spent per message (from /proc), which says where the 2 cores go.

Reproduce: ``.venv/bin/python -m bench bridge`` (runs the broker section first for the ratios).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from bench import broker, local, throughput
from bench import sink as bench_sink
from bench.core import Arrivals, Figure, group_cpu_seconds, summary_ms
from iotbridge.device import create_jwt
from iotbridge.local.broker_host import BridgeStack, init_host, start_bridge_stack
from iotbridge.registry import Registry

COMMAND = ".venv/bin/python -m bench bridge"
SECTION = "bridge"
N = 20_000
DEVICES = 10
# The host's capacity is measured with a few devices sending as fast as they can, far over the per-device limits
# (100 messages/s, 512 KiB/s): those are lifted here, so the figures are the host's, not the limiter's.
UNLIMITED_MESSAGES_PER_S = 1e9
UNLIMITED_BYTES_PER_S = 1e12
C_DEVICES = 4
PACED_S = 8.0
STALL_S = 20.0
HOSTS = 2
ROUNDS = throughput.ROUNDS
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    qos: int
    sent: int
    received: int  # unique (device, seq) of this run seen on Pub/Sub
    duplicates: int
    lost: int
    unacked: int  # QoS 1 publishes the devices never got a PUBACK for
    rate: float  # msg/s
    latencies: list[float]
    cpu: dict[str, float]  # CPU seconds per role during the run (summed over hosts)

    def cpu_ms(self) -> float:
        """CPU ms per message arrived, every process of the run together."""
        return 1000 * sum(self.cpu.values()) / max(self.received, 1)

    def cpu_note(self) -> str:
        per_k = {role: 1000 * sec / max(self.received, 1) for role, sec in self.cpu.items()}
        return "CPU ms per message: " + ", ".join(f"{role} {ms:.3f}" for role, ms in per_k.items())


class Bench:
    """``hosts`` broker hosts with their devices; ``sink``: each service publishes to :mod:`bench.sink` (a counting
    no-op) instead of Pub/Sub, and what arrived is read from the sink's file instead of a subscription;
    ``host_fields``: more settings for each host (``init_host``'s keyword arguments)."""

    def __init__(self, hosts: int = 1, sink: bool = False, **host_fields: Any):
        self.env = local.emulators()
        self.prefix = local.new_prefix("bs" if sink else "bb")
        self.sink_file = local.workdir() / f"{self.prefix}.sink" if sink else None
        factory = bench_sink.FACTORY if sink else ""
        # The sink's module is the bench's: the repository goes on the path, before whatever the caller put there.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        stack_env = ({**self.env, bench_sink.SINK_ENV: str(self.sink_file), "PYTHONPATH": path} if sink
                     else self.env)
        local.create_topics(local.PROJECT, self.prefix)
        self.registry = Registry(local.PROJECT, local.REGISTRY, local.REGION)
        self.stacks: list[BridgeStack] = []
        try:
            for i in range(hosts):
                wd = local.workdir() / f"{self.prefix}-host{i}"
                init_host(wd, local.PROJECT, local.REGION, local.REGISTRY, self.prefix, host_id=f"h{i}",
                          device_messages_per_s=UNLIMITED_MESSAGES_PER_S, device_bytes_per_s=UNLIMITED_BYTES_PER_S,
                          **{"publisher_factory": factory, **host_fields})
                self.stacks.append(start_bridge_stack(wd, local.PROJECT, local.REGION, local.REGISTRY, self.prefix,
                                                      stack_env))
            self.devices = local.register_devices(self.registry, DEVICES, f"{self.prefix}-d")
            self.subscription = local.create_pull_subscription(local.PROJECT, self.prefix, "telemetry", "count")
        except BaseException:
            self.stop()
            raise
        from google.cloud import pubsub_v1

        self.subscriber = pubsub_v1.SubscriberClient()
        self.runs = 0

    def stop(self) -> None:
        for st in self.stacks:
            st.stop()
        self.stacks = []

    def forwarded(self) -> float:
        return sum(st.service_stats().get("forwarded", 0) for st in self.stacks)

    def _cpu(self) -> dict[str, float]:
        out = {"front": 0.0, "service": 0.0, "mosquitto": 0.0}
        for st in self.stacks:
            for role in out:
                out[role] += group_cpu_seconds(st.procs[role].proc.pid)
        out["pubsub emulator"] = group_cpu_seconds(local.pubsub_pid())
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["devices"] = usage.ru_utime + usage.ru_stime  # the load processes, once reaped
        return out

    def _loadgen(self, stack_devices: list[tuple[BridgeStack, list[tuple[str, bytes]]]], per_device: int, qos: int,
                 rate: float, run: str) -> list[subprocess.Popen[bytes]]:
        return [broker.spawn_loadgen(
            {"host": st.mqtt_host, "port": st.mqtt_port, "ca": str(st.ca_cert), "project": local.PROJECT,
             "region": local.REGION, "registry": local.REGISTRY, "per_device": per_device, "qos": qos,
             "rate": rate / len(stack_devices), "run": run, "devices": [[d, k.decode()] for d, k in devs]},
            local.workdir(), self.env) for st, devs in stack_devices]

    def _c_devices(self, per_device: int, qos: int, run: str, devices: int) -> list[subprocess.Popen[bytes]]:
        """mosquitto_pub as IoT Core devices (TLS, client id path, JWT password): the C client as load."""
        exe = shutil.which("mosquitto_pub")
        if not exe:
            raise RuntimeError("mosquitto_pub not installed (mosquitto-clients)")
        procs = []
        for i, (device_id, key) in enumerate(self.devices[:devices]):
            st = self.stacks[i % len(self.stacks)]
            client_id = (f"projects/{local.PROJECT}/locations/{local.REGION}/registries/{local.REGISTRY}"
                         f"/devices/{device_id}")
            token = create_jwt(local.PROJECT, key, "ES256")
            lines = local.workdir() / f"{run}-{device_id}.lines"
            lines.write_bytes(broker.payload_lines(i, per_device, run))
            procs.append((client_id, device_id, token, st, lines))
        started: list[subprocess.Popen[bytes]] = []
        try:
            for client_id, device_id, token, st, lines in procs:
                # The JWT goes in mosquitto_pub's options file, not on its command line (visible to `ps`).
                conf = local.workdir() / f"{run}-{device_id}-conf"
                conf.mkdir(mode=0o700)
                fd = os.open(conf / "mosquitto_pub", os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"-u unused\n-P {token}\n")
                # -d: a debug line per PUBACK (to a file, read when it is done): the unacked count is measured.
                with open(lines, "rb") as stdin, open(_debug_log(run, device_id), "wb") as out:
                    started.append(subprocess.Popen(
                        [exe, "-h", st.mqtt_host, "-p", str(st.mqtt_port), "--cafile", str(st.ca_cert),
                         "-i", client_id, "-t", f"/devices/{device_id}/events", "-q", str(qos), "-l", "-M", "100",
                         "-d"], stdin=stdin, stdout=out, stderr=subprocess.PIPE,
                        env={**os.environ, "XDG_CONFIG_HOME": str(conf)}))
        except BaseException:
            _kill(started)
            raise
        return started

    def run(self, qos: int, total: int, rate: float = 0.0, c_devices: int = 0) -> Run:
        self.runs += 1
        tag = f"r{self.runs}"
        per_device = total // len(self.devices)
        total = per_device * len(self.devices)
        # Devices split evenly over the hosts, as the load balancer would spread them.
        split = [(st, self.devices[i::len(self.stacks)]) for i, st in enumerate(self.stacks)]
        if c_devices:
            per_device = total // c_devices
            total = per_device * c_devices
        before = self.forwarded()
        cpu0 = self._cpu()
        results = []
        t0 = time.time()
        procs = (self._c_devices(per_device, qos, tag, c_devices) if c_devices
                 else self._loadgen(split, per_device, qos, rate, tag))
        try:
            if c_devices:
                for p in procs:
                    _, err = p.communicate(timeout=600)
                    if p.returncode != 0:
                        raise RuntimeError(f"mosquitto_pub exited with {p.returncode}: "
                                           f"{(err or b'').decode(errors='replace')[-500:]}")
                acked = sum(broker.puback_count(_debug_log(tag, d).read_bytes()) for d, _ in self.devices[:c_devices])
                results.append({"t0": t0, "unacked": total - acked if qos else 0})
            else:
                results.extend(broker.loadgen_result(p) for p in procs)
        finally:
            _kill(procs)
        # Wait until the bridge forwarded everything it got (or stopped making progress), then count on Pub/Sub.
        last, last_change = self.forwarded(), time.monotonic()
        while self.forwarded() - before < total and time.monotonic() - last_change < STALL_S:
            time.sleep(0.25)
            now = self.forwarded()
            if now != last:
                last, last_change = now, time.monotonic()
        cpu1 = self._cpu()
        seen, dups, latencies, last_publish = (bench_sink.read_sink(self.sink_file, tag) if self.sink_file
                                               else self._drain(tag))
        t0 = min(r["t0"] for r in results)
        lost = total - len(seen)
        return Run(qos=qos, sent=total, received=len(seen), duplicates=dups, lost=lost,
                   unacked=sum(r["unacked"] for r in results),
                   rate=len(seen) / (last_publish - t0) if seen else 0.0, latencies=latencies,
                   cpu={k: cpu1[k] - cpu0[k] for k in cpu0})

    def _drain(self, tag: str) -> tuple[set[tuple[int, int]], int, list[float], float]:
        """Pull until the subscription is empty: (unique (dev, seq) of run ``tag``, duplicates, latencies, last
        publish_time)."""
        from google.api_core import exceptions as gexc

        arrivals = Arrivals(tag)
        latencies, last_publish = [], 0.0
        empty = 0
        while empty < 3:
            try:
                resp = self.subscriber.pull(request={"subscription": self.subscription, "max_messages": 1000},
                                            timeout=2.0)
            except gexc.DeadlineExceeded:
                empty += 1
                continue
            msgs = resp.received_messages
            if not msgs:
                empty += 1
                continue
            empty = 0
            self.subscriber.acknowledge(request={"subscription": self.subscription,
                                                 "ack_ids": [m.ack_id for m in msgs]})
            for m in msgs:
                if (body := arrivals.first(m.message.data)) is None:
                    continue
                # The pubsub_v1 types annotate publish_time as a protobuf Timestamp; proto-plus returns a datetime.
                published = cast(datetime, m.message.publish_time).timestamp()
                latencies.append(published - body["sent"])
                last_publish = max(last_publish, published)
        return arrivals.seen, arrivals.dups, latencies, last_publish


def _debug_log(run: str, device_id: str) -> Path:
    return local.workdir() / f"{run}-{device_id}.debug"


def _loss_note(r: Run) -> str:
    return (f"{r.received}/{r.sent} arrived on Pub/Sub, {r.lost} lost, {r.duplicates} duplicates"
            + (f", {r.unacked} never PUBACKed to the device" if r.qos else ""))


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def _figure(name: str, r: Run, load: str) -> Figure:
    return Figure(SECTION, name, round(r.rate), "msg/s", COMMAND, f"device→Pub/Sub, {load}; {_loss_note(r)}; "
                  f"{r.cpu_note()}", {"received": r.received, "lost": r.lost, "duplicates": r.duplicates,
                                      "cpu_s": r.cpu})


def _ratio(name: str, num: float, den: float, extra: str = "") -> Figure:
    return Figure(SECTION, name, round(num / den, 3) if den else None, "ratio", COMMAND,
                  f"{round(num)} / {round(den)} msg/s{extra}")


@dataclass
class Comparison:
    """One load over the rounds: its raw limit, bridge and sink runs."""

    name: str  # the bridge figure's name
    qos: int
    c_devices: int
    raw: list[broker.Counted] = field(default_factory=list)
    bridge: list[Run] = field(default_factory=list)
    sink: list[Run] = field(default_factory=list)


def _throughput_rounds(one: Bench, sink: Bench, port: int, pid: int, rounds: int,
                       loads: list[tuple[float, float, float]]) -> list[Comparison]:
    """``rounds`` rounds; each runs, per load, the raw limit, the bridge and the sink next to each other (see
    :mod:`bench.throughput`); ``loads`` gets the load average at each round's start."""
    comparisons = [Comparison("bridge QoS 0, 1 host", 0, 0), Comparison("bridge QoS 1, 1 host", 1, 0),
                   Comparison("bridge QoS 1, 1 host, C devices", 1, C_DEVICES)]
    for i in range(rounds):
        loads.append(throughput.current_load())
        for c in comparisons:
            throughput.in_turn(i, [lambda c=c: c.raw.append(throughput.raw_limit(port, pid, c.qos, c.c_devices)),
                                   lambda c=c: c.bridge.append(one.run(c.qos, N, c_devices=c.c_devices)),
                                   lambda c=c: c.sink.append(sink.run(c.qos, N, c_devices=c.c_devices))])
            for r in (c.bridge[-1], c.sink[-1]):
                if r.qos and r.lost:
                    raise AssertionError(f"bridge lost {r.lost} QoS 1 messages: {_loss_note(r)}")
    return comparisons


def _throughput_figures(comparisons: list[Comparison], loads: str) -> list[Figure]:
    sdk = f"{DEVICES} devices on the device SDK (paho, TLS, one load process)"
    cload = f"{C_DEVICES} mosquitto_pub devices (TLS, JWT)"
    raw_names = {(0, 0): "raw paho→Mosquitto→mosquitto_sub QoS 0, interleaved",
                 (1, 0): "raw paho→Mosquitto→mosquitto_sub QoS 1, interleaved",
                 (1, C_DEVICES): f"raw mosquitto_pub×{C_DEVICES}→Mosquitto→mosquitto_sub QoS 1, interleaved"}
    short = {(0, 0): "QoS 0, SDK devices", (1, 0): "QoS 1, SDK devices", (1, C_DEVICES): "QoS 1, C devices"}
    figures: list[Figure] = []
    for c in comparisons:
        key = (c.qos, c.c_devices)
        load = cload if c.c_devices else sdk
        bridge_rates = [r.rate for r in c.bridge]
        raw_rates = [r.rate for r in c.raw]
        sink_rates = [r.rate for r in c.sink]
        med = _median_run(c.bridge)
        figures.append(Figure(SECTION, c.name, round(statistics.median(bridge_rates)), "msg/s", COMMAND,
                              f"device→Pub/Sub, {load}; {throughput.spread_text(bridge_rates)}: "
                              f"{', '.join(str(round(x)) for x in bridge_rates)}; the median round: "
                              f"{_loss_note(med)}; {med.cpu_note()}; {loads}",
                              {"received": med.received, "lost": med.lost, "duplicates": med.duplicates,
                               "cpu_s": med.cpu, "rates": [round(x) for x in bridge_rates]}))
        raw_lost = ", ".join(f"{r.lost}/{r.unacked}" for r in c.raw)
        figures.append(throughput.rate_figure(
            SECTION, COMMAND, raw_names[key], raw_rates,
            f"the same publishers, payloads and QoS as the bridge run, one mosquitto_sub subscriber on a bare "
            f"Mosquitto; lost/unacked per round: {raw_lost}"))
        smed = _median_run(c.sink)
        figures.append(throughput.rate_figure(
            SECTION, COMMAND, f"{c.name}, do-nothing sink", sink_rates,
            f"the bridge run with the service's Pub/Sub publish replaced by a counting no-op (bench/sink.py); the "
            f"median round: {_loss_note(smed)}; {smed.cpu_note()}"))
        pair = throughput.Pair(raw_rates, bridge_rates)
        figures += [
            throughput.ratio_figure(SECTION, COMMAND, f"ratio bridge/raw limit {short[key]}", pair,
                                    f"bridge / {raw_names[key]}"),
            throughput.ratio_figure(SECTION, COMMAND, f"ratio sink/raw limit {short[key]}",
                                    throughput.Pair(raw_rates, sink_rates),
                                    "devices + front + Mosquitto + service without Pub/Sub / the raw limit"),
            throughput.ratio_figure(SECTION, COMMAND, f"ratio bridge/sink {short[key]}",
                                    throughput.Pair(sink_rates, bridge_rates),
                                    "what the Pub/Sub client and the emulator leave of the sink's rate"),
            # On 2 shared cores a rate ratio tends to the inverse of this once every process waits for a core; it
            # does not depend on how the cores were shared out during each run.
            throughput.ratio_figure(SECTION, COMMAND, f"CPU per message bridge/raw limit {short[key]}",
                                    throughput.Pair([r.cpu_ms for r in c.raw], [r.cpu_ms() for r in c.bridge]),
                                    "CPU ms per message of every process of the run (devices, front, Mosquitto, "
                                    "service, Pub/Sub emulator) / of the raw run (publishers, Mosquitto, "
                                    "mosquitto_sub)", digits=3),
            throughput.ratio_figure(SECTION, COMMAND, f"CPU per message sink/raw limit {short[key]}",
                                    throughput.Pair([r.cpu_ms for r in c.raw], [r.cpu_ms() for r in c.sink]),
                                    "the same with the do-nothing sink in place of Pub/Sub", digits=3),
        ]
    return figures


def run() -> list[Figure]:
    raw_figures, fresh = broker.measured()
    # Run alone, the section reports the raw limits of the broker section too.
    figures: list[Figure] = list(raw_figures) if fresh else []
    sdk = f"{DEVICES} devices on the device SDK (paho, TLS, one load process)"
    cload = f"{C_DEVICES} mosquitto_pub devices (TLS, JWT)"
    one = Bench(hosts=1)
    sink = None
    try:
        sink = Bench(hosts=1, sink=True)
        # Warm-up: TLS sessions, JWT checks, Pub/Sub channels and the device cache are not the subject.
        one.run(1, 1000)
        sink.run(1, 1000)
        loads: list[tuple[float, float, float]] = []
        with broker.plain_broker() as (port, pid):
            comparisons = _throughput_rounds(one, sink, port, pid, ROUNDS, loads)
        figures += _throughput_figures(comparisons, throughput.load_text(loads))
        q1 = _median_run(comparisons[1].bridge)
        c1 = _median_run(comparisons[2].bridge)
        paced = {share: one.run(1, int(q1.rate * share * PACED_S), rate=q1.rate * share) for share in (0.5, 0.9)}
        # A message that never arrives has no latency: it would drop out of p99 unseen. A loss fails the section.
        for share, r in paced.items():
            if r.lost:
                raise AssertionError(f"bridge lost {r.lost} QoS 1 messages paced at {share:.0%} of max: "
                                     f"{_loss_note(r)}")
    finally:
        one.stop()
        if sink is not None:
            sink.stop()
    for share, r in paced.items():
        s = summary_ms(r.latencies)
        pct = int(share * 100)
        note = f"paced at {r.sent / PACED_S:.0f} msg/s for {PACED_S:.0f} s, {sdk}; {_loss_note(r)}"
        figures += [
            Figure(SECTION, f"latency p50 QoS 1 at {pct}% of max", s["p50_ms"], "ms", COMMAND, note, s),
            Figure(SECTION, f"latency p99 QoS 1 at {pct}% of max", s["p99_ms"], "ms", COMMAND, note, s),
        ]
    multi = Bench(hosts=HOSTS)
    try:
        multi.run(1, 1000)
        cn = multi.run(1, N, c_devices=C_DEVICES)
    finally:
        multi.stop()
    if cn.lost:
        raise AssertionError(f"bridge lost {cn.lost} QoS 1 messages with {HOSTS} hosts: {_loss_note(cn)}")
    figures += [
        _figure(f"bridge QoS 1, {HOSTS} hosts, C devices", cn,
                f"{HOSTS} × (Mosquitto + front + service) on the same 2 cores, {cload} split over them"),
        _ratio(f"ratio {HOSTS} hosts/1 host QoS 1", cn.rate, c1.rate),
    ]
    return figures

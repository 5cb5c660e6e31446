"""Where the device→Pub/Sub latency goes (not a ``make bench`` section; the docs quote it).

``python -m bench.profile_latency [--rounds K] [--share S] [--seconds T] [--throughput] [--variant ...]``: broker
hosts on the emulators, as ``bench bridge`` starts them, whose bridge services are timed from the inside: the
publisher factory (:func:`instrumented_publisher`: a plain ``PublisherClient``; :func:`instrumented_sink`: the
bench's do-nothing sink, :mod:`bench.sink`) wraps the service's MQTT message callback, the batcher and the publish
call to time every message's hops inside the service; a ``sitecustomize`` on the host processes' path times the
front's writes to Mosquitto and every process's GC pauses (:data:`SITECUSTOMIZE`). Two hosts: ``bridge`` publishes
to the Pub/Sub emulator, ``sink`` to the sink. The QoS 1 maximum of each is measured (as ``bench bridge``, three
runs each, interleaved), then K rounds of these configurations, taking turns going first:

- ``sink``: devices on the device SDK paced at S × the sink host's maximum for T seconds: the bridge's own latency,
  without the Pub/Sub client's RPC and the emulator. Per message: device send → the front writes it on to
  Mosquitto (device SDK in the load process, TLS, the front) → the service's MQTT callback (Mosquitto, paho) → the
  batch handed to the RPC pool (the service's batching) → an RPC thread picks it up → the publish call returns.
  ``e2e_ms``: the time the sink was called − the send time (the service hands the batch over);
  ``send_to_call_return_ms``: to the call's return. For the slowest 1 % of messages the mean of each hop says
  where the tail comes from. The service's and the front's GC pauses are counted (wall and CPU time, per
  generation).
- ``mqtt floor, paho publishers``: the machine's MQTT at the sink's rate: the devices' paho load process with plain
  clients (no TLS, no JWT) → a bare Mosquitto → ``mosquitto_sub`` (C), which stamps each arrival; what MQTT alone
  costs here with the devices' publishers. ``mqtt floor, C publishers``: the same with paced ``mosquitto_pub``
  processes as publishers: no Python on the path.
- ``bridge``: the same at S × the Pub/Sub host's maximum (``bench bridge``'s latency run); ``e2e_ms`` is the
  message's Pub/Sub ``publish_time`` − its send time.
- ``emulator floor``: the emulator alone at the bridge's rate: a plain ``google-cloud-pubsub`` publisher (batch
  latency 5 ms, as the bridge's batcher) in a process of its own publishing the same payloads; latency =
  ``publish_time`` − send time. Whatever the bridge adds sits on top of this.
- ``sink at the bridge's rate``: the sink host at the bridge's rate, for a comparison at equal load.

A lost message fails the run (it would drop out of p99 unseen). Each round's figures are printed as one JSON line,
with the load average before and after it; at the end, per configuration, the medians over the rounds with their
spread (min, max). With ``--throughput`` each bridge round is followed by the host's QoS 1 and QoS 0 maxima.
``--variant NAME=ENV`` (repeatable) starts one more Pub/Sub host per variant whose processes get the environment
variable(s) ``ENV`` (``K=V,K=V``) — e.g. the old value of a setting — run at the bridge's rate in each round, so a
before/after comparison is interleaved in one run on the shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import broker, local, throughput
from bench.bridge import DEVICES, Bench, N
from bench.core import Arrivals, load_average, percentile
from bench.loadgen import payload
from iotbridge import spec as spec_module

ROOT = Path(__file__).resolve().parents[1]
TRACE_ENV = "IOTBRIDGE_LATENCY_TRACE"  # the folder the hosts' processes write their times to
_PAYLOAD = re.compile(rb'"seq": (\d+), "dev": (\d+), "run": "([^"]+)", "sent": ([0-9.]+)')

NO_FREEZE_ENV = "IOTBRIDGE_PROFILE_NO_GC_FREEZE"
SWITCH_ENV = "IOTBRIDGE_PROFILE_SWITCH_INTERVAL"  # seconds: sys.setswitchinterval in the host's processes
# On the PYTHONPATH of the hosts' processes: each records its GC pauses (start, wall s, CPU s, generation), the
# front the time it writes each device message on to Mosquitto, and when the file dump-PID appears in the trace
# folder, each writes them to gc-PID.json and forwarded-PID.json there (and runs ``hooks``: the service's message
# times), then removes dump-PID. A signal would not do: the kernel hands a process's signal to
# any of its threads, and the service's main thread sleeps in a wait that only its own signals interrupt. With
# NO_FREEZE_ENV set, gc.freeze does nothing (the configuration before the bridge froze its startup objects, for an
# interleaved before/after comparison).
SITECUSTOMIZE = '''"""Written by bench.profile_latency for its broker hosts' processes."""
import gc, json, os, re, sys, threading, time
hooks = []
if os.environ.get("NO_FREEZE_ENV"):
    gc.freeze = lambda: None
if os.environ.get("SWITCH_ENV"):
    sys.setswitchinterval(float(os.environ["SWITCH_ENV"]))
_folder = os.environ.get("TRACE_ENV")
if _folder:
    _pauses, _started, _forwarded = [], {}, []

    def _on_gc(phase, info):
        g = info["generation"]
        if phase == "start":
            _started[g] = (time.perf_counter(), time.thread_time())
        elif g in _started:
            t0, c0 = _started.pop(g)
            wall = time.perf_counter() - t0
            _pauses.append((time.time() - wall, wall, time.thread_time() - c0, g))

    def _time_front():
        # The front's one write towards Mosquitto per socket read (a module function its relay looks up per call).
        front = sys.modules.get("iotbridge.bridge.front")
        if (front is None or hasattr(front, "profiled_forward")
                or getattr(front.__spec__, "_initializing", True)):  # not (fully) imported yet
            return
        forward = front.profiled_forward = front._forward

        async def timed_forward(writer, data):
            _forwarded.append((time.time(), data))
            await forward(writer, data)

        front._forward = timed_forward

    def _write(name, value):
        path = os.path.join(_folder, "%s-%d.json" % (name, os.getpid()))
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.rename(path + ".tmp", path)

    def _poll():
        request = os.path.join(_folder, "dump-%d" % os.getpid())
        while True:
            time.sleep(0.1)
            _time_front()
            if not os.path.exists(request):
                continue
            for hook in hooks:
                hook()
            out, _pauses[:] = list(_pauses), []
            forwarded, _forwarded[:] = list(_forwarded), []
            keys = {}
            for t, data in forwarded:
                for m in re.finditer(rb'PAYLOAD_RE', data):
                    keys["%s/%s/%s" % (m[3].decode(), m[2].decode(), m[1].decode())] = t
            _write("forwarded", keys)
            _write("gc", out)
            os.remove(request)

    gc.callbacks.append(_on_gc)
    threading.Thread(target=_poll, name="profile-dump", daemon=True).start()
'''.replace("NO_FREEZE_ENV", NO_FREEZE_ENV).replace("TRACE_ENV", TRACE_ENV)
SITECUSTOMIZE = SITECUSTOMIZE.replace("SWITCH_ENV", SWITCH_ENV)
SITECUSTOMIZE = SITECUSTOMIZE.replace("PAYLOAD_RE", _PAYLOAD.pattern.decode())

# --------------------------------------------------------------------------------- inside the service process

_recv: list[tuple[float, bytes]] = []
_batches: list[tuple[float, float, float, float, list[bytes]]] = []
_local = threading.local()


_instrumented = False


def _instrument() -> None:
    """Wrap timing around the service's MQTT callback, the batcher's hand-over to its RPC pool and the publish call
    (once per process); the times are written with the GC pauses."""
    global _instrumented
    if _instrumented:
        return
    _instrumented = True
    from iotbridge.bridge import batching, service

    on_message = service.BridgeService._on_message

    def timed_on_message(self: Any, client: Any, userdata: Any, msg: Any) -> None:  # noqa: ANN401
        _recv.append((time.time(), msg.payload))
        on_message(self, client, userdata, msg)

    send, send_now = batching.Batcher.send, batching.Batcher._send

    def timed_send(self: batching.Batcher, batch: batching.Batch) -> None:
        setattr(batch, "t_submit", time.time())  # noqa: B010 - a field the class does not have
        send(self, batch)

    def timed_send_now(self: batching.Batcher, batch: batching.Batch) -> None:
        _local.batch, _local.t_pick = batch, time.time()
        send_now(self, batch)

    init = batching.Batcher.__init__

    def timed_init(self: batching.Batcher, publish: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        def timed_publish(request: Any, timeout: float) -> Any:  # noqa: ANN401
            t0 = time.time()
            out = publish(request=request, timeout=timeout)
            t1 = time.time()
            batch = _local.batch
            _batches.append((getattr(batch, "t_submit", 0.0), _local.t_pick, t0, t1,
                             [m.data for m in batch.messages]))
            return out

        init(self, timed_publish, *args, **kwargs)

    service.BridgeService._on_message = timed_on_message
    batching.Batcher.send = timed_send
    batching.Batcher._send = timed_send_now
    batching.Batcher.__init__ = timed_init

    import sitecustomize  # the one SITECUSTOMIZE wrote  # pyright: ignore[reportMissingImports]

    sitecustomize.hooks.append(lambda: _dump(Path(os.environ[TRACE_ENV])))


def instrumented_publisher() -> Any:  # noqa: ANN401 - a PublisherClient
    """``publisher_factory`` for the bridge service: the service's own publisher, timed (:func:`_instrument`)."""
    from google.cloud import pubsub_v1

    _instrument()
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.005))


def instrumented_sink() -> Any:  # noqa: ANN401 - a SinkPublisher
    """``publisher_factory`` for the bridge service: :mod:`bench.sink` in place of Pub/Sub, timed the same way."""
    from bench import sink

    _instrument()
    return sink.make_publisher()


def _dump(folder: Path) -> None:
    recv, batches = list(_recv), list(_batches)
    _recv.clear()
    _batches.clear()
    out: dict[str, Any] = {"recv": {}, "batch": {}}
    for t, data in recv:
        m = _PAYLOAD.search(data)
        if m:
            out["recv"][f"{m[3].decode()}/{m[2].decode()}/{m[1].decode()}"] = [float(m[4]), t]
    for t_submit, t_pick, t0, t1, messages in batches:
        for data in messages:
            m = _PAYLOAD.search(data)
            if m:
                out["batch"][f"{m[3].decode()}/{m[2].decode()}/{m[1].decode()}"] = [t_submit, t_pick, t0, t1,
                                                                                    len(messages)]
    tmp = folder / "trace.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(folder / "trace.json")


# --------------------------------------------------------------------------------- the profiling process

def _trace(bench: Bench, folder: Path) -> dict[str, Any]:
    """The service's message times since the last call, and the GC pauses of the service and the front."""
    pids = {role: bench.stacks[0].procs[role].proc.pid for role in ("service", "front")}
    files = {"trace": folder / "trace.json", "forwarded": folder / f"forwarded-{pids['front']}.json",
             **{role: folder / f"gc-{pid}.json" for role, pid in pids.items()}}
    for f in files.values():
        f.unlink(missing_ok=True)
    for pid in pids.values():
        (folder / f"dump-{pid}").touch()
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in files.values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no trace within 60 s: {[str(f) for f in files.values() if not f.exists()]}")
        time.sleep(0.1)
    out = json.loads(files["trace"].read_text())
    out["gc"] = json.loads(files["service"].read_text())
    out["front_gc"] = json.loads(files["front"].read_text())
    out["forwarded"] = json.loads(files["forwarded"].read_text())
    return out


def _gc_summary(pauses: list[list[float]]) -> dict[str, dict[str, float]]:
    return {f"gen{g}": {"count": len(ps), "max_wall_ms": round(max(p[1] for p in ps) * 1000, 2),
                        "max_cpu_ms": round(max(p[2] for p in ps) * 1000, 2),
                        "total_cpu_ms": round(sum(p[2] for p in ps) * 1000, 2)}
            for g in range(3) if (ps := [p for p in pauses if p[3] == g])}


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5) * 1000, 2), "p99": round(percentile(values, 0.99) * 1000, 2),
            "p99.9": round(percentile(values, 0.999) * 1000, 2),
            "max": round(max(values) * 1000, 2) if values else float("nan")}


HOPS = ("device→front forward", "front→service", "batching", "pool pickup", "publish call")


def group_sched(pgid: int) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a CPU) of every thread of every live process in process group
    ``pgid``, from /proc/PID/task/TID/schedstat: what a process lost to the other processes on the cores."""
    cpu = wait = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            for task in os.scandir(f"/proc/{entry.name}/task"):
                with open(f"{task.path}/schedstat") as f:
                    run_ns, wait_ns, _ = f.read().split()
                cpu, wait = cpu + int(run_ns), wait + int(wait_ns)
        except OSError:
            continue
    return cpu / 1e9, wait / 1e9


def _sched(bench: Bench) -> dict[str, tuple[float, float]]:
    return {role: group_sched(bench.stacks[0].procs[role].proc.pid) for role in ("front", "service", "mosquitto")}


def bridge_round(bench: Bench, folder: Path, rate: float, seconds: float) -> dict[str, Any]:
    """One paced run on ``bench``'s host: ``e2e_ms`` is the message's Pub/Sub ``publish_time`` − its send time, or
    with the sink the time the sink's publish was called − its send time; ``send_to_call_return_ms`` to the
    return of the publish call (the emulator's answer, or the sink's write)."""
    load0 = load_average()
    sched0 = _sched(bench)
    r = bench.run(1, int(rate * seconds), rate=rate)
    sched = {role: (cpu - sched0[role][0], wait - sched0[role][1]) for role, (cpu, wait) in _sched(bench).items()}
    trace = _trace(bench, folder)
    tag = f"r{bench.runs}"
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    e2e: list[tuple[float, list[float]]] = []
    sizes = []
    for key, (sent, recv) in trace["recv"].items():
        if not key.startswith(tag + "/") or key not in trace["batch"] or key not in trace["forwarded"]:
            continue
        t_submit, t_pick, t0, t1, size = trace["batch"][key]
        forwarded = trace["forwarded"][key]
        parts = [forwarded - sent, recv - forwarded, t_submit - recv, t_pick - t_submit, t1 - t_pick]
        for h, v in zip(HOPS, parts, strict=False):
            hops[h].append(v)
        e2e.append((t1 - sent, [*parts, recv, t1]))
        sizes.append(size)
    e2e.sort(key=lambda x: x[0])
    tail = e2e[int(len(e2e) * 0.99):]
    pauses = trace["gc"]
    # The slowest messages that were in the service (received, not yet sent) while a collection ran.
    in_gc = sum(1 for _, p in tail if any(start < p[6] and start + wall > p[5] for start, wall, _, _ in pauses
                                          if wall > 0.005))
    return {
        "rate": round(rate), "sent": r.sent, "lost": r.lost, "duplicates": r.duplicates,
        "traced": len(e2e), "load_before": load0, "load_after": load_average(),
        "e2e_ms": _ms(r.latencies),
        "send_to_call_return_ms": _ms([x for x, _ in e2e]),
        "hops_ms": {h: _ms(v) for h, v in hops.items() if v},
        "slowest_1pct_mean_hop_ms": {h: round(statistics.fmean(p[i] for _, p in tail) * 1000, 2)
                                     for i, h in enumerate(HOPS)} if tail else {},
        "batch_size_median": statistics.median(sizes) if sizes else 0,
        "service_gc": _gc_summary(pauses), "front_gc": _gc_summary(trace["front_gc"]),
        "slowest_1pct_during_gc_over_5ms": f"{in_gc}/{len(tail)}",
        "cpu_s": {k: round(v, 2) for k, v in r.cpu.items()},
        # Per process, its threads' time runnable but not running (waiting for one of the shared cores), summed,
        # and the CPU time they ran: a wait far over the CPU time is the machine, not the process's own work.
        "runqueue_wait_s": {role: round(wait, 2) for role, (_, wait) in sched.items()},
        "sched_cpu_s": {role: round(cpu, 2) for role, (cpu, _) in sched.items()},
    }


def mqtt_latencies(out: bytes, run: str) -> tuple[set[tuple[int, int]], int, list[float]]:
    """From what ``mosquitto_sub -F "%U %p"`` wrote: (unique (dev, seq) of run ``run``, duplicates, latency of each
    unique message: its arrival − its send time)."""
    arrivals, latencies = Arrivals(run), []
    for line in out.splitlines():
        stamp, _, data = line.partition(b" ")
        if data.startswith(b"{") and (body := arrivals.first(data)) is not None:
            latencies.append(float(stamp) - body["sent"])
    return arrivals.seen, arrivals.dups, latencies


def _paced_c_publishers(port: int, run: str, rate: float, total: int) -> int:
    """``C_PUBLISHERS`` mosquitto_pub processes (QoS 1, in-flight window 100) fed through pipes by this process on an
    open-loop schedule of ``rate`` msg/s, each payload stamped as it is written: the messages they never got a
    PUBACK for."""
    exe = shutil.which("mosquitto_pub")
    if not exe:
        raise RuntimeError("mosquitto_pub not installed (mosquitto-clients)")
    logs = [local.workdir() / f"{run}-pub{i}.log" for i in range(broker.C_PUBLISHERS)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, log in enumerate(logs):
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [exe, "-h", "127.0.0.1", "-p", str(port), "-t", f"raw/c{i}", "-q", "1", "-l", "-M", "100", "-d",
                     "-i", f"raw-cpub-{run}-{i}"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL))
        interval = 1.0 / rate
        p0 = time.perf_counter()
        for i in range(total):
            delay = p0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pipe = procs[i % len(procs)].stdin
            assert pipe is not None
            pipe.write(payload(i % len(procs), i // len(procs), run) + b"\n")
            pipe.flush()
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return total - sum(broker.puback_count(log.read_bytes()) for log in logs)


def mqtt_round(port: int, run: str, rate: float, seconds: float, c_pubs: bool = False) -> dict[str, Any]:
    """The machine's MQTT floor at the same rate, at QoS 1 → a bare Mosquitto → ``mosquitto_sub`` (C), which writes
    each arrival's time (``-F "%U %p"``); latency = arrival − send. The publishers: the devices' paho load process
    (``DEVICES`` plain clients, no TLS, no JWT, the same payloads and pacing), or with ``c_pubs`` mosquitto_pub
    processes fed by this process (:func:`_paced_c_publishers`): MQTT with no Python on its path."""
    load0 = load_average()
    folder = local.workdir()
    clients = broker.C_PUBLISHERS if c_pubs else DEVICES
    sent = int(rate * seconds) // clients * clients
    sub = broker.CSubscriber(port, "raw", 1, run, folder)
    try:
        if c_pubs:
            unacked = _paced_c_publishers(port, run, rate, sent)
        else:
            proc = broker.spawn_loadgen({"host": "127.0.0.1", "port": port, "raw": True, "per_device": sent // clients,
                                         "qos": 1, "rate": rate, "run": run,
                                         "devices": [[f"raw{i}", ""] for i in range(clients)]}, folder)
            try:
                unacked = broker.loadgen_result(proc)["unacked"]
            finally:
                if proc.poll() is None:
                    proc.kill()
        sub.wait(sent)
    finally:
        sub.close()
    seen, dups, latencies = mqtt_latencies(sub.path.read_bytes(), run)
    return {"rate": round(rate), "sent": sent, "lost": sent - len(seen), "duplicates": dups,
            "unacked": unacked, "load_before": load0, "load_after": load_average(), "e2e_ms": _ms(latencies)}


def floor_round(bench: Bench, rate: float, seconds: float) -> dict[str, Any]:
    bench.runs += 1
    tag = f"r{bench.runs}"
    load0 = load_average()
    spec = local.workdir() / f"{tag}-floor.json"
    total = int(rate * seconds)
    topic = spec_module.topic_name(bench.prefix, "telemetry")
    spec.write_text(json.dumps({"topic": f"projects/{local.PROJECT}/topics/{topic}",
                                "rate": rate, "total": total, "run": tag}))
    proc = subprocess.run([sys.executable, "-m", "bench.profile_latency", "--publish", str(spec)], cwd=ROOT,
                          env={**os.environ, **bench.env}, capture_output=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"floor publisher failed: {proc.stderr.decode(errors='replace')[-500:]}")
    seen, dups, latencies, _ = bench._drain(tag)
    return {"rate": round(rate), "sent": total, "lost": total - len(seen), "duplicates": dups,
            "load_before": load0, "load_after": load_average(), "e2e_ms": _ms(latencies)}


def publish_paced(spec_path: str) -> int:
    """The floor's load: a plain PublisherClient paced like the devices (open loop), same payloads."""
    from google.cloud import pubsub_v1

    spec = json.loads(Path(spec_path).read_text())
    pub = pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.005))
    interval = 1.0 / spec["rate"]
    p0 = time.perf_counter()
    futures = []
    for i in range(spec["total"]):
        delay = p0 + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(pub.publish(spec["topic"], payload(i % DEVICES, i // DEVICES, spec["run"])))
    for f in futures:
        f.result(timeout=120)
    return 0


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)} if values else {}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over its rounds: medians and spread (min, max) of each percentile, of each hop's mean over
    the slowest 1 % (bridge rounds), losses summed, the load average at each round's start."""
    out: dict[str, Any] = {"rounds": len(rounds), "rate": rounds[0]["rate"] if rounds else 0,
                           "lost": sum(r["lost"] for r in rounds),
                           "load_before": [r["load_before"][0] for r in rounds]}
    for key in ("e2e_ms", "send_to_call_return_ms"):
        if rounds and key in rounds[0]:
            out[key] = {q: _spread([r[key][q] for r in rounds]) for q in ("p50", "p99", "p99.9")}
    if rounds and "slowest_1pct_mean_hop_ms" in rounds[0]:
        out["slowest_1pct_mean_hop_ms"] = {h: _spread([r["slowest_1pct_mean_hop_ms"][h] for r in rounds
                                                       if r["slowest_1pct_mean_hop_ms"]]) for h in HOPS}
        out["hop_p50_ms"] = {h: _spread([r["hops_ms"][h]["p50"] for r in rounds if h in r["hops_ms"]])
                             for h in HOPS}
    for key in ("runqueue_wait_s", "sched_cpu_s"):
        if rounds and key in rounds[0]:
            out[key] = {role: _spread([r[key][role] for r in rounds]) for role in rounds[0][key]}
    if rounds and "max_msg_s" in rounds[0]:
        out.update({f"max_{q}_msg_s": statistics.median(r["max_msg_s"][q] for r in rounds) for q in ("qos1", "qos0")})
    return out


def _host(name: str, env: str, factory: str, sink: bool = False) -> tuple[Bench, Path]:
    """A broker host whose service runs ``factory`` and whose processes write their times to a folder of their
    own; ``env``: more environment for its processes (``K=V,K=V``)."""
    folder = local.workdir() / f"trace-{name}"
    folder.mkdir()
    saved = dict(os.environ)
    os.environ[TRACE_ENV] = str(folder)
    os.environ.update(dict(kv.split("=", 1) for kv in env.split(",") if kv))
    try:
        bench = Bench(sink=sink, publisher_factory=factory)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    bench.run(1, 1000)  # warm-up
    _trace(bench, folder)
    return bench, folder


def _maximum(bench: Bench, folder: Path) -> float:
    rate = bench.run(1, N).rate
    _trace(bench, folder)
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--share", type=float, default=0.5,
                        help="of each host's measured QoS 1 maximum (the sink's for the sink and the MQTT floors)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="msg/s for every configuration instead of measuring the maxima")
    parser.add_argument("--variant", action="append", default=[],
                        help=f"NAME=K=V[,K=V]: another host (Pub/Sub) whose processes get this environment; "
                             f"{NO_FREEZE_ENV}=1: without gc.freeze")
    parser.add_argument("--throughput", action="store_true",
                        help="each bridge round also measures the host's QoS 1 and QoS 0 maximum")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, traces)")
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        return publish_paced(args.publish)
    local.emulators()
    site = local.workdir() / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    hosts: dict[str, tuple[Bench, Path]] = {}
    try:
        with broker.plain_broker() as (port, _pid):
            hosts["sink"] = _host("sink", "", "bench.profile_latency:instrumented_sink", sink=True)
            hosts["bridge"] = _host("bridge", "", "bench.profile_latency:instrumented_publisher")
            for name, env in (tuple(v.split("=", 1)) for v in args.variant):
                hosts[name] = _host(name, env, "bench.profile_latency:instrumented_publisher")
            sink_rate = bridge_rate = args.rate
            if not args.rate:
                maxima: dict[str, list[float]] = {"sink": [], "bridge": []}
                for i in range(3):
                    throughput.in_turn(i, [lambda: maxima["sink"].append(_maximum(*hosts["sink"])),
                                           lambda: maxima["bridge"].append(_maximum(*hosts["bridge"]))])
                sink_rate = statistics.median(maxima["sink"]) * args.share
                bridge_rate = statistics.median(maxima["bridge"]) * args.share
                print(json.dumps({"qos1_max_msg_s": {k: [round(x) for x in v] for k, v in maxima.items()},
                                  "paced_msg_s": {"sink, mqtt": round(sink_rate),
                                                  "bridge, floor, sink at the bridge's rate": round(bridge_rate)}}),
                      flush=True)
            results: dict[str, list[dict[str, Any]]] = {}
            mqtt_runs = 0

            def step(config: str, measure: Any) -> None:  # noqa: ANN401 - a callable
                out = {"config": config, **measure()}
                results.setdefault(config, []).append(out)
                print(json.dumps(out), flush=True)
                if out["lost"]:
                    raise AssertionError(f"{config}: {out['lost']} of {out['sent']} messages lost")

            def bridge_step(name: str, rate: float, config: str) -> None:
                bench, folder = hosts[name]

                def measure() -> dict[str, Any]:
                    out = bridge_round(bench, folder, rate, args.seconds)
                    if args.throughput:
                        out["max_msg_s"] = {f"qos{q}": round(bench.run(q, N).rate) for q in (1, 0)}
                        _trace(bench, folder)
                    return out

                step(config, measure)

            def mqtt_step(c_pubs: bool) -> None:
                nonlocal mqtt_runs
                mqtt_runs += 1
                step("mqtt floor, C publishers" if c_pubs else "mqtt floor, paho publishers",
                     lambda: mqtt_round(port, f"mq{mqtt_runs}", sink_rate, args.seconds, c_pubs))

            steps = [lambda: bridge_step("sink", sink_rate, "sink"), lambda: mqtt_step(False),
                     lambda: mqtt_step(True),
                     lambda: bridge_step("bridge", bridge_rate, "bridge"),
                     *(lambda n=n: bridge_step(n, bridge_rate, n) for n in hosts if n not in ("sink", "bridge")),
                     lambda: step("emulator floor", lambda: floor_round(hosts["bridge"][0], bridge_rate,
                                                                        args.seconds))]
            if bridge_rate != sink_rate:
                steps.append(lambda: bridge_step("sink", bridge_rate, "sink at the bridge's rate"))
            for i in range(args.rounds):
                # The configurations take turns going first: the machine's load drifts within a round too.
                for run in steps[i % len(steps):] + steps[:i % len(steps)]:
                    run()
        print(json.dumps({"medians_over_rounds": {k: summarize(v) for k, v in results.items()}}), flush=True)
    finally:
        for bench, _ in hosts.values():
            bench.stop()
        local.stop_all(keep_workdir=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

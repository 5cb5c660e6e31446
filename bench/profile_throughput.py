"""Where the bridge's CPU per message goes at maximum rate (not a ``make bench`` section; the README's performance
notes quote it).

``python -m bench.profile_throughput pyspy OUT``: one broker host on the emulators; py-spy (``--gil``: only the
samples of the thread holding the GIL, i.e. the Python work) records the front and the service during a QoS 1 run
of 60,000 messages from 4 mosquitto_pub devices and one from the 10 SDK devices; prints each run's rate and CPU
per message per process and each profile's top functions (self), and leaves the raw py-spy samples in OUT.

``python -m bench.profile_throughput cpu LABEL``: the service's CPU ms per message over 3 QoS 1 runs of 30,000
messages per load (C devices, SDK devices), once with the do-nothing sink (:mod:`bench.sink`) and once with the
Pub/Sub emulator, printed one line per load as ``LABEL sink|pubsub C|SDK ms ms ms``. An A/B of a change to the
service is this command run on each version in turn (twice each, interleaved): one process's CPU per message
(spread about ±15% here) resolves a change that a whole run's rates (spread ±40%) cannot.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from bench import bridge, local

PYSPY = str(Path(sys.executable).parent / "py-spy")


def top_functions(path: Path, n: int = 15) -> list[tuple[float, str]]:
    """(share of samples, function) of the ``n`` functions most often on top of the stack in a py-spy raw file."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        total += int(count)
        counts[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += int(count)
    return [(c / total, f) for f, c in counts.most_common(n)] if total else []


def pyspy(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bench = bridge.Bench(hosts=1)
    try:
        bench.run(1, 1000)
        for label, c_devices in (("c", bridge.C_DEVICES), ("sdk", 0)):
            spies = [subprocess.Popen(
                [PYSPY, "record", "--pid", str(bench.stacks[0].procs[role].proc.pid), "--rate", "200", "--format",
                 "raw", "--nonblocking", "--gil", "-o", str(out / f"{label}-{role}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role in ("front", "service")]
            time.sleep(1.0)
            r = bench.run(1, 60_000, c_devices=c_devices)
            for spy in spies:
                spy.send_signal(2)
                spy.wait(60)
            print(f"{label}: {r.rate:.0f} msg/s, lost {r.lost}; {r.cpu_note()}", flush=True)
    finally:
        bench.stop()
        local.stop_all()
    for path in sorted(out.glob("*.txt")):
        print(f"== {path.name}")
        for share, function in top_functions(path):
            print(f"{100 * share:5.1f}% {function}")


def service_cpu(label: str) -> None:
    for sink in (True, False):
        bench = bridge.Bench(hosts=1, sink=sink)
        try:
            bench.run(1, 1000)
            for c_devices in (bridge.C_DEVICES, 0):
                cpu = []
                for _ in range(3):
                    r = bench.run(1, 30_000, c_devices=c_devices)
                    cpu.append(1000 * r.cpu["service"] / max(r.received, 1))
                print(label, "sink" if sink else "pubsub", "C" if c_devices else "SDK",
                      " ".join(f"{x:.4f}" for x in cpu), flush=True)
        finally:
            bench.stop()
    local.stop_all()


COMMANDS = {"pyspy": lambda arg: pyspy(Path(arg)), "cpu": service_cpu}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](sys.argv[2])

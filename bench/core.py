"""Figures, timing helpers and the machine description shared by the benchmark modules."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    section: str
    name: str
    value: float | int | None
    unit: str
    command: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on the machine while the bench ran."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    mem_kib = _first("/proc/meminfo", "MemTotal").split()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "memory_gib": round(int(mem_kib[0]) / 1024 / 1024, 1) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_at_start": load_average(),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(latencies_s: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies_s, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies_s, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies_s) * 1000, 2) if latencies_s else float("nan"),
    }


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12)
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


class Arrivals:
    """The load generator's messages of one run (``bench.loadgen.payload``) counted once per (device, sequence
    number), wherever they were read: Pub/Sub, the sink's file, ``mosquitto_sub``'s output."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.seen: set[tuple[int, int]] = set()
        self.dups = 0

    def first(self, data: bytes) -> dict[str, Any] | None:
        """The payload's body the first time its (device, sequence number) of this run arrives; None for another
        run's message or a duplicate (counted in ``dups``)."""
        body = json.loads(data)
        if body.get("run") != self.run:
            return None
        key = (body["dev"], body["seq"])
        if key in self.seen:
            self.dups += 1
            return None
        self.seen.add(key)
        return body


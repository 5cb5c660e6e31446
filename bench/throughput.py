"""The bridge section's throughput figures: raw limits, the bridge, and the bridge with a do-nothing sink, measured
interleaved in one run, and the ratios as the median of the per-round ratios.

Why interleaved medians: the 2 cores are shared, and the machine's load moves absolute rates by 2× between
minutes; a ratio of two runs measured a minute apart says more about the load than about the bridge. Each round
runs every raw limit right next to its bridge counterpart (raw first in even rounds, bridge first in odd ones, so
neither side always gets the warmer or the quieter slot), ``ROUNDS`` rounds; each ratio is bridge / raw within one
round, and the figure is the median of those ratios, with their spread (min–max) and every round's pair in the
note. Medians of the rates are reported too, with the load average at each round's start.

The raw limits are the broker's, for the same message pattern as the bridge run they pair with: the same
publishers (the paho load process with ``DEVICES`` clients, or ``C_DEVICES`` mosquitto_pub processes with an
in-flight window of 100), the same payloads, QoS and broker in-flight window, one subscriber with one
subscription as the bridge service has — but the subscriber is ``mosquitto_sub`` (C), faster than the service, so
the raw figure bounds what the bridge could do (:func:`bench.broker.c_sub_rate`). What the raw side leaves out is
the bridge's own cost: TLS and JWTs in the front, the bridge broker's ACL, dynamic-security plugin and
persistence, the service, the Pub/Sub client and the emulator. The sink runs (:mod:`bench.sink`) split that: the
service with its Pub/Sub publish replaced by a counting no-op, everything else as in the bridge run.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench import broker
from bench.core import Figure

ROUNDS = 5


@dataclass
class Pair:
    """One comparison over the rounds: (raw, bridge) rates per round."""

    raw: list[float] = field(default_factory=list)
    bridge: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [b / r for b, r in zip(self.bridge, self.raw, strict=True) if r]


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max); NaN for no values."""
    if not values:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(values), min(values), max(values)


def spread_text(values: list[float], digits: int = 0) -> str:
    med, lo, hi = median_spread(values)
    fmt = f"{{:.{digits}f}}"
    return f"median {fmt.format(med)}, spread {fmt.format(lo)}–{fmt.format(hi)} over {len(values)} rounds"


def in_turn(round_index: int, steps: Sequence[Callable[[], object]]) -> None:
    """Run ``steps`` in order in even rounds and in reverse in odd ones (each step keeps its own result)."""
    for step in steps if round_index % 2 == 0 else reversed(steps):
        step()


def ratio_figure(section: str, command: str, name: str, pair: Pair, what: str, digits: int = 0) -> Figure:
    """The median of the per-round ratios bridge / raw; ``digits``: of the rounds' values in the note."""
    ratios = pair.ratios()
    med = median_spread(ratios)[0] if ratios else None
    rounds = ", ".join(f"{b:.{digits}f}/{r:.{digits}f}" for b, r in zip(pair.bridge, pair.raw, strict=True))
    return Figure(section, name, round(med, 3) if med is not None else None, "ratio", command,
                  f"{what}; median of the per-round ratios ({spread_text(ratios, 3)}); rounds {rounds}",
                  {"ratios": [round(x, 3) for x in ratios], "raw": [round(x, digits) for x in pair.raw],
                   "bridge": [round(x, digits) for x in pair.bridge]})


def rate_figure(section: str, command: str, name: str, rates: list[float], what: str,
                extra: dict | None = None) -> Figure:
    return Figure(section, name, round(median_spread(rates)[0]), "msg/s", command,
                  f"{what}; {spread_text(rates)}: {', '.join(str(round(x)) for x in rates)}",
                  {"rates": [round(x) for x in rates], **(extra or {})})


def load_text(loads: list[tuple[float, float, float]]) -> str:
    return "load average (1/5/15 min) at each round's start: " + "; ".join(
        "/".join(f"{x:.2f}" for x in la) for la in loads)


def current_load() -> tuple[float, float, float]:
    return os.getloadavg()


def raw_limit(port: int, pid: int, qos: int, c_pubs: int = 0) -> broker.Counted:
    """A raw limit (:func:`bench.broker.c_sub_rate`); a QoS 1 loss fails the section (the limit would be wrong)."""
    got = broker.c_sub_rate(port, qos, c_pubs, broker_pid=pid)
    if qos and got.lost:
        raise AssertionError(f"raw QoS 1 run lost {got.lost} messages: {got.note()}")
    return got

"""Pipeline: CPU per message of the decode → validate → rows path, against ``json.loads`` of the same payloads.

The floor is ``json.loads`` of each payload: no pipeline can accept a JSON message for less. The path is what the
pipeline does per message before any I/O: :func:`dataflow_jobs.telemetry.parse` (UTF-8 + JSON decode, every
check of the telemetry payload, identity from the attributes), then the ``telemetry_raw`` row and the Bigtable cells.
A third figure adds the DoFn wrapper (``ParseTelemetry.process`` on a ``PubsubMessage``, no runner).

CPU time (``time.process_time_ns``) over whole batches, rounds interleaved so that both sides see the same
machine state; the median round is reported. Payloads mimic the simulated fleet: 2 to 8 metrics, epoch-ms and
RFC 3339 timestamps, with and without seq, some extra keys.

Run: ``.venv/bin/python -m bench.pipeline_cost`` (or ``python -m bench pipeline``).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone

from bench.core import Figure

COMMAND = ".venv/bin/python -m bench.pipeline_cost"
MESSAGES = 20_000
ROUNDS = 7


def payloads(n: int, seed: int = 11) -> list[tuple[bytes, dict[str, str]]]:
    rnd = random.Random(seed)
    base_ms = 1_795_000_020_000
    out = []
    for i in range(n):
        device = f"dev-{i % 500:04d}"
        metrics = {"temperature": round(rnd.uniform(15, 35), 2), "rpm": rnd.randrange(800, 1600)}
        for k in range(rnd.choice((0, 0, 2, 6))):
            metrics[f"m{k}"] = round(rnd.uniform(0, 100), 3)
        ms = base_ms + i * 250
        doc: dict = {"ts": ms if i % 2 else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()
                     .replace("+00:00", "Z"), "metrics": metrics}
        if i % 4:
            doc["seq"] = i
        if i % 10 == 0:
            doc["fw"] = "1.4.2"
        attrs = {"deviceId": device, "deviceNumId": str(10_000 + i % 500), "deviceRegistryId": "fleet",
                 "deviceRegistryLocation": "europe-west1", "projectId": "my-project"}
        out.append((json.dumps(doc).encode(), attrs))
    return out


def cpu_us_per_message(fn, items) -> float:
    t0 = time.process_time_ns()
    for item in items:
        fn(item)
    return (time.process_time_ns() - t0) / 1000 / len(items)


def run() -> list[Figure]:
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from dataflow_jobs import telemetry
    from dataflow_jobs.telemetry_pipeline import ParseTelemetry

    msgs = payloads(MESSAGES)
    publish_us = 1_795_000_030_000_000

    def floor(m):
        return json.loads(m[0])

    def path(m):
        r = telemetry.parse(m[0], m[1], "1234567890", publish_us)
        return telemetry.raw_row(r), telemetry.bigtable_cells(r)

    dofn = ParseTelemetry()
    pubsub = [PubsubMessage(d, a, message_id="1234567890",
                            publish_time=datetime.fromtimestamp(publish_us / 1e6, timezone.utc)) for d, a in msgs]

    class _Ts:  # what the runner passes as TimestampParam when the message has a publish time
        micros = publish_us

    def with_dofn(m):
        for out in dofn.process(m, _Ts):
            r = out.value
            telemetry.raw_row(r), telemetry.bigtable_cells(r)

    for fn, items in ((floor, msgs), (path, msgs), (with_dofn, pubsub)):  # warm-up
        cpu_us_per_message(fn, items[:2000])
    rounds: dict[str, list[float]] = {"floor": [], "path": [], "dofn": []}
    for _ in range(ROUNDS):
        rounds["floor"].append(cpu_us_per_message(floor, msgs))
        rounds["path"].append(cpu_us_per_message(path, msgs))
        rounds["dofn"].append(cpu_us_per_message(with_dofn, pubsub))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    sizes = [len(d) for d, _ in msgs]
    note = f"{MESSAGES} payloads, {min(sizes)}-{max(sizes)} B, median of {ROUNDS} interleaved rounds, CPU time"
    return [
        Figure("pipeline", "json.loads (floor)", round(med["floor"], 2), "µs CPU/msg", COMMAND, note),
        Figure("pipeline", "parse+validate+rows", round(med["path"], 2), "µs CPU/msg", COMMAND,
               "telemetry.parse + raw_row + bigtable_cells"),
        Figure("pipeline", "ratio path/floor", round(med["path"] / med["floor"], 2), "x", COMMAND,
               "CPU of the accepted-message path over json.loads of the same payloads"),
        Figure("pipeline", "ParseTelemetry DoFn + rows", round(med["dofn"], 2), "µs CPU/msg", COMMAND,
               "the DoFn's process() on a PubsubMessage (counters, timestamping), no runner",
               extra={"rounds_us": {k: [round(x, 2) for x in v] for k, v in rounds.items()}}),
    ]


def main() -> int:
    for f in run():
        print(f"{f.name:30} {f.value:>8} {f.unit:11} {f.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

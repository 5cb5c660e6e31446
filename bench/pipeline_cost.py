"""Pipeline: CPU per message of the decode → validate → rows path, against ``json.loads`` of the same payloads,
for each payload profile (telemetry-v1, json flat and nested, raw kept and raw through a protobuf decoder).

The floor is the standard library's ``json.loads`` of each payload, and stays it whatever the pipeline decodes with
(msgspec for the common telemetry-v1 shape, orjson for the rest, both faster than ``json.loads``): the cost of
accepting a JSON message in plain Python. The path is what the pipeline does per message before any I/O:
:func:`dataflow_jobs.telemetry.read` with the default profiles (UTF-8 + JSON decode, every check of the telemetry
payload, identity from the attributes), then the ``telemetry_raw`` row and the Bigtable cells. A third figure adds
the DoFn wrapper: ``ParseTelemetry`` over bundles of :data:`BUNDLE` ``PubsubMessage``s (``start_bundle``, ``process``
per message, ``finish_bundle``) with a state sampler and a metrics container current, as the SDK harness runs a step,
so that its Beam counters cost what they cost on a worker. With no state sampler current, as when ``process`` is
called bare, ``inc`` costs five times as much (Beam looks the sampler up through a thread-local whose absence raises
AttributeError: about 0.7 µs per call against 0.15 µs with a sampler). No runner otherwise.

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
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from bench.core import Figure

COMMAND = ".venv/bin/python -m bench.pipeline_cost"
MESSAGES = 20_000
ROUNDS = 7
# Messages per bundle for the DoFn figure. A streaming worker's bundles from Pub/Sub hold what arrived since the last
# one; 100 is a small bundle, so what a DoFn spends per bundle is not hidden.
BUNDLE = 100


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
        doc: dict = {"ts": ms if i % 2 else datetime.fromtimestamp(ms / 1000, UTC).isoformat()
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


def cpu_us_per_message_in_bundles(fn, bundles) -> float:
    t0 = time.process_time_ns()
    for bundle in bundles:
        fn(bundle)
    return (time.process_time_ns() - t0) / 1000 / sum(len(b) for b in bundles)


def worker_step(name: str):
    """A state sampler with ``name``'s metrics container, as the SDK harness sets one up for each step of a bundle:
    (sampler, container, scoped states ``start``, ``process``, ``finish``). Entering a state makes its container the
    one Beam counters update; ``sampler.start()`` makes the sampler current on this thread."""
    from apache_beam.metrics.execution import MetricsContainer
    from apache_beam.runners.worker import statesampler
    from apache_beam.utils.counters import CounterFactory

    sampler = statesampler.StateSampler("bench", CounterFactory())
    container = MetricsContainer(name)
    states = {s: sampler.scoped_state(name, s, metrics_container=container) for s in ("start", "process", "finish")}
    return sampler, container, states


def dofn_bundle_runner(dofn, states, element_ts):
    """One bundle through ``dofn`` as a worker runs it (its bundle methods in their states), each reading then made
    into its rows as the next steps do."""
    from apache_beam.pvalue import TaggedOutput

    from dataflow_jobs import telemetry

    raw_row, bigtable_cells = telemetry.raw_row, telemetry.bigtable_cells

    def run_bundle(bundle) -> None:
        with states["start"]:
            dofn.start_bundle()
        with states["process"]:
            for m in bundle:
                for out in dofn.process(m, element_ts):
                    if not isinstance(out, TaggedOutput):  # a reading, not an error row
                        raw_row(out.value)
                        bigtable_cells(out.value)
        with states["finish"]:
            dofn.finish_bundle()
    return run_bundle


def _readings(msgs: list[tuple[bytes, dict[str, str]]]) -> list[dict[str, Any]]:
    """The fleet's readings as plain JSON objects, the shape every other profile's payload is made from."""
    out = []
    for data, _ in msgs:
        doc = json.loads(data)
        out.append({"metrics": doc["metrics"], "ts_ms": doc["ts"] if isinstance(doc["ts"], int) else None})
    return out


def decode_struct(data: bytes) -> dict[str, Any]:
    """A raw-profile decoder as a protobuf fleet would write one: google.protobuf.Struct bytes -> dict."""
    from google.protobuf import json_format, struct_pb2

    msg = struct_pb2.Struct()
    msg.ParseFromString(data)
    return json_format.MessageToDict(msg)


DECODER = "bench.pipeline_cost:decode_struct"


def profile_sets(msgs: list[tuple[bytes, dict[str, str]]]) -> dict[str, tuple[str, list[tuple[bytes, dict[str, str]]],
                                                                              list[bytes]]]:
    """name -> (profiles JSON, messages, the same readings as JSON text: what json.loads is timed on).

    The same readings in each firmware's encoding: telemetry-v1 as is; flat JSON without a time (read by the
    default list, after telemetry-v1 has looked at it); nested JSON with an RFC 3339 field; protobuf kept as bytes;
    protobuf through a decoder.
    """
    from google.protobuf import struct_pb2

    def struct_bytes(doc: dict[str, Any]) -> bytes:
        msg = struct_pb2.Struct()
        msg.update(doc)
        return msg.SerializeToString()

    base_ms = 1_795_000_020_000
    flat, nested, proto = [], [], []
    for i, ((_, attrs), r) in enumerate(zip(msgs, _readings(msgs), strict=True)):
        ms = r["ts_ms"] or base_ms + i * 250
        at = datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
        flat.append(json.dumps(r["metrics"]).encode())
        motor = {k: v for k, v in r["metrics"].items() if k != "temperature"}
        nested.append(json.dumps({"meta": {"sampled_at": at, "fw": "1.4.2"},
                                  "temperature": r["metrics"]["temperature"], "motor": motor}).encode())
        proto.append(({"at": at, **r["metrics"]}, attrs))
    proto_json = [json.dumps(d).encode() for d, _ in proto]
    proto_bytes = [(struct_bytes(d), a) for d, a in proto]
    attrs_of = [a for _, a in msgs]
    return {
        "telemetry-v1": ('{"default": ["telemetry-v1", "json"]}', msgs, [d for d, _ in msgs]),
        "json flat, publish time": (
            '{"default": ["telemetry-v1", "json"]}', list(zip(flat, attrs_of, strict=True)), flat),
        "json nested, RFC 3339 field": (
            '{"default": [{"profile": "json", "time_field": "meta.sampled_at"}]}',
            list(zip(nested, attrs_of, strict=True)), nested),
        "raw bytes": ('{"default": ["raw"]}', proto_bytes, proto_json),
        "raw + protobuf decoder": (
            json.dumps({"default": [{"profile": "raw", "decoder": DECODER, "time_field": "at"}]}), proto_bytes,
            proto_json),
    }


def run() -> list[Figure]:
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.utils.timestamp import Timestamp

    from dataflow_jobs import telemetry
    from dataflow_jobs.telemetry_pipeline import ParseTelemetry
    from iotbridge import spec

    msgs = payloads(MESSAGES)
    publish_us = 1_795_000_030_000_000
    sets = profile_sets(msgs)

    def floor(data: bytes):
        return json.loads(data)

    def path_of(profiles: tuple[spec.Profile, ...]):
        def path(m):
            r = telemetry.read(m[0], m[1], "1234567890", publish_us, profiles)
            return telemetry.raw_row(r), telemetry.bigtable_cells(r)
        return path

    pubsub = [PubsubMessage(d, a, message_id="1234567890",
                            publish_time=datetime.fromtimestamp(publish_us / 1e6, UTC)) for d, a in msgs]
    bundles = [pubsub[i:i + BUNDLE] for i in range(0, len(pubsub), BUNDLE)]

    element_ts = Timestamp(micros=publish_us)  # what the runner passes as TimestampParam: the publish time
    sampler, _, states = worker_step("Parse")
    sampler.start()
    with_dofn = dofn_bundle_runner(ParseTelemetry(), states, element_ts)

    paths = {name: path_of(spec.parse_payload_profiles(text).default) for name, (text, _, _) in sets.items()}
    decoded_items = sets["raw + protobuf decoder"][1]
    for name, (_, items, texts) in sets.items():  # warm-up
        cpu_us_per_message(floor, texts[:2000])
        cpu_us_per_message(paths[name], items[:2000])
    cpu_us_per_message_in_bundles(with_dofn, bundles[:20])
    rounds: dict[str, list[float]] = defaultdict(list)
    for _ in range(ROUNDS):
        for name, (_, items, texts) in sets.items():
            rounds[f"floor {name}"].append(cpu_us_per_message(floor, texts))
            rounds[f"path {name}"].append(cpu_us_per_message(paths[name], items))
        rounds["dofn"].append(cpu_us_per_message_in_bundles(with_dofn, bundles))
        # The user's decoder on its own: its share of the raw + decoder path is the user's code, not the pipeline's.
        rounds["decoder alone"].append(cpu_us_per_message(lambda m: decode_struct(m[0]), decoded_items))
    sampler.stop()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    sizes = [len(d) for d, _ in msgs]
    note = f"{MESSAGES} payloads, {min(sizes)}-{max(sizes)} B, median of {ROUNDS} interleaved rounds, CPU time"
    figures = [
        Figure("pipeline", "json.loads (floor)", round(med["floor telemetry-v1"], 2), "µs CPU/msg", COMMAND, note),
        Figure("pipeline", "parse+validate+rows", round(med["path telemetry-v1"], 2), "µs CPU/msg", COMMAND,
               "telemetry.read (default profiles) + raw_row + bigtable_cells"),
        Figure("pipeline", "ratio path/floor", round(med["path telemetry-v1"] / med["floor telemetry-v1"], 2), "x",
               COMMAND, "CPU of the accepted-message path over json.loads of the same payloads"),
        Figure("pipeline", "ParseTelemetry DoFn + rows", round(med["dofn"], 2), "µs CPU/msg", COMMAND,
               f"ParseTelemetry over bundles of {BUNDLE} PubsubMessages (bundle methods, counters updating a metrics "
               "container as on a worker, timestamping) + rows, no runner",
               extra={"rounds_us": {k: [round(x, 2) for x in v] for k, v in rounds.items()}}),
        Figure("pipeline", "ratio DoFn/floor", round(med["dofn"] / med["floor telemetry-v1"], 2), "x", COMMAND,
               "CPU of the DoFn + rows over json.loads of the same payloads"),
    ]
    for name, (text, items, _) in sets.items():
        size = statistics.mean(len(d) for d, _ in items)
        own = med[f"path {name}"] - (med["decoder alone"] if name == "raw + protobuf decoder" else 0.0)
        figures.append(Figure(
            "pipeline", f"profile {name}", round(med[f"path {name}"], 2), "µs CPU/msg", COMMAND,
            f"read + rows with {text}; json.loads of the same readings as JSON: {med[f'floor {name}']:.2f} µs "
            f"(x{med[f'path {name}'] / med[f'floor {name}']:.2f}); payload {size:.0f} B on average"
            + (f"; the decoder alone {med['decoder alone']:.2f} µs, the pipeline's part {own:.2f} µs "
               f"(x{own / med[f'floor {name}']:.2f})" if own != med[f"path {name}"] else ""),
            extra={"floor_us": round(med[f"floor {name}"], 2),
                   "ratio": round(med[f"path {name}"] / med[f"floor {name}"], 2),
                   "pipeline_ratio": round(own / med[f"floor {name}"], 2)}))
    return figures


def main() -> int:
    for f in run():
        print(f"{f.name:36} {f.value:>8} {f.unit:11} {f.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

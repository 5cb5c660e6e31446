"""A fleet of mixed firmware through the real pipeline on the emulators: telemetry-v1 devices, flat JSON without a
timestamp, nested JSON with an RFC 3339 field, protobuf read by a user's decoder and protobuf kept as bytes, in one
run. Every message is one row, telemetry_1m is right for each, telemetry_errors holds only what no profile of the
device's registry / subfolder can read, and a replay adds nothing:

- Pub/Sub delivering the fleet's messages again (a seek of the subscription to a snapshot taken before they were
  published; an unacked redelivery looks the same: the same message ids) adds no row anywhere, for every profile,
  nor an error row;
- a device's resend the front did not recognise (it reached Pub/Sub as a new message: another broker host, or no DUP
  flag; tests/bridge/test_resends.py shows the front's part) adds nothing for a payload with its own time, and is a
  new row for one without: the limit docs/messages.md states.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from typing import Any

import pytest

from dataflow_jobs import telemetry_pipeline
from iotbridge.spec import VIEWS
from tests.dataflow import proto_decoder
from tests.dataflow.test_pipeline_emulators import (
    PROJECT,
    combined_minutes,
    pipeline_argv,
    publish_all,
    querier,
    rfc3339_ms,
    stack,
    wait_for,
    wait_for_runner_threads_to_end,
)

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(420)]
__all__ = ["stack"]  # the fixture, imported for this module's test

PROFILES = {
    "registries": {"plant": [{"profile": "json", "time_field": "meta.sampled_at"}]},
    "subfolders": {"fleet/proto": [{"profile": "raw", "decoder": "tests.dataflow.proto_decoder:decode",
                                    "time_field": "at"}],
                   "fleet/blob": ["raw"]},
}
# group -> (devices, readings per device); each group is one kind of firmware.
GROUPS = {"v1": (3, 12), "flat": (2, 8), "plant": (2, 12), "proto": (2, 12), "blob": (1, 4)}
STEP_MS = 5_000
TIMED = ("v1", "plant", "proto")  # payloads that carry their own event time


def attrs(group: str, device: str) -> dict[str, str]:
    out = {"deviceId": device, "deviceNumId": str(1000 + sum(map(ord, device))), "deviceRegistryLocation": "local",
           "projectId": PROJECT, "deviceRegistryId": "plant" if group == "plant" else "fleet"}
    if group in ("proto", "blob"):
        out["subFolder"] = group
    return out


def fleet(base_ms: int) -> list[dict[str, Any]]:
    """One entry per good message: group, device, data, attributes, event ms (None: the publish time), metrics."""
    rnd = random.Random(11)
    out = []
    for group, (devices, per_device) in GROUPS.items():
        for d in range(devices):
            device = f"{group}-{d:02d}"
            for i in range(per_device):
                ms = base_ms + i * STEP_MS
                temp = round(rnd.uniform(15, 30), 2)
                if group == "v1":
                    doc: Any = {"ts": ms, "metrics": {"temperature": temp}, "seq": i}
                    data, metrics, event = json.dumps(doc).encode(), {"temperature": temp}, ms
                elif group == "flat":  # Google's example shape: no ts, no metrics key
                    data, metrics, event = json.dumps({"temperature": temp}).encode(), {"temperature": temp}, None
                elif group == "plant":
                    doc = {"meta": {"sampled_at": rfc3339_ms(ms), "line": "A"}, "boiler": {"temperature": temp,
                                                                                          "burner_on": i % 2 == 0}}
                    data = json.dumps(doc).encode()
                    metrics, event = {"boiler.temperature": temp, "boiler.burner_on": float(i % 2 == 0)}, ms
                elif group == "proto":
                    data = proto_decoder.encode({"temperature": temp, "at": rfc3339_ms(ms)})
                    metrics, event = {"temperature": temp}, ms
                else:  # protobuf nobody decodes: kept as bytes
                    data, metrics, event = proto_decoder.encode({"temperature": temp, "n": i}), {}, None
                out.append({"group": group, "device": device, "data": data, "attrs": attrs(group, device),
                            "event_ms": event, "metrics": metrics})
    return out


def unreadable(base_ms: int) -> list[tuple[bytes, dict[str, str], str]]:
    return [
        (b"\x00\x01 not json", attrs("v1", "v1-00"), "invalid_json"),  # fleet's default list has no raw
        (json.dumps({"ts": "soon", "metrics": {"temperature": 1}}).encode(), attrs("v1", "v1-01"), "bad_ts"),
        (json.dumps({"boiler": {"temperature": 1}}).encode(), attrs("plant", "plant-00"), "missing_event_time"),
        (json.dumps({"meta": {"sampled_at": "noon"}}).encode(), attrs("plant", "plant-01"), "bad_event_time"),
        (b"\xff\xff\xff\xff", attrs("proto", "proto-00"), "decoder_failed"),
        (b"[1, 2]", attrs("flat", "flat-00"), "not_an_object"),
    ]


def pull_ids(sub: Any, subscription: str, n: int) -> list[str]:
    """The message ids of ``n`` messages pulled (and acked) from ``subscription``."""
    got: list[str] = []

    def more() -> list[str]:
        resp = sub.pull(request={"subscription": subscription, "max_messages": 1000}, timeout=10)
        if resp.received_messages:
            sub.acknowledge(request={"subscription": subscription,
                                     "ack_ids": [m.ack_id for m in resp.received_messages]})
        got.extend(m.message.message_id for m in resp.received_messages)
        return got

    return wait_for(f"{n} messages on {subscription}", more, lambda v: len(v) >= n)


def test_mixed_fleet_on_emulators(stack):
    query = querier(stack)
    base_ms = (int(time.time()) - 200) * 1000
    goods = fleet(base_ms)
    bads = unreadable(base_ms)
    argv = pipeline_argv(stack, f"--payload_profiles={json.dumps(PROFILES)}")
    sub = stack["subscriber"]
    # Taken before anything is published: seeking to it later delivers every message of this test again.
    snapshot = sub.snapshot_path(PROJECT, f"before-{stack['table_id']}")
    sub.create_snapshot(request={"name": snapshot, "subscription": stack["pipeline_sub"]})
    # A witness: another subscription of the topic, seeked the same way, shows that the seek delivers every message
    # again with its message id (so that the replay below is one).
    witness = sub.subscription_path(PROJECT, f"witness-{stack['table_id']}")
    witness_snapshot = sub.snapshot_path(PROJECT, f"witness-before-{stack['table_id']}")
    sub.create_subscription(request={"name": witness, "topic": stack["telemetry_topic"]})
    sub.create_snapshot(request={"name": witness_snapshot, "subscription": witness})
    threads_before = set(threading.enumerate())
    result = telemetry_pipeline.run(argv)
    try:
        mixed: list[Any] = [(g["data"], g["attrs"], g) for g in goods] + bads
        random.Random(5).shuffle(mixed)
        ids = publish_all(stack["publisher"], stack["telemetry_topic"], mixed)
        by_id = {mid: m[2] for mid, m in zip(ids, mixed, strict=True) if isinstance(m[2], dict)}
        want_errors = {mid: (m[2], m[0]) for mid, m in zip(ids, mixed, strict=True) if isinstance(m[2], str)}
        n = len(goods)

        rows_sql = ("SELECT message_id, device_id, profile, event_time_source, event_time, publish_time, payload, "
                    "ARRAY_LENGTH(metrics) AS n_metrics FROM {t}.telemetry_raw")
        rows = wait_for("a row per readable message", lambda: query(rows_sql), lambda v: len(v) >= n)
        assert sorted(r["message_id"] for r in rows) == sorted(by_id)  # each exactly once
        want_profile = {"v1": "telemetry-v1", "flat": "json", "plant": "json", "proto": "raw", "blob": "raw"}
        for r in rows:
            g = by_id[r["message_id"]]
            assert (r["device_id"], r["profile"], r["payload"]) == (g["device"], want_profile[g["group"]], g["data"])
            assert r["n_metrics"] == len(g["metrics"])
            event_ms = round(r["event_time"].timestamp() * 1000)
            if g["event_ms"] is None:
                assert r["event_time_source"] == "publish_time" and r["event_time"] == r["publish_time"]
            else:
                assert (r["event_time_source"], event_ms) == ("payload", g["event_ms"])

        errors = wait_for("every unreadable message in telemetry_errors",
                          lambda: query("SELECT message_id, error, payload FROM {t}.telemetry_errors"),
                          lambda v: len(v) >= len(bads))
        assert {e["message_id"]: (e["error"], e["payload"]) for e in errors} == want_errors

        # telemetry_1m: per device, metric and minute, the figures of the values the devices sent, at the event
        # time each row was given (the publish time for the untimed payloads).
        event_ms_of = {r["message_id"]: round(r["event_time"].timestamp() * 1000) for r in rows}
        values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
        for mid, g in by_id.items():
            for metric, v in g["metrics"].items():
                values[(g["device"], metric, event_ms_of[mid] // 60_000 * 60_000)].append(v)
        want = {k: (len(v), min(v), max(v), sum(v) / len(v)) for k, v in values.items()}

        def minutes() -> dict[tuple[str, str, int], tuple]:
            return combined_minutes(query)

        # The untimed readings are stamped now: their windows close on the wall-clock watermark within a minute.
        got = wait_for("telemetry_1m for every profile", minutes,
                       lambda v: {k: c[0] for k, c in v.items()} == {k: c[0] for k, c in want.items()}, timeout=150)
        for k, (cnt, lo, hi, mean) in want.items():
            assert got[k][:3] == (cnt, lo, hi), k
            assert got[k][3] == pytest.approx(mean), k
        assert {k[0].split("-")[0] for k in got} == {"v1", "flat", "plant", "proto"}  # blob: bytes, no metrics

        # The view over telemetry_raw works for every profile: the latest value of each device's metrics.
        latest = query(VIEWS["device_latest"].render(PROJECT, stack["dataset"]))
        assert {(r["device_id"], r["metric"]) for r in latest} == {(d, m) for d, m, _ in want}

        # Bigtable: a row per message; raw-profile rows keep the bytes in a cell.
        bt_table = stack["bt_table"]
        bt_rows = wait_for("a Bigtable row per message", lambda: list(bt_table.read_rows()), lambda v: len(v) >= n)
        assert len(bt_rows) == n
        kept = sorted(r.cells["p"][b"raw"][0].value for r in bt_rows if "p" in r.cells)
        assert kept == sorted(g["data"] for g in goods if g["group"] in ("proto", "blob"))

        def counts() -> dict[tuple[str, str], int]:
            return {(r["profile"], r["event_time_source"]): r["c"] for r in query(
                "SELECT profile, event_time_source, COUNT(*) AS c FROM {t}.telemetry_raw "
                "GROUP BY profile, event_time_source")}

        def by_group(*groups: str) -> int:
            return sum(1 for g in goods if g["group"] in groups)

        once = {("telemetry-v1", "payload"): by_group("v1"), ("json", "payload"): by_group("plant"),
                ("raw", "payload"): by_group("proto"), ("json", "publish_time"): by_group("flat"),
                ("raw", "publish_time"): by_group("blob")}
        assert counts() == once
        timed_minutes = {k: v for k, v in got.items() if k[0].split("-")[0] in TIMED}

        def sentinels(seq: int) -> list[tuple[bytes, dict[str, str]]]:
            # New readings published after a replay: once they are in every sink, the replay (delivered before
            # them) has gone through too. The DirectRunner's counters cannot say so (they stop at one bundle).
            return [(json.dumps({"ts": base_ms + seq * STEP_MS, "seq": seq, "metrics": {"done": 1}}).encode(),
                     attrs("v1", f"v1-{d:02d}")) for d in range(GROUPS["v1"][0])]

        def after_sentinels(batch: list[tuple[bytes, dict[str, str]]], total: int) -> None:
            publish_all(stack["publisher"], stack["telemetry_topic"], batch)
            wait_for("the new readings in telemetry_raw", lambda: sum(counts().values()), lambda v: v >= total)
            wait_for("the new readings in Bigtable", lambda: len(list(bt_table.read_rows())), lambda v: v >= total)

        # (a) Pub/Sub delivers every message of the test again, good and unreadable, with its message id.
        assert sorted(pull_ids(sub, witness, len(ids))) == sorted(ids)
        sub.seek(request={"subscription": witness, "snapshot": witness_snapshot})
        sub.seek(request={"subscription": stack["pipeline_sub"], "snapshot": snapshot})
        assert sorted(pull_ids(sub, witness, len(ids))) == sorted(ids)  # again, after the seek
        first_sentinels = sentinels(100)
        after_sentinels(first_sentinels, n + len(first_sentinels))
        assert counts() == {**once, ("telemetry-v1", "payload"): once[("telemetry-v1", "payload")] + 3}
        row_ids = [r["message_id"] for r in query("SELECT message_id FROM {t}.telemetry_raw")]
        assert len(row_ids) == len(set(row_ids)) == n + len(first_sentinels) and set(by_id) <= set(row_ids)
        bt_rows = list(bt_table.read_rows())
        assert len(bt_rows) == n + len(first_sentinels)
        assert all(len(cells) == 1 for r in bt_rows for cols in r.cells.values() for cells in cols.values())
        assert {k: v for k, v in minutes().items() if k[1] != "done"} == got
        assert len(query("SELECT message_id FROM {t}.telemetry_errors")) == len(bads)

        # (b) A device's resend that reached Pub/Sub as a new message (new message id, new publish time). A payload
        # with its own time is recognised by device + time + seq or digest and adds nothing; one without a time
        # cannot be told from a new reading with the same bytes, so it is one.
        publish_all(stack["publisher"], stack["telemetry_topic"], [(g["data"], g["attrs"]) for g in goods])
        untimed = sum(1 for g in goods if g["event_ms"] is None)
        second_sentinels = sentinels(101)
        total = n + untimed + len(first_sentinels) + len(second_sentinels)
        after_sentinels(second_sentinels, total)
        assert counts() == {**once, ("telemetry-v1", "payload"): once[("telemetry-v1", "payload")] + 6,
                            ("json", "publish_time"): 2 * by_group("flat"),
                            ("raw", "publish_time"): 2 * by_group("blob")}
        timed_now = {k: v for k, v in minutes().items() if k[0].split("-")[0] in TIMED and k[1] != "done"}
        assert timed_now == timed_minutes
        assert len(query("SELECT message_id FROM {t}.telemetry_errors")) == len(bads)
    finally:
        result.cancel()
        for snap in (snapshot, witness_snapshot):
            sub.delete_snapshot(request={"snapshot": snap})
        sub.delete_subscription(request={"subscription": witness})
    wait_for_runner_threads_to_end(threads_before)

"""The real pipeline, streaming on the BundleBasedDirectRunner, against the Pub/Sub and Bigtable emulators and
the local BigQuery.

Only endpoints differ from a Dataflow run: the Pub/Sub and Bigtable clients follow ``PUBSUB_EMULATOR_HOST`` /
``BIGTABLE_EMULATOR_HOST`` and the BigQuery sink gets ``--bigquery_endpoint``. The test publishes a few hundred
good messages and one or more of every class of bad message, checks every sink, publishes the good ones again
and checks that nothing new was written, then cancels the pipeline.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, bigtable, pubsub_v1
from google.cloud.bigtable import column_family

from dataflow_jobs import schema, telemetry_pipeline
from iotbridge.spec import BIGTABLE, TABLES, config_request
from tests.waiting import wait_for

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(240)]

PROJECT = "local-project"
DATASET = "iot"
INSTANCE = "iot-local"
DEVICES = [f"dev-{i:02d}" for i in range(8)]
PER_DEVICE = 30  # 240 good messages
STEP_MS = 4_000  # readings 4 s apart: 120 s per device, three or four 1-minute windows
RULE_INTERVAL_S = 3600
HOT_DEVICES = {"dev-00": 1, "dev-03": 3}  # device -> how many readings above the threshold (all within the interval)

T = TypeVar("T")


def attrs(device: str) -> dict[str, str]:
    return {"deviceId": device, "deviceNumId": str(1000 + DEVICES.index(device)) if device in DEVICES else "0",
            "deviceRegistryId": "fleet", "deviceRegistryLocation": "local", "projectId": PROJECT}


def good_messages(base_ms: int) -> list[tuple[bytes, dict[str, str], dict[str, Any], int]]:
    rnd = random.Random(7)
    out = []
    for device in DEVICES:
        hot = HOT_DEVICES.get(device, 0)
        for seq in range(PER_DEVICE):
            temp = round(rnd.uniform(15, 30), 3) if seq >= hot else 85.0 + seq
            ms = base_ms + seq * STEP_MS
            doc: dict[str, Any] = {"ts": ms, "metrics": {"temperature": temp, "rpm": rnd.randrange(900, 1500)}}
            if seq % 5:  # every fifth reading without seq: deduped by payload digest instead
                doc["seq"] = seq
            if seq % 7 == 0:
                doc["ts"] = rfc3339_ms(ms)  # both ts forms
                doc["firmware"] = "1.2.3"  # extra keys are kept
            out.append((json.dumps(doc).encode(), attrs(device), doc, ms))
    return out


def rfc3339_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def bad_messages(base_ms: int) -> list[tuple[bytes, dict[str, str], str]]:
    ok = {"ts": base_ms, "metrics": {"temperature": 20.0}}
    a = attrs("dev-01")
    no_id = {k: v for k, v in a.items() if k != "deviceId"}
    cases = [
        (json.dumps(ok).encode(), no_id, "missing_device_id"),
        (json.dumps({**ok, "deviceId": "dev-01"}).encode(), no_id, "missing_device_id"),  # payload never counts
        (json.dumps(ok).encode(), attrs("a+b"), "bad_device_id"),
        (b"\xff\xfe\x00garbage", a, "invalid_json"),
        (b'{"ts": 1, "metrics": {', a, "invalid_json"),
        (b"", a, "invalid_json"),
        (b'{"ts": 1700000000000, "metrics": {"t": NaN}}', a, "invalid_json"),
        (b"[1, 2, 3]", a, "not_an_object"),
        (b'"just text"', a, "not_an_object"),
        (json.dumps({"metrics": {"t": 1}}).encode(), a, "missing_ts"),
        (json.dumps({**ok, "ts": "yesterday"}).encode(), a, "bad_ts"),
        (json.dumps({**ok, "ts": "2026-11-27T14:00:00"}).encode(), a, "bad_ts"),  # no offset
        (json.dumps({**ok, "ts": 1.7e12}).encode(), a, "bad_ts"),
        (json.dumps({**ok, "ts": -5}).encode(), a, "bad_ts"),
        (json.dumps({"ts": base_ms}).encode(), a, "missing_metrics"),
        (json.dumps({**ok, "metrics": {}}).encode(), a, "bad_metrics"),
        (json.dumps({**ok, "metrics": [1, 2]}).encode(), a, "bad_metrics"),
        (json.dumps({**ok, "metrics": {"t": "hot"}}).encode(), a, "bad_metric_value"),
        (json.dumps({**ok, "metrics": {"t": True}}).encode(), a, "bad_metric_value"),
        (json.dumps({**ok, "metrics": {"t": {"nested": 1}}}).encode(), a, "bad_metric_value"),
        (json.dumps({**ok, "seq": -1}).encode(), a, "bad_seq"),
        (json.dumps({**ok, "seq": "7"}).encode(), a, "bad_seq"),
    ]
    return cases * 2  # 44 bad messages, each its own Pub/Sub message


def expected_minutes(goods) -> dict[tuple[str, str, int], tuple[int, float, float, float]]:
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for _, a, doc, ms in goods:
        for m, v in doc["metrics"].items():
            values[(a["deviceId"], m, ms // 60_000 * 60_000)].append(float(v))
    return {k: (len(v), min(v), max(v), sum(v) / len(v)) for k, v in values.items()}


@pytest.fixture
def stack(pubsub_emulator, bigtable_emulator, bigquery_emulator, emulator_env) -> Iterator[dict[str, Any]]:
    emulator_env(pubsub_emulator, bigtable_emulator)
    suffix = f"{int(time.time() * 1000) % 10**9}"
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    telemetry_topic = publisher.topic_path(PROJECT, f"telemetry-{suffix}")
    requests_topic = publisher.topic_path(PROJECT, f"config-requests-{suffix}")
    pipeline_sub = subscriber.subscription_path(PROJECT, f"telemetry-pipeline-{suffix}")
    requests_sub = subscriber.subscription_path(PROJECT, f"config-requests-check-{suffix}")
    publisher.create_topic(name=telemetry_topic)
    publisher.create_topic(name=requests_topic)
    subscriber.create_subscription(name=pipeline_sub, topic=telemetry_topic, ack_deadline_seconds=60)
    subscriber.create_subscription(name=requests_sub, topic=requests_topic)

    bt = bigtable.Client(project=PROJECT, admin=True)
    table = bt.instance(INSTANCE).table(f"telemetry-{suffix}")
    table.create(column_families={f: column_family.MaxVersionsGCRule(10) for f in BIGTABLE.column_families})

    bq = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                         client_options=ClientOptions(api_endpoint=bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]))
    dataset = f"{DATASET}_{suffix}"
    bq.create_dataset(dataset, retry=None, timeout=30)
    for name in (schema.RAW, schema.MINUTE, schema.ERRORS):
        spec = TABLES[name]
        bq.create_table(bigquery.Table(f"{PROJECT}.{dataset}.{name}",
                                       schema=[bigquery.SchemaField.from_api_repr(c) for c in spec.schema()]),
                        retry=None, timeout=30)
    try:
        yield {"publisher": publisher, "subscriber": subscriber, "telemetry_topic": telemetry_topic,
               "requests_topic": requests_topic, "pipeline_sub": pipeline_sub, "requests_sub": requests_sub,
               "bt_table": table, "bq": bq, "dataset": dataset, "table_id": table.table_id,
               "bq_endpoint": bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]}
    finally:
        subscriber.delete_subscription(subscription=pipeline_sub)
        subscriber.delete_subscription(subscription=requests_sub)
        publisher.delete_topic(topic=telemetry_topic)
        publisher.delete_topic(topic=requests_topic)
        table.delete()
        bq.delete_dataset(dataset, delete_contents=True, retry=None, timeout=30)
        subscriber.close()
        bq.close()


def publish_all(publisher, topic: str, messages) -> list[str]:
    futures = [publisher.publish(topic, data, **a) for data, a, *_ in messages]
    return [f.result(timeout=30) for f in futures]


def querier(stack: dict[str, Any]) -> Callable[[str], list[dict[str, Any]]]:
    """``query(sql)`` on the test's dataset; ``{t}`` in the SQL is the dataset."""
    bq, ds = stack["bq"], stack["dataset"]

    def query(sql: str) -> list[dict[str, Any]]:
        job = bq.query(sql.format(t=f"`{PROJECT}.{ds}`"), retry=None, timeout=30)
        return [dict(r) for r in job.result(timeout=30)]

    return query


def pipeline_argv(stack: dict[str, Any], *flags: str) -> list[str]:
    """The pipeline's flags against the test's topics, tables and endpoints, plus ``flags``."""
    return [
        f"--input_subscription={stack['pipeline_sub']}",
        f"--bigquery_dataset={PROJECT}.{stack['dataset']}",
        f"--bigtable_instance=projects/{PROJECT}/instances/{INSTANCE}",
        f"--bigtable_table={stack['table_id']}",
        f"--config_requests_topic={stack['requests_topic']}",
        *flags,
        "--allowed_lateness_seconds=3600",
        f"--bigquery_endpoint={stack['bq_endpoint']}",
        "--runner=BundleBasedDirectRunner",
    ]


def combined_minutes(query: Callable[[str], list[dict[str, Any]]]) -> dict[tuple[str, str, int], tuple]:
    """telemetry_1m's rows of each (device, metric, window start ms) combined: (count, min, max, mean)."""
    combined: dict[tuple[str, str, int], list[Any]] = {}
    for r in query("SELECT device_id, metric, window_start, `count` AS c, `min` AS lo, `max` AS hi, "
                   "mean FROM {t}.telemetry_1m"):
        k = (r["device_id"], r["metric"], round(r["window_start"].timestamp() * 1000))
        c = combined.setdefault(k, [0, math.inf, -math.inf, 0.0])
        c[0] += r["c"]
        c[1], c[2], c[3] = min(c[1], r["lo"]), max(c[2], r["hi"]), c[3] + r["mean"] * r["c"]
    return {k: (c[0], c[1], c[2], c[3] / c[0]) for k, c in combined.items()}


def wait_for_runner_threads_to_end(threads_before: set[threading.Thread]) -> None:
    # The DirectRunner's executor threads ("Thread: N, ...") end once their current pull (30 s at most) returns.
    wait_for("the runner's threads to end", lambda: [t.name for t in set(threading.enumerate()) - threads_before
                                                     if t.is_alive() and t.name.startswith("Thread: ")],
             lambda v: not v, timeout=45, interval=0.5)


def test_pipeline_on_emulators(stack):
    query = querier(stack)

    # All event times at least 70 s in the past: the DirectRunner's Pub/Sub watermark is the wall clock, so the
    # windows are already closed and fire as soon as their readings arrive (on-time vs late panes are the
    # subject of the TestStream tests).
    base_ms = (int(time.time()) - 200) * 1000
    goods = good_messages(base_ms)
    bads = bad_messages(base_ms)
    n = len(goods)
    argv = pipeline_argv(stack, '--threshold_rules={"temperature": {"above": 80, "config": {"fan": "max"}}}',
                         f"--rule_min_interval_seconds={RULE_INTERVAL_S}")
    threads_before = set(threading.enumerate())
    result = telemetry_pipeline.run(argv)
    try:
        mixed: list[tuple] = goods + bads
        random.Random(3).shuffle(mixed)  # out of order, bad ones interleaved
        ids = publish_all(stack["publisher"], stack["telemetry_topic"], mixed)
        want_errors = {mid: (m[2], m[0]) for mid, m in zip(ids, mixed, strict=True) if isinstance(m[2], str)}

        # telemetry_raw: exactly N rows, one per good message.
        wait_for("N rows in telemetry_raw", lambda: query("SELECT COUNT(*) AS n FROM {t}.telemetry_raw")[0]["n"],
                 lambda v: v >= n, timeout=90, interval=0.5)
        # Bigtable: N rows, each cell exactly one version.
        bt_table = stack["bt_table"]
        rows = wait_for("N rows in Bigtable", lambda: list(bt_table.read_rows()), lambda v: len(v) >= n, timeout=90,
                        interval=0.5)
        assert len(rows) == n
        assert all(r.row_key.decode().split("#")[0] in DEVICES for r in rows)
        # telemetry_errors: every bad message with its reason and untouched payload.
        errors = wait_for("every bad message in telemetry_errors",
                          lambda: query("SELECT message_id, error, payload FROM {t}.telemetry_errors"),
                          lambda v: len(v) >= len(bads), timeout=90, interval=0.5)
        got_errors = {e["message_id"]: (e["error"], e["payload"]) for e in errors}
        assert got_errors == want_errors

        # telemetry_1m: the rows of each window add up to the window's figures.
        want = expected_minutes(goods)

        def minutes():
            return combined_minutes(query)

        got = wait_for("telemetry_1m aggregates", minutes,
                       lambda v: {k: c[0] for k, c in v.items()} == {k: c[0] for k, c in want.items()}, timeout=90,
                       interval=0.5)
        for k, (cnt, lo, hi, mean) in want.items():
            assert got[k][:3] == (cnt, lo, hi), k
            assert got[k][3] == pytest.approx(mean), k

        # Config requests: one per hot device (all its hot readings fall within the rate-limit interval).
        sub = stack["subscriber"]
        received: list[dict[str, Any]] = []

        def pull() -> list[dict[str, Any]]:
            resp = sub.pull(subscription=stack["requests_sub"], max_messages=50, timeout=5)
            if resp.received_messages:
                sub.acknowledge(subscription=stack["requests_sub"], ack_ids=[m.ack_id for m in resp.received_messages])
            received.extend(json.loads(m.message.data) for m in resp.received_messages)
            return received

        wait_for("config requests", pull, lambda v: len(v) >= len(HOT_DEVICES), timeout=90, interval=0.5)
        # The rule's config as the config-request body carries every config: its bytes (compact JSON), base64.
        assert sorted(received, key=lambda r: r["device_id"]) == [
            json.loads(config_request(d, b'{"fan":"max"}')) for d in sorted(HOT_DEVICES)]

        # Replay: the same good messages again (new message ids), then one new reading per device published
        # after them. The Python DirectRunner's counters cannot tell us when the replay has gone through (its
        # StateSampler keeps the first bundle's metrics container, so committed counts stop at one bundle), so
        # the new readings arriving in every sink is the signal that the replay, pulled before them, was
        # processed too.
        publish_all(stack["publisher"], stack["telemetry_topic"], goods)
        late_ms = base_ms + PER_DEVICE * STEP_MS
        sentinels = [(json.dumps({"ts": late_ms, "seq": PER_DEVICE, "metrics": {"rpm": 1000}}).encode(), attrs(d))
                     for d in DEVICES]
        publish_all(stack["publisher"], stack["telemetry_topic"], sentinels)
        total = n + len(sentinels)
        wait_for("the new readings in telemetry_raw",
                 lambda: query("SELECT COUNT(*) AS n FROM {t}.telemetry_raw")[0]["n"], lambda v: v >= total,
                 timeout=90, interval=0.5)
        wait_for("the new readings in Bigtable", lambda: len(list(bt_table.read_rows())), lambda v: v >= total,
                 timeout=90, interval=0.5)
        sentinel_window = late_ms // 60_000 * 60_000
        after = wait_for("the new readings in telemetry_1m", minutes,
                         lambda v: sum(c[0] for k, c in v.items() if k[1] == "rpm") >= total, timeout=90,
                         interval=0.5)
        assert sum(c[0] for k, c in after.items() if k[1] == "rpm") == total
        # Nothing of the replay anywhere: exact counts, one version per Bigtable cell, same aggregates.
        assert query("SELECT COUNT(*) AS n FROM {t}.telemetry_raw")[0]["n"] == total
        assert query("SELECT COUNT(DISTINCT message_id) AS n FROM {t}.telemetry_raw")[0]["n"] == total
        rows = list(bt_table.read_rows())
        assert len(rows) == total
        assert all(len(cells) == 1 for r in rows for cols in r.cells.values() for cells in cols.values())
        assert {k: v for k, v in after.items() if not (k[1] == "rpm" and k[2] == sentinel_window)} == \
            {k: v for k, v in got.items() if not (k[1] == "rpm" and k[2] == sentinel_window)}
        assert pull() == received and len(received) == len(HOT_DEVICES)
        assert len(query("SELECT message_id FROM {t}.telemetry_errors")) == len(bads)
    finally:
        result.cancel()
    wait_for_runner_threads_to_end(threads_before)


def test_bigtable_replay_after_dedupe_horizon_writes_no_new_version(bigtable_emulator, emulator_env):
    """A replay the dedupe no longer remembers reaches Bigtable again: same row keys, same cell timestamps,
    so the cells are overwritten in place (one version each) rather than versions piling up."""
    import apache_beam as beam
    from apache_beam.io.gcp.bigtableio import WriteToBigTable
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from dataflow_jobs import telemetry
    from dataflow_jobs.sinks import ToDirectRow

    emulator_env(bigtable_emulator)
    table = bigtable.Client(project=PROJECT, admin=True).instance(INSTANCE).table(f"replay-{time.time_ns() % 10**9}")
    table.create(column_families={f: column_family.MaxVersionsGCRule(10) for f in BIGTABLE.column_families})
    try:
        base_ms = 1_795_000_020_000
        docs = [json.dumps({"ts": base_ms + i * 1000, "seq": i if i % 2 else None,
                            "metrics": {"t": float(i)}}).encode() for i in range(20)]

        def write(attempt: int) -> None:
            rows = [telemetry.bigtable_cells(telemetry.parse(
                d, attrs("dev-01"), f"{attempt}-{i}", (base_ms + attempt * 3_600_000) * 1000))
                for i, d in enumerate(docs)]
            with beam.Pipeline(runner=FnApiRunner()) as p:
                _ = (p | beam.Create(rows) | beam.ParDo(ToDirectRow())
                     | WriteToBigTable(project_id=PROJECT, instance_id=INSTANCE, table_id=table.table_id))

        write(1)
        write(2)  # an hour later, new message ids: the replay
        rows = list(table.read_rows())
        assert len(rows) == len(docs)
        versions = [len(cells) for r in rows for cols in r.cells.values() for cells in cols.values()]
        assert versions and set(versions) == {1}
        first = rows[0].cells["m"][b"t"][0]
        assert first.timestamp.timestamp() * 1000 == base_ms
    finally:
        table.delete()

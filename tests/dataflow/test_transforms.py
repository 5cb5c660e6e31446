"""The pipeline's transforms on beam.Create (FnApiRunner) and TestStream (BundleBasedDirectRunner)."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
import time
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from dataflow_jobs import rules, telemetry
from dataflow_jobs.telemetry_pipeline import ProcessTelemetry, Settings, parse_args

ATTRS = {"deviceId": "dev-1", "deviceNumId": "101", "deviceRegistryId": "fleet", "deviceRegistryLocation": "local",
         "projectId": "local-project"}


def minute_boundary_ms(now_s: float) -> int:
    """The start of the minute ``now_s`` lies in, in epoch ms (``% 60_000 == 0``)."""
    return int(now_s // 60) * 60_000


T0 = minute_boundary_ms(time.time())  # ms; the streaming tests take theirs from the test clock instead


def settings(**overrides: str) -> Settings:
    flags = {
        "input_subscription": "projects/local-project/subscriptions/telemetry-pipeline",
        "bigquery_dataset": "local-project.iot",
        "bigtable_instance": "projects/local-project/instances/iot-local",
        "config_requests_topic": "projects/local-project/topics/config-requests",
        "threshold_rules": json.dumps({"temperature": {"above": 80, "config": {"fan": "max"}}}),
        "rule_min_interval_seconds": "60",
        "allowed_lateness_seconds": "120",
        **overrides,
    }
    s, _ = parse_args([f"--{k}={v}" for k, v in flags.items()])
    return s


def msg(doc: object, mid: str, attrs: dict[str, str] | None = None, publish_ms: int = T0) -> PubsubMessage:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return PubsubMessage(data, dict(ATTRS if attrs is None else attrs), message_id=mid,
                         publish_time=datetime.fromtimestamp(publish_ms / 1000, UTC))


def reading(ts_ms: int, seq: int | None, **metrics: float) -> dict[str, object]:
    doc: dict[str, object] = {"ts": ts_ms, "metrics": metrics}
    if seq is not None:
        doc["seq"] = seq
    return doc


def streaming_pipeline() -> TestPipeline:
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    return TestPipeline(runner="BundleBasedDirectRunner", options=options)


# ------------------------------------------------------------------------------------------- parse


BAD = [
    (b'{"ts": 1, "metrics": {"t": 1}}', {}, "missing_device_id"),
    (b'{"ts": 1, "metrics": {"t": 1}, "deviceId": "dev-1"}', {"deviceRegistryId": "r"}, "missing_device_id"),
    (b'{"ts": 1, "metrics": {"t": 1}}', {"deviceId": "dev/../x"}, "bad_device_id"),
    (b'{"ts": 1, "metrics": {"t": 1}}', {"deviceId": "a+b"}, "bad_device_id"),
    (b"\xff\xfe", ATTRS, "invalid_json"),
    (b"", ATTRS, "invalid_json"),
    (b'{"ts": 1,', ATTRS, "invalid_json"),
    (b'{"ts": 1, "metrics": {"t": Infinity}}', ATTRS, "invalid_json"),
    # Unpaired UTF-16 surrogates: not Unicode text (a metric name of one made the Bigtable cells raise).
    (b'{"ts": 1, "metrics": {"\\ud800": 1}}', ATTRS, "invalid_json"),
    (b'{"ts": 1, "metrics": {"t": 1}, "note": "x\\udc00"}', ATTRS, "invalid_json"),
    (b"[]", ATTRS, "not_an_object"),
    (b"42", ATTRS, "not_an_object"),
    (b"null", ATTRS, "not_an_object"),
    (b'{"metrics": {"t": 1}}', ATTRS, "missing_ts"),
    (b'{"ts": "soon", "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": "2026-11-27T14:00:00", "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": 1.5, "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": true, "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": -1, "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": 10000000000000, "metrics": {"t": 1}}', ATTRS, "bad_ts"),
    (b'{"ts": 1}', ATTRS, "missing_metrics"),
    (b'{"ts": 1, "metrics": {}}', ATTRS, "bad_metrics"),
    (b'{"ts": 1, "metrics": 5}', ATTRS, "bad_metrics"),
    (b'{"ts": 1, "metrics": {"": 5}}', ATTRS, "bad_metrics"),
    (b'{"ts": 1, "metrics": {"t": "5"}}', ATTRS, "bad_metric_value"),
    (b'{"ts": 1, "metrics": {"t": null}}', ATTRS, "bad_metric_value"),
    (b'{"ts": 1, "metrics": {"t": false}}', ATTRS, "bad_metric_value"),
    (b'{"ts": 1, "metrics": {"t": 1e400}}', ATTRS, "bad_metric_value"),
    (b'{"ts": 1, "metrics": {"t": 1}, "seq": 1.0}', ATTRS, "bad_seq"),
    (b'{"ts": 1, "metrics": {"t": 1}, "seq": -3}', ATTRS, "bad_seq"),
    (b'{"ts": 1, "metrics": {"t": 1}, "seq": true}', ATTRS, "bad_seq"),
]


def test_every_reason_has_a_case():
    assert {reason for *_, reason in BAD} == set(telemetry.REASONS)


@pytest.mark.parametrize("data,attrs,reason", BAD)
def test_parse_rejects_with_reason(data, attrs, reason):
    with pytest.raises(telemetry.Rejected) as exc:
        telemetry.parse(data, attrs, "m1", 0)
    assert exc.value.reason == reason


def test_surrogate_escapes_that_pair_are_read_as_text():
    r = telemetry.parse(b'{"ts": 1, "metrics": {"\\ud83d\\ude00": 1}, "x": "\\\\ud800"}', ATTRS, "m1", 0)
    assert list(r.metrics) == ["\U0001f600"] and r.extra == {"x": "\\ud800"}  # an escaped backslash, then "ud800"
    assert telemetry.bigtable_cells(r)[1][0][1] == "\U0001f600".encode()
    # The same through the standard library's decoder (orjson refuses the number beyond a double, and sends it there).
    doc = telemetry.decode_json(b'{"a": "\\ud83d\\ude00", "b": "\\\\ud800", "c": 1e400}')
    assert doc["a"] == "\U0001f600" and doc["b"] == "\\ud800"


def test_parse_takes_identity_from_attributes_and_keeps_extras():
    data = b'{"ts": "2026-11-27T14:00:00.123+01:00", "metrics": {"t": 21, "rpm": 1200.5}, "seq": 42, ' \
           b'"deviceId": "someone-else", "fw": "1.2"}'
    r = telemetry.parse(data, {**ATTRS, "subFolder": "engine"}, "m1", 5_000_000)
    assert (r.device_id, r.device_num_id, r.registry_id, r.sub_folder) == ("dev-1", "101", "fleet", "engine")
    assert r.event_time_us == int(datetime(2026, 11, 27, 13, 0, 0, 123000, UTC).timestamp()) * 10**6 + 123000
    assert r.metrics == {"t": 21.0, "rpm": 1200.5} and r.seq == 42
    assert r.extra == {"deviceId": "someone-else", "fw": "1.2"}  # kept in the raw row, never used as identity
    row = telemetry.raw_row(r)
    assert row["event_time"] == "2026-11-27T13:00:00.123000Z" and row["publish_time"] == "1970-01-01T00:00:05.000000Z"
    assert row["metrics"] == [{"name": "t", "value": 21.0}, {"name": "rpm", "value": 1200.5}]
    assert json.loads(row["extra"]) == {"deviceId": "someone-else", "fw": "1.2"}
    assert set(row) == set(telemetry_raw_columns())


def telemetry_raw_columns():
    from iotbridge.spec import TABLES

    return TABLES["telemetry_raw"].column_names()


def test_bigtable_row_key_and_cell_timestamps_are_event_time():
    r = telemetry.parse(json.dumps(reading(T0 + 1, 7, t=1.5)).encode(), ATTRS, "m1", 0)
    key, cells = telemetry.bigtable_cells(r)
    assert key == f"dev-1#{T0 + 1:013d}#0000000007".encode()
    assert ("m", b"t", struct.pack(">d", 1.5), (T0 + 1) * 1000) in cells
    assert {c[3] for c in cells} == {(T0 + 1) * 1000}
    # Without seq, the same payload gives the same key (replays) and a different payload another key.
    a = telemetry.parse(json.dumps(reading(T0, None, t=1)).encode(), ATTRS, "m1", 0)
    b = telemetry.parse(json.dumps(reading(T0, None, t=1)).encode(), ATTRS, "m2", 9)
    c = telemetry.parse(json.dumps(reading(T0, None, t=2)).encode(), ATTRS, "m3", 0)
    assert a.row_key == b.row_key != c.row_key
    # Keys sort by time within a device.
    keys = [telemetry.parse(json.dumps(reading(ts, 1, t=1)).encode(), ATTRS, "m", 0).row_key
            for ts in (5, 40, 1_000, T0)]
    assert keys == sorted(keys)


def test_error_row_keeps_raw_payload_and_attributes():
    row = telemetry.error_row("bad_ts", "x", b"\x00\xff", ATTRS, "m9", 1_000_000)
    assert base64.b64decode(row["payload"]) == b"\x00\xff"
    assert json.loads(row["attributes"]) == ATTRS and row["device_id"] == "dev-1"


# ------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("text,fragment", [
    ("nope", "not JSON"),
    ("[]", "JSON object"),
    ('{"t": 5}', "t must be an object"),
    ('{"t": {"config": {"a": 1}}}', "needs 'above' or 'below'"),
    ('{"t": {"above": "9", "config": {"a": 1}}}', "t.above must be a finite number"),
    ('{"t": {"above": 9}}', "t.config must be a non-empty JSON object"),
    ('{"t": {"above": 9, "config": {"a": 1}, "when": 1}}', "unknown keys ['when']"),
])
def test_rules_refuse_bad_flag_values(text, fragment):
    with pytest.raises(rules.RuleError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        rules.parse_rules(text)


def test_rules_merge_configs_of_every_breached_rule():
    rs = rules.parse_rules('{"t": {"above": 80, "config": {"fan": "max"}}, '
                           '"bat": {"below": 10, "config": {"interval": 600}}}')
    r = telemetry.parse(json.dumps(reading(T0, 1, t=81, bat=5)).encode(), ATTRS, "m", 0)
    assert rules.evaluate(r, rs) == ({"fan": "max", "interval": 600}, ["bat<10", "t>80"])
    ok = telemetry.parse(json.dumps(reading(T0, 1, t=80, bat=10)).encode(), ATTRS, "m", 0)
    assert rules.evaluate(ok, rs) is None


def test_bad_threshold_flag_exits_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        settings(threshold_rules='{"t": {"above": 1}}')
    assert "t.config must be a non-empty JSON object" in capsys.readouterr().err


# -------------------------------------------------------------------------------- batch (beam.Create)


def test_errors_and_counters_on_create():
    messages = [msg(data, f"b{i}", attrs) for i, (data, attrs, _) in enumerate(BAD)]
    messages += [msg(reading(T0 + i * 1000, i, t=20.0 + i), f"g{i}") for i in range(5)]
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(messages) | ProcessTelemetry(settings())
    assert_that(out["errors"] | "Reasons" >> beam.Map(lambda kv: (kv[0], kv[1]["error"])),
                equal_to([(f"b{i}", reason) for i, (_, _, reason) in enumerate(BAD)]), label="errors")
    assert_that(out["raw"] | "Ids" >> beam.Map(lambda kv: kv[1]["message_id"]),
                equal_to([f"g{i}" for i in range(5)]), label="raw")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("telemetry"))["counters"]}
    want = {f"rejected_{r}": sum(1 for *_, reason in BAD if reason == r) for r in telemetry.REASONS}
    assert {k: v for k, v in counters.items() if k.startswith("rejected_")} == want
    assert counters["accepted"] == 5


def test_an_unexpected_exception_dead_letters_its_message_and_the_bundle_goes_on(monkeypatch, caplog):
    """A bug the parser did not foresee, hit by one message: that message is an ``internal_error`` row (the
    exception's type, not its text) and counted; the other messages of the same bundle are read and written."""
    real_read = telemetry.read

    def read(data, *args, **kwargs):
        if b'"poison"' in data:
            raise KeyError("s3cret-text")  # what a bug's exception could quote: the payload's own bytes
        return real_read(data, *args, **kwargs)

    monkeypatch.setattr(telemetry, "read", read)
    messages = [msg(reading(T0 + i * 1000, i, t=20.0 + i), f"g{i}") for i in range(4)]
    messages.insert(2, msg({**reading(T0, 9, t=1.0), "poison": 1}, "p0"))
    messages.append(msg(b"not json", "b0"))
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(messages, reshuffle=False) | ProcessTelemetry(settings())

    def reason(kv):
        row = kv[1]
        detail = re.sub(r":\d+\)$", ":N)", row["detail"]) if row["error"] == "internal_error" else ""
        return kv[0], row["error"], detail, row["device_id"], base64.b64decode(row["payload"]) == by_id[kv[0]]

    by_id = {m.message_id: m.data for m in messages}
    assert_that(out["errors"] | "Reasons" >> beam.Map(reason),
                equal_to([("p0", "internal_error", "Parse: KeyError in read (test_transforms.py:N)", "dev-1", True),
                          ("b0", "invalid_json", "", "dev-1", True)]), label="errors")
    assert_that(out["raw"] | "Ids" >> beam.Map(lambda kv: kv[1]["message_id"]),
                equal_to([f"g{i}" for i in range(4)]), label="raw")
    with caplog.at_level("ERROR", logger="dataflow_jobs.telemetry_pipeline"):
        result = p.run()
        result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("telemetry"))["counters"]}
    assert counters["rejected_internal_error"] == 1 and counters["rejected_invalid_json"] == 1
    assert counters["accepted"] == counters["accepted_telemetry-v1"] == 4
    lines = [r.getMessage() for r in caplog.records if "internal_error" in r.getMessage()]
    assert len(lines) == 1 and "p0" in lines[0] and "KeyError" in lines[0] and "s3cret" not in lines[0]


def test_a_reading_that_makes_a_row_step_raise_is_dead_lettered_and_the_others_written(monkeypatch):
    """After the parse, the steps that make a reading's BigQuery row and Bigtable cells guard each reading the same
    way: the one that makes them raise is an ``internal_error`` row naming the step; the bundle's others are written."""
    real_raw_row, real_cells = telemetry.raw_row, telemetry.bigtable_cells

    def raw_row(r):
        if "raw_bug" in r.metrics:
            raise IndexError("s3cret")
        return real_raw_row(r)

    def bigtable_cells(r):
        if "cells_bug" in r.metrics:
            raise TypeError("s3cret")
        return real_cells(r)

    monkeypatch.setattr(telemetry, "raw_row", raw_row)
    monkeypatch.setattr(telemetry, "bigtable_cells", bigtable_cells)
    messages = [msg(reading(T0 + i * 1000, i, t=20.0 + i), f"g{i}") for i in range(3)]
    messages += [msg(reading(T0, 7, raw_bug=1.0), "r0"), msg(reading(T0, 8, cells_bug=1.0), "c0")]
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(messages, reshuffle=False) | ProcessTelemetry(settings())
    assert_that(out["errors"] | "Reasons" >> beam.Map(
        lambda kv: (kv[0], kv[1]["error"], re.sub(r":\d+\)$", ":N)", kv[1]["detail"]), kv[1]["device_id"],
                    kv[1]["payload"] is not None)),
        equal_to([("r0", "internal_error", "RawRows: IndexError in raw_row (test_transforms.py:N)", "dev-1", True),
                  ("c0", "internal_error", "BigtableCells: TypeError in bigtable_cells (test_transforms.py:N)",
                   "dev-1", True)]), label="errors")
    assert_that(out["raw"] | "Ids" >> beam.Map(lambda kv: kv[1]["message_id"]),
                equal_to(["g0", "g1", "g2", "c0"]), label="raw")
    assert_that(out["bigtable"] | "Keys" >> beam.Map(lambda kc: kc[0].decode().rsplit("#", 1)[1]),
                equal_to(["0000000000", "0000000001", "0000000002", "0000000007"]), label="bigtable")
    result = p.run()
    result.wait_until_finish()
    counters: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("telemetry"))["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed  # summed over the steps
    assert counters["rejected_internal_error"] == 2 and counters["accepted"] == 5


# ------------------------------------------------------------------------------ streaming (TestStream)


def minute_row(device: str, metric: str, start_ms: int, values: list[float], timing: str) -> dict[str, object]:
    return {"device_id": device, "metric": metric,
            "window_start": telemetry.rfc3339(start_ms * 1000),
            "window_end": telemetry.rfc3339((start_ms + 60_000) * 1000),
            "count": len(values), "min": min(values), "max": max(values), "mean": sum(values) / len(values),
            "pane_timing": timing}


def test_windows_on_time_late_and_too_late_with_duplicates_and_disorder(clock):
    """Allowed lateness 120 s. Window [T0, T0+60s) gets on-time readings out of order and a duplicate, fires at the
    watermark, then a late reading (within the lateness) fires a LATE pane with that reading alone; a reading
    after the lateness has expired is dropped from the aggregates but still lands in telemetry_raw."""
    T0 = minute_boundary_ms(clock.time())  # noqa: N806 - the event-time origin this run's watermark starts at
    s = settings()
    stream = (TestStream()
              .advance_watermark_to(T0 / 1000)
              .add_elements([
                  TimestampedValue(msg(reading(T0 + 30_000, 3, t=30.0), "a3"), T0 / 1000 + 31),
                  TimestampedValue(msg(reading(T0 + 10_000, 1, t=10.0), "a1"), T0 / 1000 + 31),
                  TimestampedValue(msg(reading(T0 + 30_000, 3, t=30.0), "a3-resent"), T0 / 1000 + 32),
                  TimestampedValue(msg(reading(T0 + 20_000, 2, t=20.0), "a2"), T0 / 1000 + 32),
                  TimestampedValue(msg(reading(T0 + 70_000, 4, t=70.0), "b4"), T0 / 1000 + 40),
              ])
              .advance_watermark_to(T0 / 1000 + 61)  # closes [T0, T0+60)
              .add_elements([TimestampedValue(msg(reading(T0 + 50_000, 5, t=50.0), "late5"), T0 / 1000 + 62)])
              .add_elements([TimestampedValue(msg(reading(T0 + 20_000, 2, t=20.0), "dup-late"), T0 / 1000 + 63)])
              .advance_watermark_to(T0 / 1000 + 200)  # [T0, T0+60) expired: 60 + 120 < 200
              .add_elements([TimestampedValue(msg(reading(T0 + 40_000, 6, t=40.0), "too-late6"), T0 / 1000 + 201)])
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        out = p | stream | ProcessTelemetry(s)
        assert_that(out["minute"] | beam.Values(), equal_to([
            minute_row("dev-1", "t", T0, [10.0, 20.0, 30.0], "ON_TIME"),
            minute_row("dev-1", "t", T0, [50.0], "LATE"),
            minute_row("dev-1", "t", T0 + 60_000, [70.0], "ON_TIME"),
        ]), label="minutes")
        assert_that(out["raw"] | "MessageIds" >> beam.Map(lambda kv: kv[1]["message_id"]),
                    equal_to(["a3", "a1", "a2", "b4", "late5", "too-late6"]), label="raw")
        assert_that(out["minute"] | "InsertIds" >> beam.Keys(),
                    equal_to([f"dev-1|t|{T0 * 1000}|0", f"dev-1|t|{T0 * 1000}|1", f"dev-1|t|{(T0 + 60_000) * 1000}|0"]),
                    label="insert ids")


def test_config_requests_rate_limited_per_device(clock):
    """Rule temperature > 80, interval 60 s of event time: per device one request per minute of its readings."""
    from iotbridge.spec import parse_config_request

    T0 = minute_boundary_ms(clock.time())  # noqa: N806 - the event-time origin of this run
    other = {**ATTRS, "deviceId": "dev-2"}
    stream = (TestStream()
              .advance_watermark_to(T0 / 1000)
              .add_elements([msg(reading(T0, 1, temperature=90.0), "1")])
              .add_elements([msg(reading(T0 + 10_000, 2, temperature=95.0), "2"),  # within 60 s: suppressed
                             msg(reading(T0 + 20_000, 1, temperature=99.0), "3", other),  # another device: sent
                             msg(reading(T0 + 30_000, 3, temperature=20.0), "4")])  # no breach
              .add_elements([msg(reading(T0 + 60_000, 4, temperature=85.0), "5")])  # 60 s later: sent again
              .add_elements([msg(reading(T0 + 60_000, 4, temperature=85.0), "6")])  # duplicate: dropped before the rule
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        out = p | stream | ProcessTelemetry(settings())
        requests = out["requests"] | beam.Map(lambda m: (
            parse_config_request(m.data).device_id, parse_config_request(m.data).data, m.attributes["rules"]))
        assert_that(requests, equal_to([
            ("dev-1", b'{"fan":"max"}', "temperature>80"),
            ("dev-2", b'{"fan":"max"}', "temperature>80"),
            ("dev-1", b'{"fan":"max"}', "temperature>80"),
        ]))


def test_config_requests_are_what_the_config_push_function_accepts(monkeypatch):
    """The loop-back contract: the pipeline's request body parses in functions/config_push/main.py unchanged."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "functions" / "config_push" / "main.py"
    spec = importlib.util.spec_from_file_location("config_push_main_for_pipeline_test", path)
    assert spec and spec.loader
    fn = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fn)  # its dataclasses look their module up there
    spec.loader.exec_module(fn)
    rs = rules.parse_rules('{"temperature": {"above": 80, "config": {"fan": "max", "limits": {"rpm": 900}}}}')
    r = telemetry.parse(json.dumps(reading(T0, 1, temperature=99.0)).encode(), ATTRS, "m", 0)
    config, _ = rules.evaluate(r, rs)
    req = fn.parse_request(rules.config_request(r.device_id, config))
    assert req.device_id == "dev-1"
    assert json.loads(req.data) == {"fan": "max", "limits": {"rpm": 900}}


def test_rows_have_exactly_the_columns_of_the_shared_spec():
    from apache_beam.transforms.window import IntervalWindow
    from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

    from dataflow_jobs.telemetry_pipeline import FormatMinuteRow
    from iotbridge.spec import TABLES

    r = telemetry.parse(json.dumps({**reading(T0, 1, t=1.0), "fw": "1"}).encode(), ATTRS, "m", 0)
    assert list(telemetry.raw_row(r)) == TABLES["telemetry_raw"].column_names()
    err = telemetry.error_row("bad_ts", "x", b"{}", ATTRS, "m", 0)
    assert list(err) == TABLES["telemetry_errors"].column_names()
    pane = PaneInfo(True, True, PaneInfoTiming.ON_TIME, 0, 0)
    ((_, row),) = FormatMinuteRow().process((("dev-1", "t"), (2, 1.5, 1.0, 2.0)),
                                            win=IntervalWindow(T0 / 1000, T0 / 1000 + 60), pane=pane)
    assert list(row) == TABLES["telemetry_1m"].column_names()
    assert (row["count"], row["mean"], row["pane_timing"]) == (2, 1.5, "ON_TIME")


def test_minute_stats_stay_finite_when_a_sum_overflows():
    """Two finite readings whose sum is not (1.5e308 twice) made an infinite mean: a telemetry_1m row BigQuery refuses
    (JSON has no Infinity), its batch retried for ever. The mean is the running mean then, within [min, max]."""
    from dataflow_jobs.telemetry_pipeline import MinMaxMean

    fn = MinMaxMean()

    def of(values, acc=None):
        for v in values:
            acc = fn.add_input(fn.create_accumulator() if acc is None else acc, v)
        return acc

    big = 1.5e308
    assert fn.extract_output(of([big, big])) == (2, big, big, big)
    n, mean, lo, hi = fn.extract_output(fn.merge_accumulators([of([big]), of([big, -big, big])]))
    assert (n, lo, hi) == (4, -big, big) and math.isfinite(mean) and lo <= mean <= hi, mean
    json.dumps({"mean": mean}, allow_nan=False)  # what BigQuery is sent
    # ordinary values keep the exact sum over the count
    assert fn.extract_output(fn.merge_accumulators([of([1.0, 2.0]), of([0.1, 0.2])])) == (4, (3.0 + 0.3) / 4, 0.1, 2.0)
    # a job updated in place: the previous version's (count, sum, min, max) accumulator is read on
    assert fn.extract_output(fn.add_input((2, 3.0, 1.0, 2.0), 4.0)) == (3, 7.0 / 3, 1.0, 4.0)

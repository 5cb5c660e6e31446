"""Payload profiles: telemetry-v1, json and raw, chosen per registry and subfolder, on plain calls and in the
pipeline (beam.Create on the FnApiRunner, TestStream on the BundleBasedDirectRunner)."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from dataflow_jobs import telemetry
from dataflow_jobs.telemetry_pipeline import ProcessTelemetry
from iotbridge import spec
from tests.dataflow import proto_decoder
from tests.dataflow.test_transforms import ATTRS, T0, minute_boundary_ms, minute_row, msg, settings, streaming_pipeline

PUBLISH_US = T0 * 1000 + 7_000_123
DECODER = "tests.dataflow.proto_decoder:decode"


def profiles(text: str) -> tuple[spec.Profile, ...]:
    return spec.parse_payload_profiles(json.dumps({"default": json.loads(text)})).default


def read(data: bytes | object, profile_list: str | None = None, attrs: dict[str, str] | None = None,
         mid: str = "m1") -> telemetry.Reading:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    chosen = spec.DEFAULT_PROFILES if profile_list is None else profiles(profile_list)
    return telemetry.read(raw, ATTRS if attrs is None else attrs, mid, PUBLISH_US, chosen)


def rejected(data: bytes | object, profile_list: str | None = None) -> telemetry.Rejected:
    with pytest.raises(telemetry.Rejected) as exc:
        read(data, profile_list)
    return exc.value


# --------------------------------------------------------------------------------------------- json


def test_googles_example_payload_is_read_by_the_default_profiles():
    """{"temperature": 21}: no ts, no metrics; telemetry-v1 alone refuses it, the default list reads it as json."""
    r = read({"temperature": 21})
    assert (r.profile, r.metrics, r.event_time_us, r.event_time_source) == \
        ("json", {"temperature": 21.0}, PUBLISH_US, "publish_time")
    assert rejected({"temperature": 21}, '["telemetry-v1"]').reason == "missing_ts"  # the old behaviour, kept
    row = telemetry.raw_row(r)
    assert (row["profile"], row["event_time_source"]) == ("json", "publish_time")
    assert base64.b64decode(row["payload"]) == b'{"temperature": 21}'
    assert row["event_time"] == telemetry.rfc3339(PUBLISH_US)


def test_json_leaves_become_metrics_and_labels_by_path():
    doc = {"motor": {"rpm": 1200, "on": True, "fault": False, "model": "M-7", "extra": None},
           "fans": [1, 2.5], "site": "plant-1", "huge": 10**400, "x" * 200: 1}
    r = read(doc)
    assert r.metrics == {"motor.rpm": 1200.0, "motor.on": 1.0, "motor.fault": 0.0, "fans.0": 1.0, "fans.1": 2.5}
    assert r.labels == {"motor.model": "M-7", "site": "plant-1"}
    row = telemetry.raw_row(r)
    assert row["labels"] == [{"name": "motor.model", "value": "M-7"}, {"name": "site", "value": "plant-1"}]
    assert json.loads(base64.b64decode(row["payload"])) == json.loads(json.dumps(doc))  # nothing lost


@pytest.mark.parametrize("value,unit,want_us", [
    ("2026-11-29T18:00:00.250Z", "auto", 1_795_975_200_250_000),
    ("2026-11-29T19:00:00.250+01:00", "rfc3339", 1_795_975_200_250_000),
    (1_795_975_200, "auto", 1_795_975_200_000_000),
    (1_795_975_200.25, "auto", 1_795_975_200_250_000),
    (1_795_975_200_250, "auto", 1_795_975_200_250_000),
    (1_795_975_200_250_000, "auto", 1_795_975_200_250_000),
    (1_795_975_200, "s", 1_795_975_200_000_000),
    (1_795_975_200_250, "ms", 1_795_975_200_250_000),
    (1_795_975_200_250_000, "us", 1_795_975_200_250_000),
    (5, "s", 5_000_000),  # an explicit unit beats the magnitude rule
])
def test_json_event_time_from_a_configured_field(value, unit, want_us):
    option = {"profile": "json", "time_field": "meta.sampled_at", **({"time_unit": unit} if unit != "auto" else {})}
    r = read({"meta": {"sampled_at": value, "fw": "2.1"}, "t": 20.5}, json.dumps([option]))
    assert (r.event_time_us, r.event_time_source) == (want_us, "payload")
    assert r.metrics == {"t": 20.5} and r.labels == {"meta.fw": "2.1"}  # the time field is not a metric


@pytest.mark.parametrize("doc,unit,reason", [
    ({"t": 1}, "auto", "missing_event_time"),
    ({"time": "yesterday", "t": 1}, "auto", "bad_event_time"),
    ({"time": "2026-11-29T18:00:00", "t": 1}, "auto", "bad_event_time"),  # no offset
    ({"time": True, "t": 1}, "auto", "bad_event_time"),
    ({"time": -5, "t": 1}, "auto", "bad_event_time"),
    ({"time": 1_795_975_200, "t": 1}, "rfc3339", "bad_event_time"),
    ({"time": "2026-11-29T18:00:00Z", "t": 1}, "ms", "bad_event_time"),
    ({"time": 10**13, "t": 1}, "ms", "bad_event_time"),  # past 2286
])
def test_json_time_field_problems_have_reasons(doc, unit, reason):
    option = {"profile": "json", "time_field": "time", **({"time_unit": unit} if unit != "auto" else {})}
    assert rejected(doc, json.dumps([option])).reason == reason


def test_a_broken_telemetry_v1_payload_is_not_read_as_json():
    """ts or metrics mark a telemetry-v1 message: a firmware bug shows up in telemetry_errors, not as a json row
    whose event time silently became the publish time."""
    assert rejected({"ts": "soon", "metrics": {"t": 1}}).reason == "bad_ts"
    assert rejected({"ts": 1795975200000, "temperature": 1}).reason == "missing_metrics"
    assert rejected({"metrics": {"t": 1}}).reason == "missing_ts"


def test_unreadable_by_every_profile_keeps_the_first_reason_and_every_detail():
    exc = rejected(b"[1, 2]")
    assert exc.reason == "not_an_object"
    assert "telemetry-v1: not_an_object" in exc.detail and "json: not_an_object" in exc.detail
    exc = rejected({"t": 1}, '["telemetry-v1", {"profile": "json", "time_field": "time"}]')
    assert exc.reason == "missing_ts" and "json: missing_event_time" in exc.detail


# ---------------------------------------------------------------------------------------------- raw


def test_raw_keeps_the_bytes_as_they_came():
    data = b"\x08\x96\x01\xff\x00binary"
    assert rejected(data).reason == "invalid_json"  # the default list has no raw
    r = read(data, '["telemetry-v1", "json", "raw"]')
    assert (r.profile, r.metrics, r.event_time_us, r.event_time_source) == ("raw", {}, PUBLISH_US, "publish_time")
    assert base64.b64decode(telemetry.raw_row(r)["payload"]) == data
    key, cells = telemetry.bigtable_cells(r)
    assert ("p", b"raw", data, PUBLISH_US // 1000 * 1000) in cells
    assert key == f"dev-1#{PUBLISH_US // 1000:013d}#mm1".encode()


def test_raw_with_a_decoder_reads_protobuf_as_json_would():
    data = proto_decoder.encode({"temperature": 81.5, "motor": {"rpm": 900}, "at": "2026-11-29T18:00:00Z",
                                 "state": "run"})
    r = read(data, json.dumps([{"profile": "raw", "decoder": DECODER, "time_field": "at"}]))
    assert (r.profile, r.event_time_us, r.event_time_source) == ("raw", 1_795_975_200_000_000, "payload")
    assert r.metrics == {"temperature": 81.5, "motor.rpm": 900.0} and r.labels == {"state": "run"}
    assert r.payload == data
    assert ("p", b"raw", data, 1_795_975_200_000_000) in telemetry.bigtable_cells(r)[1]


def test_a_failing_decoder_hands_the_message_to_the_next_profile():
    listed = json.dumps(["telemetry-v1", {"profile": "raw", "decoder": DECODER}, "json"])
    assert read({"t": 1}, listed).profile == "json"  # JSON text is not a valid Struct: the decoder raises
    exc = rejected(b"\xff\xff\xff", listed)
    assert exc.reason == "invalid_json" and "raw: decoder_failed" in exc.detail


def test_a_decoder_string_that_is_not_unicode_text_is_refused():
    """A decoder can return what JSON never does: a str with an unpaired surrogate. UTF-8 cannot encode it, so the
    reading could be written neither to BigQuery nor as a Bigtable qualifier; refused as the decoder's failure."""
    listed = json.dumps([{"profile": "raw", "decoder": "tests.dataflow.proto_decoder:text_fields"}])
    r = read(b"temperature=21.5\nsite=h\xc3\xa4lle", listed)
    assert r.metrics == {"temperature": 21.5} and r.labels == {"site": "h\u00e4lle"}
    for data in (b"temperature=21.5\nsite=h\xe4lle", b"t\xff=1"):  # latin-1, not UTF-8: in a label, in a name
        exc = rejected(data, listed)
        assert exc.reason == "decoder_failed" and "not Unicode text" in exc.detail


def test_an_error_detail_quoting_text_that_is_not_unicode_is_written_escaped():
    """A decoder's exception can quote bytes as unpaired surrogates; the error row's detail must still be UTF-8 (a
    BigQuery STRING), or the dead letters themselves would fail their bundle."""
    exc = rejected(b"t=\xff", json.dumps([{"profile": "raw", "decoder": "tests.dataflow.proto_decoder:quoting"}]))
    assert exc.reason == "decoder_failed" and "\udcff" in exc.detail
    row = telemetry.error_row(exc.reason, exc.detail, b"t=\xff", ATTRS, "m1", PUBLISH_US)
    assert row["detail"].endswith("ValueError: not a reading: t=\\udcff")
    row["detail"].encode("utf-8")  # raises on an unpaired surrogate


# ---------------------------------------------------------------------------------- lists and dedupe


def test_profiles_per_registry_and_subfolder():
    p = spec.parse_payload_profiles(json.dumps({
        "registries": {"plant": ["json"]},
        "subfolders": {"plant/blobs": ["raw"], "fleet/engine": [{"profile": "json", "time_field": "t"}]}}))
    assert p.for_message("fleet", None) == spec.DEFAULT_PROFILES
    assert p.for_message("plant", None) == p.for_message("plant", "other") == (spec.Profile("json"),)
    assert p.for_message("plant", "blobs") == (spec.Profile("raw"),)
    assert p.for_message("fleet", "engine") == (spec.Profile("json", "t"),)
    assert spec.parse_payload_profiles(p.to_json()) == p
    assert spec.parse_payload_profiles("{}") == spec.PayloadProfiles()


@pytest.mark.parametrize("doc,fragment", [
    ([], "must be a JSON object"),
    ({"defaults": []}, "unknown keys ['defaults']"),
    ({"default": []}, "default: must be a non-empty list"),
    ({"default": ["xml"]}, "default[0]: profile 'xml' is not one of telemetry-v1, json, raw"),
    ({"default": ["json", "json"]}, "default: a profile appears twice"),
    ({"default": [{"profile": "telemetry-v1", "time_field": "t"}]}, "telemetry-v1 takes no options"),
    ({"default": [{"profile": "json", "time_field": "a..b"}]}, "time_field must be a dotted path"),
    ({"default": [{"profile": "json", "time_unit": "ms"}]}, "time_unit needs a time_field"),
    ({"default": [{"profile": "json", "time_field": "t", "time_unit": "ns"}]}, "time_unit 'ns' is not one of"),
    ({"default": [{"profile": "json", "decoder": "a:b"}]}, "only the raw profile takes a decoder"),
    ({"default": [{"profile": "raw", "decoder": "a.b"}]}, "is not an import path module:function"),
    ({"default": [{"profile": "raw", "time_field": "t"}]}, "reads a time_field only through its decoder"),
    ({"default": [{"profile": "json", "when": 1}]}, "unknown keys ['when']"),
    ({"registries": {"a/b": ["json"]}}, "registries: 'a/b' is not a registry id"),
    ({"subfolders": {"plant": ["json"]}}, "subfolders: 'plant' is not registry/subfolder"),
    ({"registries": {"plant": []}}, "registries.plant: must be a non-empty list"),
])
def test_profile_descriptions_are_refused_naming_the_entry(doc, fragment):
    with pytest.raises(spec.ProfileError) as exc:
        spec.parse_payload_profiles(json.dumps(doc))
    assert fragment in str(exc.value)


def test_dedupe_keys_without_seq():
    timed = '[{"profile": "json", "time_field": "ts_ms"}]'
    a = read({"ts_ms": T0, "t": 1}, timed, mid="1")
    b = read({"ts_ms": T0, "t": 1}, timed, mid="2")  # a resend: same time and content, new message id
    c = read({"ts_ms": T0, "t": 2}, timed, mid="3")
    assert a.dedupe_key == b.dedupe_key != c.dedupe_key
    # Without a device time, the Pub/Sub message id identifies a redelivery (same id, same publish time).
    untimed = [read({"t": 1}, mid=m) for m in ("9", "9", "10")]
    assert untimed[0].dedupe_key == untimed[1].dedupe_key == f"dev-1#{PUBLISH_US // 1000:013d}#m9"
    assert untimed[2].dedupe_key != untimed[0].dedupe_key


def test_the_flag_carries_profiles_and_refuses_bad_ones_in_one_line(capsys):
    text = json.dumps({"registries": {"fleet": ["json", {"profile": "raw", "decoder": DECODER}]}})
    assert settings(payload_profiles=text).profiles.for_message("fleet", None)[1].decoder == DECODER
    assert settings().profiles == spec.PayloadProfiles()
    for bad, fragment in [('{"default": ["xml"]}', "--payload_profiles: default[0]: profile 'xml'"),
                          ('{"default": [{"profile": "raw", "decoder": "tests.dataflow.nowhere:decode"}]}',
                           "decoder tests.dataflow.nowhere:decode cannot be loaded"),
                          ('{"default": [{"profile": "raw", "decoder": "tests.dataflow.proto_decoder:NOT_CALLABLE"}]}',
                           "is not callable")]:
        with pytest.raises(SystemExit):
            settings(payload_profiles=bad)
        err = capsys.readouterr().err
        assert fragment in err, err


# ------------------------------------------------------------------------------------ in the pipeline


FLEET = {**ATTRS, "deviceId": "v1-dev"}
FLAT = {**ATTRS, "deviceId": "flat-dev"}
PLANT = {**ATTRS, "deviceId": "plant-dev", "deviceRegistryId": "plant"}
PROTO = {**ATTRS, "deviceId": "proto-dev", "subFolder": "proto"}
BLOB = {**ATTRS, "deviceId": "blob-dev", "subFolder": "blob"}
PIPELINE_PROFILES = json.dumps({
    "registries": {"plant": [{"profile": "json", "time_field": "meta.sampled_at"}]},
    "subfolders": {"fleet/proto": [{"profile": "raw", "decoder": DECODER, "time_field": "at"}],
                   "fleet/blob": ["raw"]}})


def rfc3339_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_every_profile_in_one_pipeline_on_create():
    messages = [
        msg({"ts": T0 + 1000, "metrics": {"temperature": 20.0}, "seq": 1}, "v1", FLEET),
        msg({"temperature": 21.0, "ok": True}, "flat", FLAT, publish_ms=T0 + 2000),
        msg({"meta": {"sampled_at": rfc3339_ms(T0 + 3000)}, "boiler": {"temperature": 70.5}}, "plant", PLANT),
        msg(proto_decoder.encode({"temperature": 90.0, "at": rfc3339_ms(T0 + 4000)}), "proto", PROTO),
        msg(b"\x00\x01opaque", "blob", BLOB),
        msg(b"\x00\x01opaque", "garbage", FLAT),  # the default list cannot read bytes
        msg({"ts": "soon", "metrics": {"t": 1}}, "broken-v1", FLEET),
        msg({"temperature": 5}, "plant-no-time", PLANT),  # plant's only profile needs meta.sampled_at
    ]
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(messages) | ProcessTelemetry(settings(payload_profiles=PIPELINE_PROFILES))
    assert_that(out["raw"] | "Rows" >> beam.Map(lambda kv: (kv[1]["message_id"], kv[1]["profile"],
                                                             kv[1]["event_time_source"], kv[1]["event_time"])),
                equal_to([("v1", "telemetry-v1", "payload", telemetry.rfc3339((T0 + 1000) * 1000)),
                          ("flat", "json", "publish_time", telemetry.rfc3339((T0 + 2000) * 1000)),
                          ("plant", "json", "payload", telemetry.rfc3339((T0 + 3000) * 1000)),
                          ("proto", "raw", "payload", telemetry.rfc3339((T0 + 4000) * 1000)),
                          ("blob", "raw", "publish_time", telemetry.rfc3339(T0 * 1000))]), label="raw")
    assert_that(out["errors"] | "Reasons" >> beam.Map(lambda kv: (kv[0], kv[1]["error"])),
                equal_to([("garbage", "invalid_json"), ("broken-v1", "bad_ts"),
                          ("plant-no-time", "missing_event_time")]), label="errors")
    assert_that(out["minute"] | "Metrics" >> beam.Map(lambda kv: (kv[1]["device_id"], kv[1]["metric"],
                                                                   kv[1]["count"], kv[1]["mean"])),
                equal_to([("v1-dev", "temperature", 1, 20.0), ("flat-dev", "temperature", 1, 21.0),
                          ("flat-dev", "ok", 1, 1.0), ("plant-dev", "boiler.temperature", 1, 70.5),
                          ("proto-dev", "temperature", 1, 90.0)]), label="minute")
    assert_that(out["requests"] | "Requested" >> beam.Map(lambda m: json.loads(m.data)["device_id"]),
                equal_to(["proto-dev"]), label="requests")  # the rule reads decoded metrics too
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("telemetry"))["counters"]}
    assert {k: v for k, v in counters.items() if k.startswith("accepted")} == {
        "accepted": 5, "accepted_telemetry-v1": 1, "accepted_json": 2, "accepted_raw": 2}


def test_redelivery_and_resend_dedupe_per_profile(clock):
    """A Pub/Sub redelivery (same message id) of an untimed json message and a resend (new id) of a timed one are
    dropped; the same untimed bytes under a new id are a new reading (nothing in them says otherwise)."""
    t0 = minute_boundary_ms(clock.time())
    timed = {"meta": {"sampled_at": rfc3339_ms(t0 + 5000)}, "t": 1.0}
    stream = (TestStream()
              .advance_watermark_to(t0 / 1000)
              .add_elements([msg({"t": 1.0}, "u1", FLAT, publish_ms=t0 + 1000),
                             msg(timed, "p1", PLANT, publish_ms=t0 + 6000)])
              .add_elements([msg({"t": 1.0}, "u1", FLAT, publish_ms=t0 + 1000),  # redelivered
                             msg(timed, "p2", PLANT, publish_ms=t0 + 9000),  # resent by the device
                             msg({"t": 1.0}, "u2", FLAT, publish_ms=t0 + 20_000)])  # a new message
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        out = p | stream | ProcessTelemetry(settings(payload_profiles=PIPELINE_PROFILES))
        assert_that(out["raw"] | beam.Map(lambda kv: kv[1]["message_id"]), equal_to(["u1", "p1", "u2"]),
                    label="raw")
        assert_that(out["minute"] | beam.Values(), equal_to([
            minute_row("flat-dev", "t", t0, [1.0, 1.0], "ON_TIME"),
            minute_row("plant-dev", "t", t0, [1.0], "ON_TIME")]), label="minute")


def test_rows_of_every_profile_have_the_columns_of_the_shared_spec():
    columns = spec.TABLES["telemetry_raw"].column_names()
    for r in (read({"ts": T0, "metrics": {"t": 1}}), read({"t": 1}), read(b"\x00", '["raw"]')):
        assert list(telemetry.raw_row(r)) == columns
        assert {c[0] for c in telemetry.bigtable_cells(r)[1]} <= set(spec.BIGTABLE.column_families)


def test_bigtable_cells_say_which_profile_read_the_message():
    cells = telemetry.bigtable_cells(read({"motor": {"rpm": 5}, "site": "x"}))[1]
    ts = PUBLISH_US // 1000 * 1000
    assert ("a", b"profile", b"json", ts) in cells and ("a", b"event_time_source", b"publish_time", ts) in cells
    assert ("m", b"motor.rpm", struct.pack(">d", 5.0), ts) in cells and ("l", b"site", b"x", ts) in cells


# ------------------------------------------------------------------------- decoding edge cases (orjson, then json)


def test_a_payload_nested_deeper_than_any_decoder_goes_is_invalid_json_not_a_crash():
    deep = b"[" * 5000 + b"]" * 5000
    assert rejected(deep).reason == "invalid_json"
    assert rejected(b'{"a": ' * 5000 + b"1" + b"}" * 5000).reason == "invalid_json"


def test_numbers_orjson_refuses_are_decided_as_the_standard_library_does():
    # 1e999 is a JSON number beyond a double: the standard library reads it as infinity, which no metric may be.
    assert rejected(b'{"ts": 1795000020000, "metrics": {"t": 1e999}}').reason == "bad_metric_value"
    # An integer beyond a double's range is not a metric the json profile can keep; the payload column keeps it.
    r = read(b'{"big": ' + b"9" * 400 + b', "t": 2}')
    assert (r.metrics, r.payload[:8]) == ({"t": 2.0}, b'{"big": ')
    assert rejected(b'{"ts": 1795000020000, "metrics": {"t": ' + b"9" * 400 + b"}}").reason == "bad_metric_value"
    # NaN and Infinity are not JSON (RFC 8259), whichever decoder reads them.
    assert rejected(b'{"ts": 1795000020000, "metrics": {"t": NaN}}').reason == "invalid_json"
    assert rejected(b'{"t": Infinity}').reason == "invalid_json"


def test_a_float_subclass_from_a_decoder_is_a_metric_like_a_float():
    class Reading(float):
        pass

    metrics, labels = telemetry.flatten({"a": {"b": Reading(2.5)}, "c": [True, "x", None]})
    assert (metrics, labels) == ({"a.b": 2.5, "c.0": 1.0}, {"c.1": "x"})

"""bench/pipeline_cost.py times each profile on the path it is meant to: the same readings in each encoding."""

from __future__ import annotations

from bench import pipeline_cost
from dataflow_jobs import telemetry
from iotbridge import spec

WANT = {  # set -> (profile that reads it, where its event time comes from, metrics kept)
    "telemetry-v1": ("telemetry-v1", "payload", True),
    "json flat, publish time": ("json", "publish_time", True),
    "json nested, RFC 3339 field": ("json", "payload", True),
    "raw bytes": ("raw", "publish_time", False),
    "raw + protobuf decoder": ("raw", "payload", True),
}


def test_each_profile_set_is_read_by_its_profile_with_the_same_readings():
    msgs = pipeline_cost.payloads(40)
    sets = pipeline_cost.profile_sets(msgs)
    assert set(sets) == set(WANT)
    v1 = [telemetry.parse(d, a, "1", 0) for d, a in msgs]
    for name, (text, items, texts) in sets.items():
        profiles = spec.parse_payload_profiles(text).default
        readings = [telemetry.read(d, a, "1", 5_000_000, profiles) for d, a in items]
        profile, source, with_metrics = WANT[name]
        assert {(r.profile, r.event_time_source) for r in readings} == {(profile, source)}, name
        assert len(texts) == len(items) == len(msgs)
        if with_metrics:  # the same values whatever the encoding (nested ones under their path)
            assert [sorted(r.metrics.values()) for r in readings] == [sorted(r.metrics.values()) for r in v1], name
        if source == "payload" and name != "telemetry-v1":
            assert [r.event_time_us // 1000 for r in readings] == [r.event_time_us // 1000 for r in v1], name

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


def test_the_dofn_figure_runs_bundles_whose_counters_reach_a_metrics_container():
    """The DoFn figure times what a worker pays for counters: its bundles update a real metrics container."""
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.metrics.metricbase import MetricName
    from apache_beam.utils.timestamp import Timestamp

    from dataflow_jobs.telemetry_pipeline import ParseTelemetry

    msgs = [PubsubMessage(d, a, message_id="1") for d, a in pipeline_cost.payloads(250)]
    msgs.append(PubsubMessage(b"[1]", msgs[0].attributes, message_id="2"))
    sampler, container, states = pipeline_cost.worker_step("Parse")
    sampler.start()
    try:
        run_bundle = pipeline_cost.dofn_bundle_runner(ParseTelemetry(), states, Timestamp(micros=5_000_000))
        for i in range(0, len(msgs), pipeline_cost.BUNDLE):
            run_bundle(msgs[i:i + pipeline_cost.BUNDLE])
    finally:
        sampler.stop()
    counters = {k.metric: v for k, v in container.get_cumulative().counters.items()}
    assert counters == {MetricName("telemetry", "accepted"): 250, MetricName("telemetry", "accepted_telemetry-v1"): 250,
                        MetricName("telemetry", "rejected_not_an_object"): 1}

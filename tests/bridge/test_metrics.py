"""The connected-devices gauge the monitoring component alerts on (custom.googleapis.com/iot/connected_devices)."""

from __future__ import annotations

import json
import time

import pytest

from iotbridge.bridge import metrics
from iotbridge.bridge.settings import BridgeSettings


class FakeMetricClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def create_time_series(self, name: str, time_series: list) -> None:
        self.calls.append((name, time_series))


def test_reporter_writes_one_gauge_point_on_the_gce_instance():
    client = FakeMetricClient()
    reporter = metrics.ConnectedDevicesReporter("acme-iot", "fleet", "iot-prod-broker-x1z",
                                                {"instance_id": "123", "zone": "europe-west1-b"}, client=client)
    now = time.time()  # Cloud Monitoring refuses points older than 25 hours: the reporter is given the present
    reporter.report(42, now=now)
    ((name, (ts,)),) = client.calls
    assert name == "projects/acme-iot"
    assert ts.metric.type == "custom.googleapis.com/iot/connected_devices"
    assert dict(ts.metric.labels) == {"registry_id": "fleet", "host": "iot-prod-broker-x1z"}
    assert ts.resource.type == "gce_instance"
    assert dict(ts.resource.labels) == {"project_id": "acme-iot", "instance_id": "123", "zone": "europe-west1-b"}
    (point,) = ts.points
    assert point.value.int64_value == 42
    assert point.interval.end_time.timestamp() == pytest.approx(now)


def test_instance_labels_come_from_the_metadata_server():
    answers = {"id": "4711", "zone": "projects/123456789012/zones/us-central1-b"}
    assert metrics.gce_instance_labels(fetch=answers.__getitem__) == {"instance_id": "4711", "zone": "us-central1-b"}


def test_the_metric_matches_what_the_monitoring_component_declares():
    from gcp_iot_bridge.infra import monitoring

    assert monitoring.CONNECTED_DEVICES_METRIC == metrics.METRIC_TYPE


def test_cloud_hosts_write_the_gauge():
    from gcp_iot_bridge.infra import broker

    script = broker.startup_script(
        project="p-1", region="europe-west1", registry_id="fleet", prefix="iot", code_url="gs://b/code.zip",
        tls_key_secret="k", passwords_secret="s", server_cert_pem="PEM", database="(default)", routes={},
        health_port=8080)
    settings = json.loads(script.split("<<'JSON'\n", 1)[1].split("\nJSON", 1)[0])
    assert settings["connected_devices_metric"] == "cloud"
    assert "google-cloud-monitoring==" in broker.code_files()["requirements.txt"]


def test_settings_accept_cloud_or_log_only():
    base = dict(project="p", region="r", registry_id="reg", prefix="iot")
    assert BridgeSettings(**base, connected_devices_metric="cloud").connected_devices_metric == "cloud"
    with pytest.raises(ValueError, match="cloud or log"):
        BridgeSettings(**base, connected_devices_metric="stdout")


def test_broker_queue_gauges_report_what_the_broker_holds_and_the_drops_since_the_previous_point():
    client = FakeMetricClient()
    reporter = metrics.BrokerQueueReporter(metrics.ConnectedDevicesReporter(
        "acme-iot", "fleet", "iot-prod-broker-x1z", {"instance_id": "123", "zone": "europe-west1-b"}, client=client))
    now = time.time()
    for stored, dropped in ((1200, 0), (1100, 250), (1100, 250), (900, 40)):  # the last: the broker restarted
        reporter.report({"broker_stored_messages": stored, "broker_dropped_messages": dropped}, now=now)
    points = [{ts.metric.type: ts.points[0].value.int64_value for ts in series} for _, series in client.calls]
    assert points == [{metrics.BROKER_STORED_METRIC: s, metrics.BROKER_DROPPED_METRIC: d}
                      for s, d in ((1200, 0), (1100, 250), (1100, 0), (900, 40))]
    assert all(dict(ts.metric.labels) == {"registry_id": "fleet", "host": "iot-prod-broker-x1z"}
               for _, series in client.calls for ts in series)

"""The Monitoring component under Pulumi mocks: dashboard, alert policies, notification channel, custom metric.

Built directly (not through the program) with mocks that answer like the Monitoring API for the computed ids the
component reads (dashboard id, uptime check id). Every output is awaited; nothing is asserted inside an apply.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pulumi
import pytest
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from gcp_iot_bridge.infra.monitoring import (
    CONNECTED_DEVICES_METRIC,
    DASHBOARD_FILE,
    METRIC_TYPES,
    Monitoring,
    MonitoringArgs,
    render_dashboard,
)
from iotbridge import spec
from iotbridge.bridge.metrics import BROKER_DROPPED_METRIC, BROKER_STORED_METRIC
from iotbridge.bridge.settings import MAX_QUEUED_MESSAGES
from tests.infra import harness

PROJECT = "my-iot-dev-project"
DASHBOARD_ID = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
UPTIME_ID = "iot-dev-mqtt-endpoint-x1y2z3"

# Which monitored resource each metric is written against (Google's metrics reference).
RESOURCE_OF_METRIC = {
    "pubsub.googleapis.com/subscription/": "pubsub_subscription",
    "pubsub.googleapis.com/topic/": "pubsub_topic",
    "dataflow.googleapis.com/job/": "dataflow_job",
    "run.googleapis.com/": "cloud_run_revision",
    "compute.googleapis.com/instance/": "gce_instance",
    "monitoring.googleapis.com/uptime_check/": "uptime_url",
    CONNECTED_DEVICES_METRIC: "gce_instance",
    BROKER_STORED_METRIC: "gce_instance",
    BROKER_DROPPED_METRIC: "gce_instance",
}


class _ApiLikeMocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict]:
        state = dict(args.inputs)
        if args.typ == "gcp:monitoring/dashboard:Dashboard":
            return f"projects/123456789012/dashboards/{DASHBOARD_ID}", state
        if args.typ == "gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig":
            state["uptimeCheckId"] = UPTIME_ID
            return f"projects/{PROJECT}/uptimeCheckConfigs/{UPTIME_ID}", state
        if args.typ == "gcp:monitoring/alertPolicy:AlertPolicy":
            state["name"] = f"projects/{PROJECT}/alertPolicies/{args.name}"
        if args.typ == "gcp:monitoring/notificationChannel:NotificationChannel":
            state["name"] = f"projects/{PROJECT}/notificationChannels/{args.name}"
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list[tuple[str, str]] | None]:
        raise NotImplementedError(args.token)


def build(**overrides: Any) -> tuple[list[harness.Resource], dict[str, Any]]:
    """Declare one Monitoring component under mocks; return the registrations and its awaited outputs."""
    mocks = _ApiLikeMocks()
    monitor = harness._RecordingMonitor(mocks)
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project=harness.PROJECT_NAME, stack="dev", preview=False, monitor=monitor)
    made: dict[str, Monitoring] = {}

    def body() -> None:
        args: dict[str, Any] = dict(project=PROJECT, prefix="iot-dev", dataflow_job_name="iot-dev-telemetry",
                    config_push_function="iot-dev-config-push", mqtt_host="mqtt.iot-dev.example.com",
                    notification_email="oncall@example.com",
                    labels={"app": "gcp-iot-bridge", "stack": "dev", "managed-by": "pulumi"})
        args.update(overrides)
        made["m"] = Monitoring("monitoring", MonitoringArgs(**args))

    _sync_await(run_pulumi_func(body))
    m = made["m"]
    outputs = {
        "monitoring_dashboard_url": _sync_await(m.dashboard_url.future()),
        "alert_names": {k: _sync_await(p.name.future()) for k, p in m.alerts.items()},
    }
    return list(monitor.registrations), outputs


@pytest.fixture(scope="module")
def full() -> tuple[list[harness.Resource], dict[str, Any]]:
    return build()


def _of(resources: list[harness.Resource], type_: str) -> list[harness.Resource]:
    return [r for r in resources if r.type == type_]


def _filters(doc: Any) -> list[str]:
    found: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "filter" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_filters(v))
    elif isinstance(doc, list):
        for v in doc:
            found.extend(_filters(v))
    return found


def _check_filter(f: str) -> str:
    """The filter names exactly one known metric type, and the monitored resource that metric lives on."""
    types = re.findall(r'metric\.type = "([^"]+)"', f)
    assert len(types) == 1, f
    metric = types[0]
    assert metric in METRIC_TYPES, metric
    resource = next(r for prefix, r in RESOURCE_OF_METRIC.items() if metric.startswith(prefix))
    assert f'resource.type = "{resource}"' in f, f
    assert "${" not in f and "None" not in f, f
    return metric


def test_dashboard_is_the_repo_json_filled_for_the_stack(full):
    resources, outputs = full
    (dashboard,) = _of(resources, "gcp:monitoring/dashboard:Dashboard")
    doc = json.loads(dashboard.inputs["dashboardJson"])
    assert doc["displayName"] == "IoT bridge (iot-dev)"
    tiles = doc["mosaicLayout"]["tiles"]
    metrics = {_check_filter(f) for f in _filters(doc)}
    assert metrics == METRIC_TYPES  # every metric has a chart, and the uptime tile is kept with a check
    filters = " ".join(_filters(doc))
    assert 'resource.labels.job_name = "iot-dev-telemetry"' in filters
    assert 'resource.labels.service_name = "iot-dev-config-push"' in filters
    assert f'metric.labels.check_id = "{UPTIME_ID}"' in filters
    assert all(t.get("xPos", 0) + t["width"] <= doc["mosaicLayout"]["columns"] for t in tiles)  # 0: left out
    assert outputs["monitoring_dashboard_url"] == (
        f"https://console.cloud.google.com/monitoring/dashboards/builder/{DASHBOARD_ID}?project={PROJECT}")


def test_alert_policies_cover_what_operators_need(full):
    resources, outputs = full
    alerts = {r.name.removeprefix("monitoring-"): r for r in _of(resources, "gcp:monitoring/alertPolicy:AlertPolicy")}
    assert set(alerts) == {"pubsub-oldest-unacked", "pubsub-dead-letters", "dataflow-system-lag",
                           "dataflow-data-freshness", "function-errors", "bigquery-subscription-errors",
                           "broker-host-health", "connected-devices", "broker-queue-filling",
                           "broker-queue-full"}
    assert set(outputs["alert_names"]) == set(alerts)
    (channel,) = _of(resources, "gcp:monitoring/notificationChannel:NotificationChannel")
    assert channel.inputs["type"] == "email" and channel.inputs["labels"] == {"email_address": "oncall@example.com"}
    metric_of_alert: dict[str, set[str]] = {}
    for key, policy in alerts.items():
        assert policy.inputs["notificationChannels"] == [f"projects/{PROJECT}/notificationChannels/{channel.name}"]
        assert policy.inputs["displayName"].startswith("iot-dev: ")
        assert policy.inputs["documentation"]["content"]
        assert policy.inputs["userLabels"]["stack"] == "dev"
        metric_of_alert[key] = {_check_filter(f) for f in _filters(policy.inputs["conditions"])}
    assert metric_of_alert["pubsub-oldest-unacked"] == {"pubsub.googleapis.com/subscription/oldest_unacked_message_age"}
    assert metric_of_alert["pubsub-dead-letters"] == {"pubsub.googleapis.com/subscription/dead_letter_message_count"}
    assert metric_of_alert["dataflow-system-lag"] == {"dataflow.googleapis.com/job/system_lag"}
    assert metric_of_alert["dataflow-data-freshness"] == {"dataflow.googleapis.com/job/data_watermark_age"}
    assert metric_of_alert["function-errors"] == {"run.googleapis.com/request_count"}
    assert metric_of_alert["bigquery-subscription-errors"] == {"pubsub.googleapis.com/subscription/push_request_count"}
    assert metric_of_alert["broker-host-health"] == {CONNECTED_DEVICES_METRIC,
                                                     "monitoring.googleapis.com/uptime_check/check_passed"}
    assert metric_of_alert["connected-devices"] == {CONNECTED_DEVICES_METRIC}
    assert metric_of_alert["broker-queue-filling"] == {BROKER_STORED_METRIC}
    assert metric_of_alert["broker-queue-full"] == {BROKER_DROPPED_METRIC}
    filling = alerts["broker-queue-filling"].inputs["conditions"][0]["conditionThreshold"]
    assert filling["thresholdValue"] == MAX_QUEUED_MESSAGES // 2  # well before the broker starts dropping
    full = alerts["broker-queue-full"].inputs["conditions"][0]["conditionThreshold"]
    assert (full["thresholdValue"], full["comparison"]) == (0, "COMPARISON_GT")  # the first dropped message


def test_subscription_alerts_name_the_real_subscriptions(full):
    resources, _ = full
    alerts = {r.name: r for r in _of(resources, "gcp:monitoring/alertPolicy:AlertPolicy")}
    backlog = _filters(alerts["monitoring-pubsub-oldest-unacked"].inputs["conditions"])[0]
    named = set(re.findall(r'"(iot-dev-[a-z-]+)"', backlog))
    # Backlog age: every subscription a consumer drains, the Dataflow job's input included.
    expected = {spec.subscription_name("iot-dev", k) for k, s in spec.SUBSCRIPTIONS.items()
                if s.cloud and s.topic != "dead-letter"}
    assert named == expected and spec.subscription_name("iot-dev", "telemetry-pipeline") in named
    assert spec.subscription_name("iot-dev", "dead-letter-audit") not in named
    # Dead letters: only the subscriptions that have a dead-letter policy (Dataflow's input has none).
    dead = _filters(alerts["monitoring-pubsub-dead-letters"].inputs["conditions"])[0]
    assert set(re.findall(r'"(iot-dev-[a-z-]+)"', dead)) == {
        spec.subscription_name("iot-dev", k) for k, s in spec.SUBSCRIPTIONS.items() if s.cloud and s.dead_letter}
    bq = _filters(alerts["monitoring-bigquery-subscription-errors"].inputs["conditions"])[0]
    assert 'one_of("iot-dev-device-logs-bigquery")' in bq and 'response_class != "ack"' in bq


def test_custom_metric_exists_before_any_alert_on_it(full):
    """Monitoring refuses an alert on a custom metric type that has no descriptor yet (fresh project)."""
    resources, _ = full
    descriptors = {d.inputs["type"]: d for d in _of(resources, "gcp:monitoring/metricDescriptor:MetricDescriptor")}
    assert set(descriptors) == {CONNECTED_DEVICES_METRIC, BROKER_STORED_METRIC, BROKER_DROPPED_METRIC}
    for metric_type, descriptor in descriptors.items():
        assert descriptor.inputs["metricKind"] == "GAUGE" and descriptor.inputs["valueType"] == "INT64"
        assert {label["key"] for label in descriptor.inputs["labels"]} == {"registry_id", "host"}
        for policy in _of(resources, "gcp:monitoring/alertPolicy:AlertPolicy"):
            if metric_type in json.dumps(policy.inputs["conditions"]):
                assert descriptor.urn in policy.dependencies, policy.name


def test_uptime_check_probes_the_mqtt_port(full):
    resources, _ = full
    (check,) = _of(resources, "gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig")
    assert check.inputs["tcpCheck"] == {"port": 8883.0}
    assert check.inputs["monitoredResource"] == {
        "type": "uptime_url", "labels": {"project_id": PROJECT, "host": "mqtt.iot-dev.example.com"}}


def test_without_endpoint_or_email_the_rest_still_stands():
    resources, outputs = build(mqtt_host=None, notification_email=None)
    assert _of(resources, "gcp:monitoring/notificationChannel:NotificationChannel") == []
    assert _of(resources, "gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig") == []
    alerts = _of(resources, "gcp:monitoring/alertPolicy:AlertPolicy")
    assert len(alerts) == 10
    assert all(not a.inputs.get("notificationChannels") for a in alerts)
    (dashboard,) = _of(resources, "gcp:monitoring/dashboard:Dashboard")
    assert "uptime_check" not in dashboard.inputs["dashboardJson"]
    assert outputs["monitoring_dashboard_url"].endswith(f"/{DASHBOARD_ID}?project={PROJECT}")


def test_policies_pass_on_the_component(full):
    """The policy pack's rules (labels on every labelable resource, secrets...) hold for what Monitoring declares."""
    import sys

    sys.path.insert(0, str(harness.ROOT / "policy"))
    import rules

    resources, _ = full
    ctx = rules.StackContext(stack="dev", protect=False)
    found = rules.evaluate([rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in resources], ctx)
    assert {k: v for k, v in found.items() if v} == {}


def test_render_dashboard_refuses_a_missing_value():
    with pytest.raises(KeyError):
        render_dashboard(DASHBOARD_FILE.read_text(), {"prefix": "iot-dev"}, uptime_check=True)


@pytest.mark.parametrize("stack", harness.STACKS)
def test_every_stack_declares_the_dashboard_and_alerts_and_exports_the_url(stack: str) -> None:
    run = harness.stack_run(stack)
    assert run.of_type("gcp-iot-bridge:index:Monitoring")
    assert len(run.of_type("gcp:monitoring/dashboard:Dashboard")) == 1
    assert len(run.of_type("gcp:monitoring/alertPolicy:AlertPolicy")) == 10
    url = run.outputs["monitoring_dashboard_url"]
    assert url.startswith("https://console.cloud.google.com/monitoring/dashboards/builder/")
    assert url.endswith(f"?project={run.config['gcp:project']}")

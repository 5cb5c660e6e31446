"""Monitoring: the operators' Cloud Monitoring dashboard and the alert policies that page them.

What is watched, end to end: devices connected to the bridge (a custom metric the bridge reports), the broker
hosts (an uptime check on the MQTT endpoint and the bridge's own heartbeat), Pub/Sub backlog age and
dead-lettered messages, the Dataflow job's system lag and data freshness, the config-push function's errors, and
the device-logs BigQuery subscription's write errors.

The dashboard is ``gcp_iot_bridge/infra/dashboards/iot.json``, a Cloud Monitoring dashboard document with
``${...}`` placeholders
for the stack's physical names; it can be edited in the console, exported and pasted back.

The bridge writes ``custom.googleapis.com/iot/connected_devices`` (GAUGE, INT64) every 60 s, on the
``gce_instance`` it runs on, with metric labels ``registry_id`` and ``host``. The descriptor is declared here and
every alert on it waits for it: Cloud Monitoring refuses an alert policy whose filter names a custom metric type
that does not exist yet, which on a fresh project is always the case. Creating the descriptor is not enough
either: the API creates it asynchronously, and for a while alerts on it still fail with "404 Cannot find metric(s)
that match type ... If a metric was created recently, it could take up to 10 minutes to become available"
(terraform-provider-google#11102). So those alerts also wait ``METRIC_DESCRIPTOR_WAIT`` after the descriptor,
on the first ``up`` only (the wait runs again only if the descriptor is replaced).
The bridge service writes two more gauges the same way, and their alerts wait alike:
``broker_stored_messages`` (what Mosquitto holds: the bridge's queue while Pub/Sub is unreachable) and
``broker_dropped_messages`` (messages Mosquitto dropped for a client over its queue bound, per minute); they
alert at half the queue bound and at the first drop.
"""

from __future__ import annotations

import json
import pathlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pulumiverse_time as time

from iotbridge import spec

DASHBOARD_FILE = pathlib.Path(__file__).resolve().parent / "dashboards" / "iot.json"

CONNECTED_DEVICES_METRIC = spec.CONNECTED_DEVICES_METRIC
BROKER_STORED_METRIC = spec.BROKER_STORED_METRIC
BROKER_DROPPED_METRIC = spec.BROKER_DROPPED_METRIC
MAX_QUEUED_MESSAGES = spec.BROKER_MAX_QUEUED_MESSAGES
# "it could take up to 10 minutes to become available" (Monitoring's own 404, terraform-provider-google#11102). The
# wait runs beside the Dataflow launch and the image build, so the first `up` is rarely longer for it.
METRIC_DESCRIPTOR_WAIT = "600s"

# Every metric type the dashboard and the alerts use, as listed in Google's metrics reference
# (cloud.google.com/monitoring/api/metrics_gcp). A test checks nothing else appears in a filter.
METRIC_TYPES: frozenset[str] = frozenset({
    "pubsub.googleapis.com/subscription/oldest_unacked_message_age",
    "pubsub.googleapis.com/subscription/num_undelivered_messages",
    "pubsub.googleapis.com/subscription/dead_letter_message_count",
    "pubsub.googleapis.com/subscription/push_request_count",
    "pubsub.googleapis.com/topic/send_message_operation_count",
    "dataflow.googleapis.com/job/system_lag",
    "dataflow.googleapis.com/job/data_watermark_age",
    "run.googleapis.com/request_count",
    "compute.googleapis.com/instance/cpu/utilization",
    "monitoring.googleapis.com/uptime_check/check_passed",
    CONNECTED_DEVICES_METRIC,
    BROKER_STORED_METRIC,
    BROKER_DROPPED_METRIC,
})


@dataclass(frozen=True)
class MonitoringArgs:
    project: str
    prefix: str
    dataflow_job_name: pulumi.Input[str]  # the streaming job's name (resource.labels.job_name)
    config_push_function: pulumi.Input[str]  # the gen2 function's name = its Cloud Run service name
    mqtt_host: pulumi.Input[str] | None = None  # the MQTT endpoint's address, for the TCP uptime check
    mqtt_port: int = 8883
    broker_instance_prefix: str | None = None  # broker VM names start with this; default "{prefix}-broker"
    notification_email: str | None = None  # alerts go to this address when set
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # the Monitoring API
    # Thresholds: seconds unless noted.
    oldest_unacked_seconds: int = 600
    system_lag_seconds: int = 300
    data_freshness_seconds: int = 600
    function_errors_per_5m: int = 5
    min_connected_devices: int = 1  # the whole fleet dropping below this many pages
    heartbeat_absent_seconds: int = 300


def render_dashboard(template: str, values: Mapping[str, Any], uptime_check: bool) -> str:
    """The dashboard document for one stack: placeholders filled, the uptime tile dropped when there is no check.

    Raises ``KeyError`` for a placeholder without a value and ``ValueError`` for a document that is not JSON.
    """
    doc = json.loads(string.Template(template).substitute({k: str(v) for k, v in values.items()}))
    tiles = doc["mosaicLayout"]["tiles"]
    if not uptime_check:
        tiles[:] = [t for t in tiles if "uptime_check" not in json.dumps(t)]
    return json.dumps(doc, sort_keys=True)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


class Monitoring(pulumi.ComponentResource):
    """The operators' dashboard and alert policies, notifying the stack's channel.

    Each part of the constructor is one private method: the notification channel, the custom metrics'
    descriptors (and the wait for them), the alerts on Pub/Sub, Dataflow, the function and the broker hosts, and
    the dashboard.
    """

    alerts: dict[str, gcp.monitoring.AlertPolicy]
    channel: gcp.monitoring.NotificationChannel | None
    connected_devices: gcp.monitoring.MetricDescriptor
    broker_stored: gcp.monitoring.MetricDescriptor
    broker_dropped: gcp.monitoring.MetricDescriptor
    connected_devices_wait: time.Sleep
    uptime_check: gcp.monitoring.UptimeCheckConfig | None
    dashboard: gcp.monitoring.Dashboard
    dashboard_url: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Monitoring", name, None, opts)
        self._name = name
        self._args = args
        self._deps = list(args.depends_on)
        self._child = pulumi.ResourceOptions(parent=self, depends_on=self._deps)
        self._labels = dict(args.labels)
        cloud_subs = {k: s for k, s in spec.SUBSCRIPTIONS.items() if s.cloud}
        self._bigquery_subs = [spec.subscription_name(args.prefix, k) for k, s in cloud_subs.items()
                               if s.kind == "bigquery"]

        self._channels = self._notification_channel()
        self._metric_descriptors()
        self.alerts = {}
        self._pubsub_alerts(cloud_subs)
        self._dataflow_alerts()
        self._function_alerts()
        self._broker_alerts()
        self._dashboard()

        self.register_outputs({
            "monitoring_dashboard_url": self.dashboard_url,
            **{f"{key}_alert": policy.name for key, policy in self.alerts.items()},
        })

    def _notification_channel(self) -> list[pulumi.Input[str]]:
        """The operators' email channel when ``notification_email`` is set. Returns the alerts' channels."""
        args = self._args
        self.channel = None
        if not args.notification_email:
            return []
        self.channel = gcp.monitoring.NotificationChannel(
            f"{self._name}-email",
            project=args.project,
            display_name=f"{args.prefix} operators",
            type="email",
            labels={"email_address": args.notification_email},
            user_labels=self._labels,
            opts=self._child,
        )
        return [self.channel.name]

    def _host_gauge(self, key: str, metric_type: str, display: str, description: str,
                    ) -> gcp.monitoring.MetricDescriptor:
        """The descriptor of one gauge the bridge writes per host (labels ``registry_id`` and ``host``)."""
        return gcp.monitoring.MetricDescriptor(
            f"{self._name}-{key}",
            project=self._args.project,
            type=metric_type,
            metric_kind="GAUGE",
            value_type="INT64",
            unit="1",
            display_name=display,
            description=description,
            labels=[
                gcp.monitoring.MetricDescriptorLabelArgs(key="registry_id", value_type="STRING",
                                                         description="The device registry."),
                gcp.monitoring.MetricDescriptorLabelArgs(key="host", value_type="STRING",
                                                         description="The bridge host's name."),
            ],
            opts=self._child,
        )

    def _metric_descriptors(self) -> None:
        """The three custom gauges the bridge reports, and the wait before alerts on them (module docstring)."""
        self.connected_devices = self._host_gauge(
            "connected-devices", CONNECTED_DEVICES_METRIC, "IoT connected devices",
            "Devices with a live MQTT session on one bridge host, reported by the bridge every 60 s.")
        self.broker_stored = self._host_gauge(
            "broker-stored-messages", BROKER_STORED_METRIC, "IoT broker stored messages",
            "Messages the broker of one bridge host holds (queued for its bridge service while Pub/Sub is "
            "unreachable), reported by the bridge service every 60 s.")
        self.broker_dropped = self._host_gauge(
            "broker-dropped-messages", BROKER_DROPPED_METRIC, "IoT broker dropped messages",
            "Messages the broker of one bridge host dropped for a client over its queue bound since the previous "
            "point, reported by the bridge service every 60 s.")
        self.connected_devices_wait = time.Sleep(
            f"{self._name}-connected-devices-wait",
            create_duration=METRIC_DESCRIPTOR_WAIT,
            triggers={"connected": self.connected_devices.id, "stored": self.broker_stored.id,
                      "dropped": self.broker_dropped.id},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self._deps, self.connected_devices,
                                                                  self.broker_stored, self.broker_dropped]),
        )

    def _alert(self, key: str, display: str, documentation: str,
               conditions: list[gcp.monitoring.AlertPolicyConditionArgs], severity: str = "ERROR",
               extra_deps: Sequence[pulumi.Resource] = ()) -> None:
        """One alert policy, ``self.alerts[key]``: any condition opens an incident, closed after 30 min quiet."""
        args = self._args
        self.alerts[key] = gcp.monitoring.AlertPolicy(
            f"{self._name}-{key}",
            project=args.project,
            display_name=f"{args.prefix}: {display}",
            combiner="OR",
            conditions=conditions,
            notification_channels=self._channels,
            severity=severity,
            documentation=gcp.monitoring.AlertPolicyDocumentationArgs(
                content=documentation, mime_type="text/markdown", subject=f"[{args.prefix}] {display}"),
            alert_strategy=gcp.monitoring.AlertPolicyAlertStrategyArgs(auto_close="1800s"),
            user_labels=self._labels,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self._deps, *extra_deps]),
        )

    def _pubsub_alerts(self, cloud_subs: Mapping[str, spec.SubscriptionSpec]) -> None:
        """Backlog age on every drained subscription, dead letters, and the BigQuery subscription's write errors."""
        args = self._args
        # Backlog: every subscription a consumer drains. The audit subscription holds dead letters by design; its
        # growth is the dead-letter alert's business.
        drained = [spec.subscription_name(args.prefix, k) for k, s in cloud_subs.items() if s.topic != "dead-letter"]
        # Dead letters: the subscriptions with a dead-letter policy (not the one Dataflow reads: it has none).
        dead_lettering = [spec.subscription_name(args.prefix, k) for k, s in cloud_subs.items() if s.dead_letter]
        self._alert(
            "pubsub-oldest-unacked", "Pub/Sub backlog is getting old",
            f"A subscriber is not keeping up: the oldest unacknowledged message is older than "
            f"{args.oldest_unacked_seconds} s. Check the Dataflow job and the device-logs BigQuery subscription; "
            "messages are lost once they outlive the subscription's retention.",
            [_threshold("oldest unacked message age",
                        f'metric.type = "pubsub.googleapis.com/subscription/oldest_unacked_message_age" AND '
                        f'{_sub_filter(drained)}',
                        "ALIGN_MAX", args.oldest_unacked_seconds, "300s",
                        reducer="REDUCE_MAX", group_by=["resource.labels.subscription_id"])])
        self._alert(
            "pubsub-dead-letters", "Messages were dead-lettered",
            "A message failed every delivery attempt and went to the dead-letter topic. Inspect it with the "
            f"`{spec.subscription_name(args.prefix, 'dead-letter-audit')}` subscription.",
            [_threshold("dead-lettered messages",
                        f'metric.type = "pubsub.googleapis.com/subscription/dead_letter_message_count" AND '
                        f'{_sub_filter(dead_lettering)}',
                        "ALIGN_DELTA", 0, "0s", period="300s",
                        reducer="REDUCE_SUM", group_by=["resource.labels.subscription_id"])],
            severity="WARNING")
        if self._bigquery_subs:
            self._alert(
                "bigquery-subscription-errors", "BigQuery subscription cannot write",
                "Pub/Sub could not write device logs into BigQuery (a response class other than ack: schema "
                "mismatch, permission denied, table missing). Messages stay in the backlog until it is fixed.",
                [_threshold("BigQuery subscription write errors",
                            'metric.type = "pubsub.googleapis.com/subscription/push_request_count" AND '
                            'resource.type = "pubsub_subscription" AND '
                            f'resource.labels.subscription_id = one_of({_quoted(self._bigquery_subs)}) AND '
                            'metric.labels.response_class != "ack"',
                            "ALIGN_DELTA", 0, "0s", period="300s",
                            reducer="REDUCE_SUM", group_by=["resource.labels.subscription_id"])])

    def _dataflow_alerts(self) -> None:
        """The streaming job's system lag and data freshness."""
        args = self._args
        job_filter = pulumi.Output.concat('resource.type = "dataflow_job" AND resource.labels.job_name = "',
                                          args.dataflow_job_name, '"')
        self._alert(
            "dataflow-system-lag", "Dataflow system lag is high",
            f"An element has waited more than {args.system_lag_seconds} s inside the telemetry pipeline. "
            "Look for a stuck stage or failing writes in the job's logs; check worker autoscaling limits.",
            [_threshold("system lag", pulumi.Output.concat(
                'metric.type = "dataflow.googleapis.com/job/system_lag" AND ', job_filter),
                "ALIGN_MAX", args.system_lag_seconds, "300s")])
        self._alert(
            "dataflow-data-freshness", "Dataflow data is stale",
            f"The pipeline's output watermark is more than {args.data_freshness_seconds} s behind: BigQuery and "
            "Bigtable are not current. Either input stopped (check the bridge) or the job is stuck.",
            [_threshold("data watermark age", pulumi.Output.concat(
                'metric.type = "dataflow.googleapis.com/job/data_watermark_age" AND ', job_filter),
                "ALIGN_MAX", args.data_freshness_seconds, "300s")])

    def _function_alerts(self) -> None:
        """The config-push function answering Eventarc with errors."""
        args = self._args
        self._alert(
            "function-errors", "Config-push function is failing",
            "The config-push function answered Eventarc with errors; Eventarc retries, and configs wait. "
            "Check the function's logs (Firestore contention, bridge command topic permissions).",
            [_threshold("function 4xx/5xx responses", pulumi.Output.concat(
                'metric.type = "run.googleapis.com/request_count" AND resource.type = "cloud_run_revision" AND '
                'resource.labels.service_name = "', args.config_push_function,
                '" AND metric.labels.response_code_class = one_of("4xx", "5xx")'),
                "ALIGN_DELTA", args.function_errors_per_5m, "0s", period="300s", reducer="REDUCE_SUM")])

    def _broker_alerts(self) -> None:
        """The broker hosts: heartbeat and the MQTT endpoint's uptime check, the fleet's connected devices, and
        each host's broker queue filling or dropping messages."""
        args = self._args
        devices_filter = f'metric.type = "{CONNECTED_DEVICES_METRIC}" AND resource.type = "gce_instance"'
        broker_conditions = [gcp.monitoring.AlertPolicyConditionArgs(
            display_name="bridge heartbeat missing",
            condition_absent=gcp.monitoring.AlertPolicyConditionConditionAbsentArgs(
                filter=devices_filter,
                duration=f"{args.heartbeat_absent_seconds}s",
                aggregations=[gcp.monitoring.AlertPolicyConditionConditionAbsentAggregationArgs(
                    alignment_period="60s", per_series_aligner="ALIGN_MEAN")],
                trigger=gcp.monitoring.AlertPolicyConditionConditionAbsentTriggerArgs(count=1),
            ),
        )]
        self.uptime_check = None
        if args.mqtt_host is not None:
            self.uptime_check = gcp.monitoring.UptimeCheckConfig(
                f"{self._name}-mqtt",
                project=args.project,
                display_name=f"{args.prefix}-mqtt endpoint",
                tcp_check=gcp.monitoring.UptimeCheckConfigTcpCheckArgs(port=args.mqtt_port),
                monitored_resource=gcp.monitoring.UptimeCheckConfigMonitoredResourceArgs(
                    type="uptime_url", labels={"project_id": args.project, "host": args.mqtt_host}),
                period="60s",
                timeout="10s",
                user_labels=self._labels,
                opts=self._child,
            )
            broker_conditions.append(_threshold(
                "MQTT endpoint unreachable from 2+ regions",
                pulumi.Output.concat('metric.type = "monitoring.googleapis.com/uptime_check/check_passed" AND '
                                     'resource.type = "uptime_url" AND metric.labels.check_id = "',
                                     self.uptime_check.uptime_check_id, '"'),
                "ALIGN_NEXT_OLDER", 1, "60s", period="1200s",
                reducer="REDUCE_COUNT_FALSE", group_by=["resource.labels.host"]))
        self._alert(
            "broker-host-health", "Bridge host down",
            "A bridge host stopped reporting its heartbeat (the connected-devices metric) or the MQTT endpoint "
            f"stopped accepting TCP connections on {args.mqtt_port}. Devices reconnect to the remaining hosts; "
            "check the managed instance group's autohealing and the host's serial console.",
            broker_conditions, severity="CRITICAL", extra_deps=[self.connected_devices, self.connected_devices_wait])
        self._alert(
            "connected-devices", "Devices disconnected",
            f"Fewer than {args.min_connected_devices} devices are connected across all bridge hosts for 10 "
            "minutes: a fleet-wide outage (network, CA or JWT audience change) rather than one device.",
            [_threshold("connected devices (all hosts)", devices_filter, "ALIGN_MEAN", args.min_connected_devices,
                        "600s", reducer="REDUCE_SUM", comparison="COMPARISON_LT")],
            severity="WARNING", extra_deps=[self.connected_devices, self.connected_devices_wait])

        host_filter = 'resource.type = "gce_instance"'
        self._alert(
            "broker-queue-filling", "Broker queue filling",
            f"A bridge host's broker holds over {MAX_QUEUED_MESSAGES // 2:,} messages, half of a client's queue "
            "bound: its bridge service is not getting messages into Pub/Sub (check the service's log for publish "
            "errors, the host's Pub/Sub grants and quotas). At the bound the broker drops messages devices were "
            "already acknowledged for.",
            [_threshold("stored messages (one host)", f'metric.type = "{BROKER_STORED_METRIC}" AND {host_filter}',
                        "ALIGN_MAX", MAX_QUEUED_MESSAGES // 2, "0s", reducer="REDUCE_MAX",
                        group_by=["metric.labels.host"])],
            severity="WARNING", extra_deps=[self.broker_stored, self.connected_devices_wait])
        self._alert(
            "broker-queue-full", "Broker dropped device messages",
            "A bridge host's broker dropped queued messages for a client over its queue bound; devices had "
            "already been acknowledged for them, so they are lost. The host's bridge service log names the client "
            "('broker queue full'); for the bridge's own session, Pub/Sub has been unreachable for long.",
            [_threshold("dropped messages (one host)", f'metric.type = "{BROKER_DROPPED_METRIC}" AND {host_filter}',
                        "ALIGN_MAX", 0, "0s", reducer="REDUCE_MAX", group_by=["metric.labels.host"])],
            severity="CRITICAL", extra_deps=[self.broker_dropped, self.connected_devices_wait])

    def _dashboard(self) -> None:
        """The dashboard of ``DASHBOARD_FILE`` for this stack, and its console URL."""
        args = self._args
        broker_prefix = args.broker_instance_prefix or f"{args.prefix}-broker"
        bigquery_subs = self._bigquery_subs
        template = DASHBOARD_FILE.read_text(encoding="utf-8")
        uptime_id: pulumi.Input[str] = self.uptime_check.uptime_check_id if self.uptime_check else ""
        dashboard_json = pulumi.Output.all(args.dataflow_job_name, args.config_push_function, uptime_id).apply(
            lambda v: render_dashboard(template, {
                "prefix": args.prefix,
                "broker_instance_prefix": broker_prefix,
                "dataflow_job": v[0],
                "function": v[1],
                "uptime_check_id": v[2],
                "bigquery_subscription": bigquery_subs[0] if bigquery_subs else "",
                "oldest_unacked_threshold": args.oldest_unacked_seconds,
                "system_lag_threshold": args.system_lag_seconds,
                "data_freshness_threshold": args.data_freshness_seconds,
            }, uptime_check=self.uptime_check is not None))
        self.dashboard = gcp.monitoring.Dashboard(
            f"{self._name}-dashboard", project=args.project, dashboard_json=dashboard_json, opts=self._child)
        # The dashboard's id is projects/{number}/dashboards/{id}; the console wants the last part.
        self.dashboard_url = self.dashboard.id.apply(
            lambda i: f"https://console.cloud.google.com/monitoring/dashboards/builder/{i.rsplit('/', 1)[-1]}"
                      f"?project={args.project}")


def _sub_filter(names: Sequence[str]) -> str:
    return (f'resource.type = "pubsub_subscription" AND '
            f'resource.labels.subscription_id = one_of({_quoted(names)})')


def _threshold(display: str, filter_: pulumi.Input[str], aligner: str, value: float, duration: str,
               period: str = "60s", reducer: str | None = None, group_by: Sequence[str] = (),
               comparison: str = "COMPARISON_GT") -> gcp.monitoring.AlertPolicyConditionArgs:
    """A threshold condition over one aligned (and optionally reduced) series, firing at the first breach."""
    return gcp.monitoring.AlertPolicyConditionArgs(
        display_name=display,
        condition_threshold=gcp.monitoring.AlertPolicyConditionConditionThresholdArgs(
            filter=filter_,
            comparison=comparison,
            threshold_value=value,
            duration=duration,
            aggregations=[gcp.monitoring.AlertPolicyConditionConditionThresholdAggregationArgs(
                alignment_period=period,
                per_series_aligner=aligner,
                cross_series_reducer=reducer,
                group_by_fields=list(group_by) if reducer else None,
            )],
            trigger=gcp.monitoring.AlertPolicyConditionConditionThresholdTriggerArgs(count=1),
        ),
    )

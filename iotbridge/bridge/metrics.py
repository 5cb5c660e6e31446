"""The connected-devices gauge: how many devices a broker host holds, written to Cloud Monitoring; and the broker's
queue gauges, written by the bridge service the same way.

The monitoring component (``gcp_iot_bridge/infra/monitoring.py``) declares the metric descriptor and alerts on it:
a host that stops writing it is down, and a fleet whose sum drops below a floor pages. The front writes one point a
minute on the ``gce_instance`` it runs on, with metric labels ``registry_id`` and ``host``; the bridge's service
account has ``roles/monitoring.metricWriter``. Locally (no Cloud Monitoring) the front only logs the count.

The bridge service writes, on the same resource and labels, ``broker_stored_messages`` (what Mosquitto holds, the
bridge's queue during a Pub/Sub outage) and ``broker_dropped_messages`` (messages Mosquitto dropped for a client
over its queue bound since the previous point): the monitoring component alerts on both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from iotbridge import spec

METRIC_TYPE = spec.CONNECTED_DEVICES_METRIC
BROKER_STORED_METRIC = spec.BROKER_STORED_METRIC
BROKER_DROPPED_METRIC = spec.BROKER_DROPPED_METRIC
INTERVAL_S = 60.0  # Cloud Monitoring accepts at most one point per 5 s per series; a minute is the alerts' grain
# The metadata server; GCE_METADATA_HOST (google-auth's variable, which the client libraries here obey too) names
# another one, as the simulated host test does. Unset on a host.
METADATA_HOST = "metadata.google.internal"

log = logging.getLogger(__name__)


def gce_instance_labels(fetch: Callable[[str], str] | None = None) -> dict[str, str]:
    """``instance_id`` and ``zone`` of this VM, from the metadata server (the monitored resource's labels)."""

    def from_metadata(path: str) -> str:
        host = os.environ.get("GCE_METADATA_HOST") or METADATA_HOST
        req = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/{path}",
                                     headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - the metadata server
            return resp.read().decode()

    get = fetch or from_metadata
    return {"instance_id": get("id"), "zone": get("zone").rsplit("/", 1)[-1]}


def time_series(project: str, registry_id: str, host: str, resource: Mapping[str, str], count: int,
                now: float | None = None, metric_type: str = METRIC_TYPE) -> Any:
    from google.cloud import monitoring_v3

    ts = monitoring_v3.TimeSeries()
    ts.metric.type = metric_type
    ts.metric.labels["registry_id"] = registry_id
    ts.metric.labels["host"] = host
    ts.resource.type = "gce_instance"
    ts.resource.labels["project_id"] = project
    for k, v in resource.items():
        ts.resource.labels[k] = v
    when = time.time() if now is None else now
    seconds = int(when)
    point = monitoring_v3.Point({"interval": {"end_time": {"seconds": seconds,
                                                            "nanos": int((when - seconds) * 1e9)}},
                                 "value": {"int64_value": int(count)}})
    ts.points = [point]
    return ts


class ConnectedDevicesReporter:
    """Writes the gauge; ``client`` is a ``monitoring_v3.MetricServiceClient`` (or a stand-in in tests)."""

    def __init__(self, project: str, registry_id: str, host: str, resource: Mapping[str, str],
                 client: Any = None) -> None:
        if client is None:
            from google.cloud import monitoring_v3

            client = monitoring_v3.MetricServiceClient()
        self.client = client
        self.project, self.registry_id, self.host = project, registry_id, host
        self.resource = dict(resource)

    def report(self, count: int, now: float | None = None) -> None:
        self.report_many({METRIC_TYPE: count}, now)

    def report_many(self, values: Mapping[str, int], now: float | None = None) -> None:
        series = [time_series(self.project, self.registry_id, self.host, self.resource, v, now, metric_type)
                  for metric_type, v in values.items()]
        self.client.create_time_series(name=f"projects/{self.project}", time_series=series)


class BrokerQueueReporter:
    """The broker's queue gauges from the bridge service's counters: what Mosquitto holds now, and how many
    messages it dropped since the previous point (Mosquitto's own counter runs since the broker started)."""

    def __init__(self, reporter: ConnectedDevicesReporter):
        self.reporter = reporter
        self._dropped_before = 0

    def report(self, stats: Mapping[str, Any], now: float | None = None) -> None:
        dropped = int(stats.get("broker_dropped_messages", 0))
        # A restarted broker starts its counter again from zero.
        fresh = dropped - self._dropped_before if dropped >= self._dropped_before else dropped
        self.reporter.report_many({BROKER_STORED_METRIC: int(stats.get("broker_stored_messages", 0)),
                                   BROKER_DROPPED_METRIC: fresh}, now)
        self._dropped_before = dropped


async def connected_devices_loop(project: str, registry_id: str, host: str, destination: str,
                                 count: Callable[[], int], logger: logging.Logger) -> None:
    """The connected-devices gauge every ``INTERVAL_S`` until cancelled: ``destination`` "cloud" writes it to
    Cloud Monitoring (on this VM's ``gce_instance``), "log" (or no metadata server, no credentials) logs it. The
    front and the auth daemon of ``device_auth: mosquitto`` run it, whichever holds the host's device sessions."""
    import asyncio

    loop = asyncio.get_running_loop()
    reporter = None
    if destination == "cloud":
        try:
            resource = await loop.run_in_executor(None, gce_instance_labels)
            reporter = ConnectedDevicesReporter(project, registry_id, host, resource)
        except Exception as exc:  # noqa: BLE001 - not on Compute Engine, or no credentials
            logger.warning("connected-devices gauge goes to the log only: %s", exc)
    while True:
        n = count()
        if reporter is None:
            logger.info("connected devices: %d", n)
        else:
            try:
                await loop.run_in_executor(None, reporter.report, n)
            except Exception as exc:  # noqa: BLE001 - a lost point must not stop the caller
                logger.warning("connected-devices metric not written: %s", exc)
        await asyncio.sleep(INTERVAL_S)


async def answer_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        healthy: Callable[[], Awaitable[tuple[bool, str]]], counters: Callable[[], Mapping[str, int]]
                        ) -> None:
    """One HTTP request on a part's health port: ``GET /stats`` answers the part's counters (for operators, tests and
    bench/), anything else ``healthy()``: 200 with "ok", or 503 with why not (the load balancer's and auto-healing's
    check)."""
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if request.startswith(b"GET /stats "):
            ok, body = True, json.dumps(counters()).encode()
        else:
            ok, detail = await healthy()
            body = detail.encode()
        status = "200 OK" if ok else "503 Service Unavailable"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()

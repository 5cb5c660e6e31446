"""The connected-devices gauge: how many devices a broker host holds, written to Cloud Monitoring.

The monitoring component (``infra/components/monitoring.py``) declares the metric descriptor and alerts on it:
a host that stops writing it is down, and a fleet whose sum drops below a floor pages. The front writes one point a
minute on the ``gce_instance`` it runs on, with metric labels ``registry_id`` and ``host``; the bridge's service
account has ``roles/monitoring.metricWriter``. Locally (no Cloud Monitoring) the front only logs the count.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

METRIC_TYPE = "custom.googleapis.com/iot/connected_devices"
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
                now: float | None = None) -> Any:
    from google.cloud import monitoring_v3

    ts = monitoring_v3.TimeSeries()
    ts.metric.type = METRIC_TYPE
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
        series = time_series(self.project, self.registry_id, self.host, self.resource, count, now)
        self.client.create_time_series(name=f"projects/{self.project}", time_series=[series])

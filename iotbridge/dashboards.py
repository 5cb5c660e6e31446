"""The Looker Studio report over the warehouse's dashboard views, as a Linking API URL.

Looker Studio (formerly Data Studio) has no resource API a stack could declare a report with, but its Linking API
opens a report, a copy of a template or a blank one, whose data sources are configured by the URL itself::

    https://lookerstudio.google.com/reporting/create?c.reportId=...&r.reportName=...
        &ds.ds0.connector=bigQuery&ds.ds0.type=TABLE&ds.ds0.projectId=P&ds.ds0.datasetId=D&ds.ds0.tableId=device_latest
        &ds.ds1.... (one alias per dashboard view)

The viewer's own Google credentials read BigQuery, so whoever opens the link needs BigQuery Data Viewer on the
dataset and Job User on the (billing) project; nothing is shared by the link itself. "Edit and share" saves the
report into the viewer's Looker Studio account.

Pure functions, no cloud client and no Pulumi: the Pulumi program exports the URL as ``dashboard_url`` and the
operator CLI can print the same URL for any project and dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from iotbridge import spec

LINKING_API = "https://lookerstudio.google.com/reporting/create"
DEFAULT_REPORT_NAME = "IoT fleet (gcp-iot-bridge)"


@dataclass(frozen=True)
class ReportSource:
    """One data source of the report: a Linking API alias bound to one warehouse view."""

    alias: str  # the data source alias in the template report (ds0, ds1, ...: Looker Studio's default aliases)
    view: str  # a spec.VIEWS name
    title: str  # data source name shown in Looker Studio
    page: str  # what the report page built on it shows


REPORT_SOURCES: tuple[ReportSource, ...] = (
    ReportSource("ds0", "device_latest", "Fleet - latest reading",
                 "one row per device and metric: the latest value and when it was read"),
    ReportSource("ds1", "telemetry_hourly", "Telemetry - hourly",
                 "per device, metric and hour: readings, min, max and mean"),
    ReportSource("ds2", "errors_hourly", "Data quality - rejected messages",
                 "per hour and reason: how many messages the pipeline rejected"),
)

for _source in REPORT_SOURCES:  # a renamed view must fail at import, not as a broken report
    if _source.view not in spec.VIEWS:
        raise RuntimeError(f"dashboard view {_source.view!r} is not in iotbridge.spec.VIEWS")

# BigQuery naming rules: project ids (6-30, lowercase, digits, hyphens; a legacy "domain.com:" prefix allowed)
# and dataset/table ids (letters, digits, underscores).
_PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
# A report id is the UUID in the report's URL: lookerstudio.google.com/reporting/<id>/page/...
_REPORT_ID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def looker_studio_url(
    project: str,
    dataset: str,
    *,
    template_report_id: str | None = None,
    report_name: str = DEFAULT_REPORT_NAME,
    billing_project: str | None = None,
    sources: tuple[ReportSource, ...] = REPORT_SOURCES,
) -> str:
    """The Linking API URL of a report whose data sources are the dashboard views of ``project.dataset``.

    ``template_report_id``: a report whose data sources carry the aliases of ``sources``; its pages and charts are
    copied. Without one, Looker Studio opens a blank report with the data sources attached.
    ``billing_project``: the project BigQuery bills the report's queries to (default: ``project``).
    """
    if not _PROJECT_RE.match(project):
        raise ValueError(f"project {project!r} is not a GCP project id")
    if not _DATASET_RE.match(dataset):
        raise ValueError(f"dataset {dataset!r} is not a BigQuery dataset id")
    if billing_project is not None and not _PROJECT_RE.match(billing_project):
        raise ValueError(f"billing_project {billing_project!r} is not a GCP project id")
    if template_report_id is not None and not _REPORT_ID_RE.match(template_report_id):
        raise ValueError(f"template_report_id {template_report_id!r} is not a Looker Studio report id (a UUID)")
    if not report_name.strip():
        raise ValueError("report_name is empty")
    aliases = [s.alias for s in sources]
    if len(set(aliases)) != len(aliases):
        raise ValueError(f"data source aliases repeat: {aliases}")

    params: list[tuple[str, str]] = []
    if template_report_id:
        params.append(("c.reportId", template_report_id))
    params.append(("r.reportName", report_name))
    for s in sources:
        ds = f"ds.{s.alias}"
        # connector= replaces the template's data source configuration as a whole, so every parameter the
        # BigQuery connector requires for type TABLE is given.
        params += [
            (f"{ds}.connector", "bigQuery"),
            (f"{ds}.datasourceName", s.title),
            (f"{ds}.type", "TABLE"),
            (f"{ds}.projectId", project),
            (f"{ds}.datasetId", dataset),
            (f"{ds}.tableId", s.view),
        ]
        if billing_project:
            params.append((f"{ds}.billingProjectId", billing_project))
    return f"{LINKING_API}?{urlencode(params, quote_via=quote)}"

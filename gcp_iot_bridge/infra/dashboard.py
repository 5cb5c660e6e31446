"""Dashboard: the stack's ``dashboard_url``, a Looker Studio Linking API URL over the warehouse's views.

Looker Studio has no resource API, so nothing is declared here: the URL is built (``iotbridge.dashboards``, shared
with the operator CLI) from the stack's project and the dataset and view ids the Warehouse declared. It is
derived from the view resources' outputs, so it exists only once every view it names does, and a view the
Warehouse stopped declaring fails the program instead of producing a report with a broken data source.
"""

from __future__ import annotations

from collections.abc import Mapping

import pulumi
import pulumi_gcp as gcp

from iotbridge import dashboards


def dashboard_url(
    project: str,
    dataset_id: pulumi.Input[str],
    views: Mapping[str, gcp.bigquery.Table],
    template_report_id: str | None = None,
    report_name: str = dashboards.DEFAULT_REPORT_NAME,
) -> pulumi.Output[str]:
    missing = [s.view for s in dashboards.REPORT_SOURCES if s.view not in views]
    if missing:
        raise KeyError(f"the warehouse declares no view(s) {missing}; the report reads them")
    table_ids = [views[s.view].table_id for s in dashboards.REPORT_SOURCES]

    def build(values: list[str]) -> str:
        dataset, *tables = values
        expected = [s.view for s in dashboards.REPORT_SOURCES]
        if tables != expected:
            raise pulumi.RunError(f"dashboard views are named {tables}, the report expects {expected}")
        return dashboards.looker_studio_url(project, dataset, template_report_id=template_report_id,
                                            report_name=report_name)

    return pulumi.Output.all(dataset_id, *table_ids).apply(build)

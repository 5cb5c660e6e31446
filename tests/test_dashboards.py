"""The Looker Studio Linking API URL: parsed back, it names the project, the dataset and every dashboard view."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

import pytest

from iotbridge import dashboards, spec

# Parameter names Looker Studio's Linking API documents:
# control, report, and the data source parameters of the BigQuery connector. A misspelt name ("datasetID") is
# ignored by Looker Studio without an error, so the test holds the URL to this list.
DOCUMENTED = {"c.reportId", "c.pageId", "c.mode", "c.explain", "r.reportName", "r.measurementId",
              "r.keepMeasurementId"}
DOCUMENTED_DS = {"connector", "datasourceName", "keepDatasourceName", "refreshFields", "type", "projectId",
                 "datasetId", "tableId", "billingProjectId", "isPartitioned", "includeToday", "sql", "sqlReplace"}


def _parse(url: str) -> tuple[str, dict[str, str], dict[str, dict[str, str]]]:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), f"repeated parameters: {names}"
    top: dict[str, str] = {}
    sources: dict[str, dict[str, str]] = {}
    for key, value in pairs:
        m = re.fullmatch(r"ds\.([A-Za-z0-9_]+)\.([A-Za-z]+)", key)
        if m:
            assert m.group(2) in DOCUMENTED_DS, f"undocumented data source parameter {key}"
            sources.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            assert key in DOCUMENTED, f"undocumented parameter {key}"
            top[key] = value
    return f"{parts.scheme}://{parts.netloc}{parts.path}", top, sources


def test_url_names_project_dataset_and_every_dashboard_view() -> None:
    url = dashboards.looker_studio_url("my-iot-dev-project", "iot")
    base, top, sources = _parse(url)

    assert base == "https://lookerstudio.google.com/reporting/create"
    assert top == {"r.reportName": dashboards.DEFAULT_REPORT_NAME}  # no template: a blank report
    assert sorted(sources) == ["ds0", "ds1", "ds2"]
    assert {s["tableId"] for s in sources.values()} == {"device_latest", "telemetry_hourly", "errors_hourly"}
    for alias, ds in sources.items():
        assert ds["connector"] == "bigQuery"
        assert ds["type"] == "TABLE"
        assert ds["projectId"] == "my-iot-dev-project"
        assert ds["datasetId"] == "iot"
        assert ds["tableId"] in spec.VIEWS, f"{alias} reads {ds['tableId']}, not a warehouse view"
        assert ds["datasourceName"]


def test_template_billing_project_and_encoding() -> None:
    template = "0b8f2a1e-5f3c-4c8e-9d7a-2f4e6b1c3d5a"
    url = dashboards.looker_studio_url("my-iot-prod-project", "iot_prod", template_report_id=template,
                                       report_name="Fleet & quality", billing_project="my-billing-project")
    _, top, sources = _parse(url)
    assert top["c.reportId"] == template
    assert top["r.reportName"] == "Fleet & quality"
    assert "%20" in url and "+" not in url  # a space is %20; "&" inside a value is escaped, not a separator
    assert all(ds["billingProjectId"] == "my-billing-project" for ds in sources.values())
    assert all(ds["datasetId"] == "iot_prod" for ds in sources.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"project": "My_Project", "dataset": "iot"}, "not a GCP project id"),
    ({"project": "my-iot-dev-project", "dataset": "iot-dev"}, "not a BigQuery dataset id"),
    ({"project": "my-iot-dev-project", "dataset": "iot", "template_report_id": "abc&ds.ds0.tableId=x"},
     "not a Looker Studio report id"),
    ({"project": "my-iot-dev-project", "dataset": "iot", "billing_project": "x"}, "not a GCP project id"),
    ({"project": "my-iot-dev-project", "dataset": "iot", "report_name": "  "}, "report_name is empty"),
])
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dashboards.looker_studio_url(**kwargs)


def test_every_source_reads_a_spec_view_and_covers_the_three_dashboard_pages() -> None:
    assert [s.view for s in dashboards.REPORT_SOURCES] == ["device_latest", "telemetry_hourly", "errors_hourly"]
    assert all(s.view in spec.VIEWS for s in dashboards.REPORT_SOURCES)

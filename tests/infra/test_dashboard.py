"""``dashboard_url`` under Pulumi mocks, built from the Warehouse's real view resources, parsed back."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pulumi
import pytest

from gcp_iot_bridge.infra.dashboard import dashboard_url
from gcp_iot_bridge.infra.warehouse import Warehouse, WarehouseArgs
from tests.infra.harness import ProgramFailed, run_program

PROJECT = "my-iot-dev-project"


def _run(dataset: str = "iot_dev", drop_view: str | None = None):
    def program() -> None:
        wh = Warehouse("warehouse", WarehouseArgs(project=PROJECT, dataset_id=dataset, location="US",
                                                  deletion_protection=False))
        views = {k: v for k, v in wh.views.items() if k != drop_view}
        pulumi.export("dashboard_url", dashboard_url(PROJECT, wh.dataset.dataset_id, views))

    return run_program("dev", program=program)


def test_dashboard_url_names_the_stack_project_dataset_and_views() -> None:
    url = _run().outputs["dashboard_url"]
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "lookerstudio.google.com", "/reporting/create")
    q = {k: v[0] for k, v in parse_qs(parts.query, strict_parsing=True).items()}
    aliases = sorted({k.split(".")[1] for k in q if k.startswith("ds.")})
    assert aliases == ["ds0", "ds1", "ds2"]
    assert {q[f"ds.{a}.projectId"] for a in aliases} == {PROJECT}
    assert {q[f"ds.{a}.datasetId"] for a in aliases} == {"iot_dev"}
    assert {q[f"ds.{a}.connector"] for a in aliases} == {"bigQuery"}
    assert {q[f"ds.{a}.type"] for a in aliases} == {"TABLE"}
    assert sorted(q[f"ds.{a}.tableId"] for a in aliases) == ["device_latest", "errors_hourly", "telemetry_hourly"]


def test_a_view_the_warehouse_does_not_declare_fails_the_program() -> None:
    with pytest.raises(ProgramFailed, match="declares no view"):
        _run(drop_view="errors_hourly")

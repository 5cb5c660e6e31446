"""Warehouse under mocks: the dataset, the four contract tables with explicit schemas, partitioning and clustering,
the dashboard views, and demo-stack data expiry."""

from __future__ import annotations

import json

import pytest

from iotbridge import spec
from tests.infra import harness

TABLE = "gcp:bigquery/table:Table"
DATASET = "gcp:bigquery/dataset:Dataset"
DAY_MS = 24 * 3600 * 1000


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def tables(run: harness.StackRun) -> dict[str, harness.Resource]:
    return {t.get("tableId"): t for t in run.of_type(TABLE) if "view" not in t.inputs}


def views(run: harness.StackRun) -> dict[str, harness.Resource]:
    return {t.get("tableId"): t for t in run.of_type(TABLE) if "view" in t.inputs}


def test_dataset_from_config(run: harness.StackRun) -> None:
    (dataset,) = run.of_type(DATASET)
    assert dataset.get("datasetId") == run.config["gcp-iot-bridge:bigqueryDataset"]
    assert dataset.get("location") == run.config["gcp-iot-bridge:bigqueryLocation"]
    assert dataset.get("labels", {}).get("managed-by") == "pulumi"
    assert run.outputs["bigquery_dataset"] == dataset.get("datasetId")


def test_the_four_contract_tables_with_schemas_from_the_spec(run: harness.StackRun) -> None:
    found = tables(run)
    assert {"telemetry_raw", "telemetry_1m", "telemetry_errors", "device_logs"} <= set(found)
    assert set(found) == set(spec.TABLES)
    for name, table in found.items():
        assert json.loads(table.get("schema")) == spec.TABLES[name].schema(), name
        assert table.get("datasetId") == run.config["gcp-iot-bridge:bigqueryDataset"]


def test_telemetry_raw_is_partitioned_on_event_time_and_clustered_by_device(run: harness.StackRun) -> None:
    raw = tables(run)["telemetry_raw"]
    assert raw.get("timePartitioning", {}).get("field") == "event_time"
    assert raw.get("timePartitioning", {}).get("type") == "DAY"
    assert raw.get("clusterings") == ["device_id"]
    columns = {c["name"]: c for c in json.loads(raw.get("schema"))}
    assert columns["event_time"]["type"] == "TIMESTAMP" and columns["device_id"]["mode"] == "REQUIRED"
    for needed in ("publish_time", "message_id"):
        assert needed in columns


def test_device_logs_has_the_columns_a_write_metadata_subscription_writes(run: harness.StackRun) -> None:
    # Pub/Sub refuses a BigQuery subscription with write_metadata when these columns are missing or mistyped.
    columns = {c["name"]: c["type"] for c in json.loads(tables(run)["device_logs"].get("schema"))}
    assert columns["subscription_name"] == "STRING"
    assert columns["message_id"] == "STRING"
    assert columns["publish_time"] == "TIMESTAMP"
    assert columns["attributes"] in ("STRING", "JSON")
    assert columns["data"] in ("STRING", "BYTES", "JSON")


def test_views_are_standard_sql_over_this_dataset(run: harness.StackRun) -> None:
    project = run.config["gcp:project"]
    dataset = run.config["gcp-iot-bridge:bigqueryDataset"]
    found = views(run)
    assert {"device_latest", "telemetry_hourly"} <= set(found)
    for name, view in found.items():
        # Unset, the API assumes legacy SQL and refuses the backquoted standard-SQL table names.
        assert view.get("view", {}).get("useLegacySql") is False, name
        query = view.get("view", {}).get("query", "")
        assert f"`{project}.{dataset}." in query and "{" not in query, name


def test_views_wait_for_the_tables_they_read(run: harness.StackRun) -> None:
    raw = tables(run)["telemetry_raw"]
    assert run.depends_on(views(run)["device_latest"], raw)


def test_only_demo_data_expires_and_as_partition_expiration(run: harness.StackRun) -> None:
    days = int(run.config["gcp-iot-bridge:bigqueryTableExpirationDays"])
    (dataset,) = run.of_type(DATASET)
    # Never a table expiration: BigQuery would drop the managed tables, and the provider cannot unset it.
    assert "defaultTableExpirationMs" not in dataset.inputs
    for table in run.of_type(TABLE):
        assert "expirationTime" not in table.inputs
    if run.stack == "demo":
        assert days > 0
        assert dataset.get("defaultPartitionExpirationMs") == days * DAY_MS
        for name, table in tables(run).items():
            assert table.get("timePartitioning", {}).get("expirationMs") == days * DAY_MS, name
    else:
        assert days == 0
        assert "defaultPartitionExpirationMs" not in dataset.inputs
        for table in tables(run).values():
            assert "expirationMs" not in table.get("timePartitioning", {})

"""The dashboard views of ``iotbridge.spec``, created and queried on the local BigQuery with known rows.

The same SQL is what the Warehouse declares in BigQuery; here it must be accepted by the local engine (the
provisioner would otherwise skip the view silently) and return what each report page promises.
"""

from __future__ import annotations

import datetime as dt

import pytest

from iotbridge import spec
from iotbridge.local import provision

pytestmark = pytest.mark.emulator

PROJECT = "local-project"
DATASET = "iot_views"  # its own dataset on the session's local BigQuery


@pytest.fixture(scope="module")
def client(bigquery_emulator):
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    made = provision.provision_bigquery(provision.LocalNames(project=PROJECT, dataset=DATASET), endpoint)
    assert set(spec.VIEWS) <= set(made), f"views the local BigQuery did not accept: {set(spec.VIEWS) - set(made)}"
    return provision.bigquery_client(PROJECT, endpoint)


def _insert(client, table: str, rows: list[dict]) -> None:
    assert client.insert_rows_json(f"{PROJECT}.{DATASET}.{table}", rows, retry=None, timeout=60) == []


def _rows(client, view: str) -> list[dict]:
    job = client.query(f"SELECT * FROM `{PROJECT}.{DATASET}.{view}`", timeout=60)
    return [dict(r) for r in job.result(timeout=60)]


# The top of an hour yesterday: real BigQuery refuses streamed rows far from today in a partitioned table.
HOUR = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(minute=0, second=0, microsecond=0)


def test_device_latest_keeps_each_metrics_latest_value(client) -> None:
    def msg(device: str, minute: int, **metrics: float) -> dict:
        t = (HOUR + dt.timedelta(minutes=minute)).isoformat()
        return {"device_id": device, "event_time": t, "publish_time": t, "message_id": f"{device}-{minute}",
                "metrics": [{"name": k, "value": v} for k, v in metrics.items()]}

    _insert(client, "telemetry_raw", [
        msg("pump-1", 1, temperature=20.0, rpm=1000.0),
        msg("pump-1", 5, temperature=21.0),  # rpm not in this message: its latest is still minute 1's
        msg("pump-1", 9, rpm=1100.0),
        msg("fan-2", 3, temperature=30.0),
    ])
    got = {(r["device_id"], r["metric"]): (r["value"], r["event_time"].minute) for r in _rows(client, "device_latest")}
    assert got == {("pump-1", "temperature"): (21.0, 5), ("pump-1", "rpm"): (1100.0, 9),
                   ("fan-2", "temperature"): (30.0, 3)}


def test_telemetry_hourly_weights_means_by_count(client) -> None:
    def window(minute: int, count: int, lo: float, hi: float, mean: float) -> dict:
        start = HOUR + dt.timedelta(minutes=minute)
        return {"device_id": "pump-1", "metric": "rpm", "window_start": start.isoformat(),
                "window_end": (start + dt.timedelta(minutes=1)).isoformat(),
                "count": count, "min": lo, "max": hi, "mean": mean}

    _insert(client, "telemetry_1m", [window(0, 3, 10.0, 30.0, 20.0), window(1, 1, 60.0, 60.0, 60.0),
                                     window(61, 2, 5.0, 7.0, 6.0)])
    got = {r["hour"]: r for r in _rows(client, "telemetry_hourly")}
    next_hour = HOUR + dt.timedelta(hours=1)
    assert sorted(got) == [HOUR, next_hour]
    first = got[HOUR]
    assert (first["readings"], first["min"], first["max"]) == (4, 10.0, 60.0)
    assert first["mean"] == pytest.approx((3 * 20.0 + 60.0) / 4)  # 30, not the plain mean of means (40)
    assert (got[next_hour]["readings"], got[next_hour]["mean"]) == (2, 6.0)


def test_errors_hourly_counts_per_hour_and_reason(client) -> None:
    def err(reason: str, minute: int) -> dict:
        return {"error": reason, "publish_time": (HOUR + dt.timedelta(minutes=minute)).isoformat()}

    _insert(client, "telemetry_errors", [err("invalid_json", 1), err("invalid_json", 59), err("missing_ts", 30),
                                         err("invalid_json", 60)])
    got = {(r["hour"], r["error"]): r["messages"] for r in _rows(client, "errors_hourly")}
    next_hour = HOUR + dt.timedelta(hours=1)
    assert got == {(HOUR, "invalid_json"): 2, (HOUR, "missing_ts"): 1, (next_hour, "invalid_json"): 1}

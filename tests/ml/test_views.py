"""The edge-model monitoring views of iotbridge.spec, on the local BigQuery, over rows the way the device-logs
subscription writes them (write_metadata columns) from records the runner publishes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from iotbridge.edge_model import EdgeModel, Feature, sha256_hex
from iotbridge.local.provision import LocalNames, bigquery_client, provision_bigquery
from iotbridge.ml.runner import ModelRunner

pytestmark = pytest.mark.emulator


def runner_records(tmp_path) -> dict[str, list[dict]]:
    """Real runner output: pump-1 loads v1, infers 4 readings (1 anomaly), then refuses a tampered v2."""
    m = EdgeModel(version="v1", features=(Feature("temperature", 20.0, 1.0),), centroids=((1, (20.0,)),),
                  threshold=3.0, contamination=0.01)
    path = tmp_path / "v1.json"
    path.write_bytes(m.to_bytes())
    out: dict[str, list[dict]] = {"pump-1": [], "pump-2": []}
    r1 = ModelRunner("pump-1", lambda b: out["pump-1"].append(json.loads(b)))
    r1.apply_config(json.dumps({"model": {"uri": path.as_uri(), "version": "v1",
                                          "sha256": sha256_hex(m.to_bytes())}}).encode())
    for t in (20.0, 21.0, 19.5, 30.0):
        r1.observe({"ts": 1, "metrics": {"temperature": t}})
    r1.apply_config(json.dumps({"model": {"uri": path.as_uri(), "version": "v2", "sha256": "0" * 64}}).encode())
    r2 = ModelRunner("pump-2", lambda b: out["pump-2"].append(json.loads(b)))
    r2.apply_config(json.dumps({"model": {"uri": (tmp_path / "nope").as_uri(), "version": "v1",
                                          "sha256": "0" * 64}}).encode())
    return out


@pytest.fixture(scope="module")
def warehouse(bigquery_emulator):
    names = LocalNames(dataset="ml_views_test")
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    made = provision_bigquery(names, endpoint)
    return names, bigquery_client(names.project, endpoint), made


def test_views_are_created_on_the_local_engine(warehouse):
    _, _, made = warehouse
    assert {"edge_model_hourly", "edge_model_fleet"} <= set(made)


def test_views_report_versions_rates_and_refusals(warehouse, tmp_path):
    names, client, _ = warehouse
    now = datetime.now(UTC)
    rows = []
    for device, records in runner_records(tmp_path).items():
        for i, rec in enumerate(records):
            rows.append({"subscription_name": "s", "message_id": f"{device}-{i}",
                         "publish_time": (now - timedelta(seconds=len(records) - i)).isoformat(),
                         "data": json.dumps(rec), "attributes": json.dumps({"deviceId": device, "subFolder": "logs"})})
    # A record whose payload claims another device: the view trusts the bridge's attribute.
    rows.append({"subscription_name": "s", "message_id": "spoof",
                 "publish_time": (now - timedelta(hours=2)).isoformat(),
                 "data": json.dumps({"kind": "inference", "device_id": "pump-2", "model_version": "evil",
                                     "anomaly": False}),
                 "attributes": json.dumps({"deviceId": "pump-3"})})
    table = f"{names.project}.{names.dataset}.device_logs"
    assert client.insert_rows_json(table, rows, retry=None, timeout=30) == []

    def view(name: str) -> list[dict]:
        q = f"SELECT * FROM `{names.project}.{names.dataset}.{name}`"
        return [dict(r) for r in client.query(q, retry=None, job_retry=None, timeout=30).result(timeout=30)]

    fleet = {r["device_id"]: r for r in view("edge_model_fleet")}
    assert set(fleet) == {"pump-1", "pump-2", "pump-3"}
    p1 = fleet["pump-1"]
    assert (p1["model_version"], p1["inferences_24h"], p1["anomalies_24h"]) == ("v1", 4, 1)
    assert p1["anomaly_rate_24h"] == pytest.approx(0.25)
    assert p1["last_rejected_version"] == "v2" and "digest mismatch" in p1["last_rejected_reason"]
    p2 = fleet["pump-2"]
    assert p2["model_version"] is None and p2["inferences_24h"] == 0 and "No such file" in p2["last_rejected_reason"]
    assert fleet["pump-3"]["model_version"] == "evil"

    hourly = [r for r in view("edge_model_hourly") if r["device_id"] == "pump-1"]
    assert sum(r["inferences"] for r in hourly) == 4 and sum(r["anomalies"] for r in hourly) == 1
    assert all(r["model_version"] == "v1" for r in hourly)

"""The local trainer against the real local BigQuery: the cloud's SQL where the engine allows, NumPy k-means
where it has no BigQuery ML."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from iotbridge.edge_model import EdgeModel
from iotbridge.local.provision import LocalNames, bigquery_client, provision_bigquery
from iotbridge.ml import sql, train_local

pytestmark = pytest.mark.emulator

MODES = [(20.0, 1000.0), (35.0, 3000.0)]  # idle, under load


def telemetry_rows(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        t, r = MODES[i % 2]
        metrics = [{"name": "temperature", "value": float(rng.normal(t, 0.5))},
                   {"name": "rpm", "value": float(rng.normal(r, 30.0))}]
        if i % 10 == 3:
            metrics = metrics[:1]  # a message without rpm: imputed with the mean
        rows.append({"device_id": f"dev-{i % 3}", "event_time": (now - timedelta(seconds=i)).isoformat(),
                     "publish_time": now.isoformat(), "message_id": f"m{i}", "seq": i, "metrics": metrics})
    # A message with none of the model's metrics and one older than the training window: both left out.
    rows.append({"device_id": "dev-0", "event_time": now.isoformat(), "publish_time": now.isoformat(),
                 "message_id": "other", "metrics": [{"name": "humidity", "value": 3.0}]})
    rows.append({"device_id": "dev-0", "event_time": (now - timedelta(days=30)).isoformat(),
                 "publish_time": now.isoformat(), "message_id": "old",
                 "metrics": [{"name": "temperature", "value": 500.0}, {"name": "rpm", "value": 1.0}]})
    return rows


@pytest.fixture(scope="module")
def trained(bigquery_emulator):
    names = LocalNames(dataset="ml_train_test")
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    provision_bigquery(names, endpoint)
    client = bigquery_client(names.project, endpoint)
    errors = client.insert_rows_json(f"{names.project}.{names.dataset}.telemetry_raw", telemetry_rows(200),
                                     retry=None, timeout=30)
    assert errors == []
    spec = sql.ModelSpec(names.project, names.dataset, ("temperature", "rpm"), num_clusters=2, contamination=0.05)
    return client, spec, train_local.train(client, spec, "v1")


def test_create_model_statement_accepted_by_local_engine(trained):
    client, spec, _ = trained
    m = client.get_model(spec.model_ref, retry=None, timeout=30)
    assert m.model_type == "KMEANS"
    assert sorted(f.name for f in m.feature_columns) == ["rpm", "temperature"]


def test_model_finds_the_operating_modes(trained):
    _, _, model = trained
    assert model.training_rows == 200  # the humidity-only and the 30-day-old message are not training rows
    got = sorted(vals for _, vals in model.centroids)
    assert len(got) == 2
    for (t, r), (ct, cr) in zip(sorted(MODES), got, strict=True):
        # A fifth of the load-mode rows lack rpm and are imputed with the overall mean (~2000), as BigQuery ML
        # does: that pulls the load centroid's rpm to ~2800.
        assert abs(ct - t) < 2 and abs(cr - r) < 300


def test_threshold_is_the_training_quantile_the_device_would_compute(trained):
    _, spec, model = trained
    x = train_local.training_matrix(
        [{"temperature": next(m["value"] for m in r["metrics"] if m["name"] == "temperature"),
          "rpm": next((m["value"] for m in r["metrics"] if m["name"] == "rpm"), None)}
         for r in telemetry_rows(200)[:200]], spec.metrics)
    scores = sorted(model.infer({k: v for k, v in zip(spec.metrics, row, strict=True) if not np.isnan(v)}).score  # type: ignore[union-attr]
                    for row in x)
    exact = float(np.quantile(scores, 1 - spec.contamination))
    assert model.threshold == pytest.approx(exact, rel=0.05)  # APPROX_QUANTILES vs the exact quantile
    flagged = sum(s > model.threshold for s in scores) / len(scores)
    assert 0 < flagged <= spec.contamination + 0.02


def test_anomalies_are_flagged(trained):
    _, _, model = trained
    assert not model.infer({"temperature": 20.2, "rpm": 1010.0}).anomaly  # type: ignore[union-attr]
    assert model.infer({"temperature": 35.0, "rpm": 1000.0}).anomaly  # type: ignore[union-attr]  # hot while idle


def test_artifact_written_and_reloaded(trained, tmp_path):
    _, _, model = trained
    path, digest = train_local.write_artifact(model, tmp_path)
    assert EdgeModel.load_verified(path.read_bytes(), digest, "v1") == model
    train_local.write_artifact(model, tmp_path)  # the same bytes again: fine
    other = EdgeModel.from_dict({**model.to_dict(), "threshold": model.threshold + 1})
    with pytest.raises(train_local.TrainingError, match="different model"):
        train_local.write_artifact(other, tmp_path)


def test_no_data_is_a_clear_error(bigquery_emulator):
    names = LocalNames(dataset="ml_train_empty")
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    provision_bigquery(names, endpoint)
    spec = sql.ModelSpec(names.project, names.dataset, ("temperature",))
    with pytest.raises(train_local.TrainingError, match="no telemetry with metrics temperature"):
        train_local.train(bigquery_client(names.project, endpoint), spec, "v1")


def test_cli_prints_pointer(trained, bigquery_emulator, tmp_path, capsys):
    _, spec, _ = trained
    rc = train_local.main(["--metrics", "temperature,rpm", "--model-version", "v9", "--out", str(tmp_path),
                           "--clusters", "2", "--bigquery-endpoint", bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"],
                           "--project", spec.project, "--dataset", spec.dataset])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    data = (tmp_path / "v9" / "model.json").read_bytes()
    assert out["uri"] == (tmp_path / "v9" / "model.json").resolve().as_uri()
    assert EdgeModel.load_verified(data, out["sha256"], "v9").training_rows == 200

"""The shared edge-model SQL: the cloud export is the locally-run artifact query with only the model sources
swapped, and nothing outside the safe alphabet reaches a literal."""

from __future__ import annotations

import pytest

from iotbridge.ml import sql

SPEC = sql.ModelSpec("p", "iot", ("temperature", "rpm"), num_clusters=3, contamination=0.02)


def test_export_is_the_artifact_query_on_the_bigquery_ml_sources():
    export = sql.export_artifact(SPEC, "v7", "p-iot-dev-models")
    head, body = export.split(" AS\n", 1)
    assert head == ("EXPORT DATA OPTIONS (uri = 'gs://p-iot-dev-models/edge/v7/model-*.json', format = 'JSON', "
                    "overwrite = false)")
    assert body == sql.artifact_select(SPEC, "v7", "bigquery-ml:p.iot.edge_anomaly", *sql.ml_sources(SPEC))
    assert sql.feature_select(SPEC) in body and sql.feature_select(SPEC) in sql.create_model(SPEC)


def test_create_model_options():
    stmt = sql.create_model(SPEC)
    assert stmt.startswith("CREATE OR REPLACE MODEL `p.iot.edge_anomaly`")
    for opt in ("model_type = 'KMEANS'", "num_clusters = 3", "standardize_features = TRUE",
                "kmeans_init_method = 'KMEANS++'"):
        assert opt in stmt
    assert "INTERVAL 7 DAY" in stmt


def test_threshold_quantile_offset():
    assert SPEC.quantile_offset == 980
    assert "APPROX_QUANTILES(d2, 1000)[OFFSET(980)]" in sql.artifact_select(SPEC, "v1", "s", "a", "b")


def test_unsafe_values_never_reach_sql():
    with pytest.raises(ValueError):
        sql.ModelSpec("p", "iot", ("temp'; DROP TABLE x; --",))
    with pytest.raises(ValueError):
        sql.artifact_select(SPEC, "v1' OR '1", "s", "a", "b")
    with pytest.raises(ValueError, match="unsafe literal"):
        sql.literal_table([{"input": "x'y", "mean": 1.0}])
    with pytest.raises(ValueError, match="unsupported literal"):
        sql.literal_table([{"input": "x", "mean": None}])

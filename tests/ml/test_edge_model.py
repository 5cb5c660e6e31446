"""The edge artifact: canonical bytes, digest, validation, and inference that matches a NumPy reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iotbridge.edge_model import (
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    EdgeModel,
    Feature,
    ModelPointer,
    sha256_hex,
    verify_digest,
)


def model(version: str = "v1", threshold: float = 2.0) -> EdgeModel:
    return EdgeModel(version=version,
                     features=(Feature("temperature", 20.0, 2.0), Feature("rpm", 1000.0, 100.0)),
                     centroids=((1, (18.0, 900.0)), (2, (24.0, 1200.0))),
                     threshold=threshold, contamination=0.01, trained_at="2026-11-27T14:00:00Z",
                     source="test", training_rows=10)


def test_roundtrip_is_canonical_and_digest_stable():
    m = model()
    data = m.to_bytes()
    again = EdgeModel.from_bytes(data)
    assert again == m
    assert again.to_bytes() == data
    assert sha256_hex(data) == sha256_hex(model().to_bytes())
    assert b" " not in data and json.loads(data)["format"] == "iotbridge-edge-model"


def test_bigquery_json_export_shape_is_read():
    # BigQuery's JSON export writes INT64 as strings and ends the row with a newline.
    obj = model().to_dict()
    obj["format_version"] = "1"
    obj["training_rows"] = "10"
    for c in obj["centroids"]:
        c["id"] = str(c["id"])
    m = EdgeModel.from_bytes((json.dumps(obj) + "\n").encode())
    assert m.centroids[0][0] == 1 and m.training_rows == 10


def reference_score(m: EdgeModel, metrics: dict[str, float]) -> tuple[float, int]:
    sd = np.array([f.stddev for f in m.features])
    x = np.array([metrics.get(f.name, f.mean) for f in m.features])
    c = np.array([v for _, v in m.centroids])
    d = np.sqrt((((x - c) / sd) ** 2).sum(axis=1))
    return float(d.min()), m.centroids[int(d.argmin())][0]


@pytest.mark.parametrize("reading", [{"temperature": 18.5, "rpm": 950.0}, {"temperature": 30.0, "rpm": 1200.0},
                                     {"temperature": 23.0}, {"rpm": 100.0, "other": 5.0}])
def test_inference_matches_numpy_reference(reading):
    m = model()
    got = m.infer(reading)
    assert got is not None
    score, cluster = reference_score(m, reading)
    assert got.score == pytest.approx(score)
    assert got.cluster == cluster
    assert got.anomaly == (score > m.threshold)
    assert got.features_present == sum(1 for f in m.features if f.name in reading)


def test_inference_flags_far_reading_and_not_near_one():
    m = model()
    assert m.infer({"temperature": 18.0, "rpm": 900.0}).anomaly is False  # type: ignore[union-attr]
    assert m.infer({"temperature": 40.0, "rpm": 900.0}).anomaly is True  # type: ignore[union-attr]


def test_reading_without_model_features_gives_no_inference():
    assert model().infer({"humidity": 3.0}) is None
    assert model().infer({"temperature": float("nan"), "rpm": True}) is None


def test_zero_stddev_feature_contributes_nothing():
    m = EdgeModel(version="v1", features=(Feature("a", 5.0, 0.0), Feature("b", 0.0, 1.0)),
                  centroids=((1, (5.0, 0.0)),), threshold=1.0, contamination=0.01)
    assert m.infer({"a": 1e9, "b": 0.5}).score == pytest.approx(0.5)  # type: ignore[union-attr]


def test_verify_digest():
    data = model().to_bytes()
    verify_digest(data, sha256_hex(data))
    with pytest.raises(ArtifactError, match="digest mismatch"):
        verify_digest(data + b" ", sha256_hex(data))
    with pytest.raises(ArtifactError, match="64 lower-case hex"):
        verify_digest(data, "ABC")


def test_load_verified_checks_digest_before_parsing_and_version():
    data = model("v2").to_bytes()
    assert EdgeModel.load_verified(data, sha256_hex(data), "v2").version == "v2"
    with pytest.raises(ArtifactError, match="digest mismatch"):
        EdgeModel.load_verified(b"not json", sha256_hex(data))
    with pytest.raises(ArtifactError, match="config says 'v3'"):
        EdgeModel.load_verified(data, sha256_hex(data), "v3")
    big = b" " * (MAX_ARTIFACT_BYTES + 1)
    with pytest.raises(ArtifactError, match="limit"):
        EdgeModel.load_verified(big, sha256_hex(big))


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(format="onnx"), "format"),
    (lambda o: o.update(format_version=2), "format_version"),
    (lambda o: o.update(kind="autoencoder"), "kind"),
    (lambda o: o.update(version="bad version"), "version"),
    (lambda o: o.update(threshold="nan"), "finite"),
    (lambda o: o.update(threshold=-1), "threshold"),
    (lambda o: o.update(contamination=0.7), "contamination"),
    (lambda o: o["features"][0].update(stddev=-1), "stddev"),
    (lambda o: o["features"][1].update(name="temperature"), "duplicate feature"),
    (lambda o: o["features"][0].update(name="bad-name"), "feature name"),
    (lambda o: o["centroids"][0].update(values=[1.0]), "values for 2 features"),
    (lambda o: o["centroids"][1].update(id=1), "duplicate centroid"),
    (lambda o: o.update(centroids=[]), "no centroids"),
    (lambda o: o.update(features="x"), "lists"),
    (lambda o: o["centroids"][0].pop("values"), "malformed"),
    (lambda o: o["centroids"][0].update(id=True), "integer"),
])
def test_malformed_artifacts_are_refused(mutate, message):
    obj = model().to_dict()
    mutate(obj)
    with pytest.raises(ArtifactError, match=message):
        EdgeModel.from_bytes(json.dumps(obj).encode())


def test_non_json_refused():
    with pytest.raises(ArtifactError, match="not JSON"):
        EdgeModel.from_bytes(b"\xff\xfe")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        EdgeModel.from_bytes(b"[1]")


def test_model_pointer():
    digest = "a" * 64
    p = ModelPointer.from_config({"model": {"uri": "https://h/x?sig=1", "version": "v1", "sha256": digest}})
    assert p == ModelPointer("https://h/x?sig=1", "v1", digest)
    assert ModelPointer.from_config({"sampling": 5}) is None
    for bad, msg in [({"model": "x"}, "object"), ({"model": {"uri": "gs://b/o", "version": "v1", "sha256": digest}},
                                                            "signed https"),
                     ({"model": {"uri": "file:///m", "version": "v1"}}, "sha256"),
                     ({"model": {"uri": "file:///m", "version": "v1", "sha256": "A" * 64}}, "lower-case")]:
        with pytest.raises(ArtifactError, match=msg):
            ModelPointer.from_config(bad)


def test_artifact_is_small():
    # 4 clusters × 8 metrics: far under a config's 64 KB, and it never travels in the config anyway.
    m = EdgeModel(version="v1", features=tuple(Feature(f"m{i}", 1.0, 1.0) for i in range(8)),
                  centroids=tuple((j, tuple(float(j)+math.pi for _ in range(8))) for j in range(1, 5)),
                  threshold=3.0, contamination=0.01)
    assert len(m.to_bytes()) < 2048

"""Train the edge anomaly model against the local BigQuery and write its artifact.

The local engine (bqemulator on DuckDB) runs BigQuery's SQL but has no BigQuery ML: it accepts
``CREATE MODEL`` (it checks the options and the query and registers the model's schema) without training, and
has no ``ML.CENTROIDS`` / ``ML.FEATURE_INFO``. So, step by step:

1. ``CREATE OR REPLACE MODEL`` — the exact statement the cloud runs (:func:`iotbridge.ml.sql.create_model`), so a
   bad option or a broken feature query fails here as it would in BigQuery.
2. The training rows: the same feature query (:func:`iotbridge.ml.sql.feature_select`) on the local engine.
3. Training: standardize (mean, sample stddev, NULL → mean, as BigQuery ML does), then k-means++ seeding and
   Lloyd iterations in NumPy — the part BigQuery ML does in the cloud. Seeded: the same data gives the same model.
4. The artifact: the cloud's artifact query (:func:`iotbridge.ml.sql.artifact_select`) on the local engine, with
   the fitted statistics and centroids as literal tables in place of ``ML.FEATURE_INFO`` / ``ML.CENTROIDS``. The
   threshold is therefore computed by the same SQL as in the cloud.

The result is a file in the format of :mod:`iotbridge.edge_model`; a model trained here and one exported by
BigQuery ML are read by the same device code.

Run: ``python -m iotbridge.ml.train_local --metrics temperature,rpm --model-version v1 --out models/``
(against the running local stack), or ``iotctl models train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iotbridge.edge_model import EdgeModel, sha256_hex
from iotbridge.ml import sql


class TrainingError(RuntimeError):
    """No model can be trained (no data, bad parameters); the message is one line for the operator."""


@dataclass(frozen=True)
class Fitted:
    means: np.ndarray  # (d,)
    stddevs: np.ndarray  # (d,)
    centroids: np.ndarray  # (k, d) in metric units
    iterations: int


def standardize(x: np.ndarray, means: np.ndarray, stddevs: np.ndarray) -> np.ndarray:
    filled = np.where(np.isnan(x), means, x)
    safe = np.where(stddevs > 0, stddevs, 1.0)
    return np.where(stddevs > 0, (filled - means) / safe, 0.0)


def fit_kmeans(x: np.ndarray, k: int, max_iterations: int = 20, seed: int = 0) -> Fitted:
    """k-means++ then Lloyd on standardized ``x`` (rows × features, NaN = missing)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise TrainingError("no training rows")
    means = np.nanmean(x, axis=0)
    if np.isnan(means).any():
        raise TrainingError("a metric has no value in any training row")
    ddof = 1 if x.shape[0] > 1 else 0
    stddevs = np.nan_to_num(np.nanstd(x, axis=0, ddof=ddof))
    z = standardize(x, means, stddevs)
    distinct = np.unique(z, axis=0)
    k = max(1, min(k, len(distinct)))
    rng = np.random.default_rng(seed)
    centers = [distinct[rng.integers(len(distinct))]]
    for _ in range(1, k):
        d2 = np.min(((distinct[:, None, :] - np.asarray(centers)[None, :, :]) ** 2).sum(-1), axis=1)
        centers.append(distinct[rng.choice(len(distinct), p=d2 / d2.sum())])
    c = np.asarray(centers, dtype=float)
    it = 0
    for it in range(1, max_iterations + 1):  # noqa: B007 - the count of iterations is read after the loop
        labels = np.argmin(((z[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)
        new = np.array([z[labels == j].mean(axis=0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            c = new
            break
        c = new
    raw = c * np.where(stddevs > 0, stddevs, 0.0) + means
    return Fitted(means=means, stddevs=stddevs, centroids=raw, iterations=it)


def training_matrix(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> np.ndarray:
    return np.array([[np.nan if r.get(m) is None else float(r[m]) for m in metrics] for r in rows], dtype=float)


def train(client: Any, spec: sql.ModelSpec, version: str, seed: int = 0, timeout: float = 120) -> EdgeModel:
    """Train on the local BigQuery behind ``client`` (a ``google.cloud.bigquery.Client``)."""

    def run(statement: str) -> list[dict[str, Any]]:
        job = client.query(statement, retry=None, job_retry=None, timeout=timeout)
        return [dict(r) for r in job.result(timeout=timeout)]

    run(sql.create_model(spec))
    rows = run(sql.feature_select(spec))
    if not rows:
        raise TrainingError(f"no telemetry with metrics {', '.join(spec.metrics)} in the last "
                            f"{spec.training_days} days in {spec.project}.{spec.dataset}.telemetry_raw")
    fitted = fit_kmeans(training_matrix(rows, spec.metrics), spec.num_clusters, spec.max_iterations, seed)
    feature_info = sql.literal_table([{"input": m, "mean": float(fitted.means[i]), "stddev": float(fitted.stddevs[i])}
                                      for i, m in enumerate(spec.metrics)])
    centroids = sql.literal_table([
        {"centroid_id": j + 1, "feature": m, "numerical_value": float(fitted.centroids[j, i])}
        for j in range(len(fitted.centroids)) for i, m in enumerate(spec.metrics)])
    out = run(sql.artifact_select(spec, version, f"local-trainer:{spec.model_ref}", feature_info, centroids))
    if len(out) != 1:
        raise TrainingError(f"artifact query returned {len(out)} rows, expected 1")
    return EdgeModel.from_dict(json.loads(json.dumps(out[0], default=str)))


def write_artifact(model: EdgeModel, out_dir: Path) -> tuple[Path, str]:
    """Write ``{out_dir}/{version}/model.json``; returns its path and SHA-256. An existing different file for
    the same version is an error: a version names one artifact forever."""
    data = model.to_bytes()
    path = out_dir / model.version / "model.json"
    if path.exists() and path.read_bytes() != data:
        raise TrainingError(f"{path} already holds a different model {model.version}: pick a new --model-version")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path, sha256_hex(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--metrics", required=True, help="comma-separated metric names, the model's features")
    p.add_argument("--model-version", required=True, help="version label, e.g. v1")
    p.add_argument("--out", type=Path, required=True, help="directory; writes OUT/VERSION/model.json")
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--training-days", type=int, default=7)
    p.add_argument("--contamination", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bigquery-endpoint", help="default: the running local stack's")
    p.add_argument("--project", default=None)
    p.add_argument("--dataset", default=None)
    a = p.parse_args(argv)
    from iotbridge.local.provision import bigquery_client

    endpoint, project, dataset = a.bigquery_endpoint, a.project, a.dataset
    if endpoint is None:
        from iotbridge.local.stack import LocalStack

        st = LocalStack().status()
        endpoint, project, dataset = str(st["bigquery_endpoint"]), str(st["project_id"]), str(st["bigquery_dataset"])
    spec = sql.ModelSpec(project or "local-project", dataset or "iot", tuple(a.metrics.split(",")),
                         num_clusters=a.clusters, training_days=a.training_days, contamination=a.contamination)
    model = train(bigquery_client(spec.project, endpoint), spec, a.model_version, a.seed)
    path, digest = write_artifact(model, a.out)
    print(json.dumps({"uri": path.resolve().as_uri(), "version": model.version, "sha256": digest,
                      "size": path.stat().st_size, "training_rows": model.training_rows}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

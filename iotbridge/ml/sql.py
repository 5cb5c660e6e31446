"""The edge model's SQL, rendered once for BigQuery (``gcp_iot_bridge/infra/edge_ml.py``) and the local engine
(:mod:`iotbridge.ml.train_local`). Pure text, like :mod:`iotbridge.spec`: no client, no Pulumi.

Three statements:

* :func:`feature_select` — one training row per accepted message of ``telemetry_raw``, one column per metric
  (NULL when the message lacks it; BigQuery ML imputes the mean). Rows with none of the metrics are left out.
* :func:`create_model` — ``CREATE OR REPLACE MODEL … OPTIONS (model_type = 'KMEANS' …) AS <feature_select>``.
  BigQuery trains it; the local engine accepts the same statement (it checks the options and the query and
  registers the model's schema) but does not train, so the local trainer fits the centroids itself.
* :func:`artifact_select` — one row whose JSON is the edge artifact (:mod:`iotbridge.edge_model`): features
  from ``ML.FEATURE_INFO``, centroids from ``ML.CENTROIDS``, and the anomaly threshold: the
  ``1 - contamination`` quantile of the training rows' distance to their nearest centroid, computed with the
  very formula the device uses. The two model sources are parameters: the cloud passes the ``ML.*`` table
  functions, the local trainer passes literal tables of the same columns, so the rest of the query is the one
  that runs in the cloud. :func:`export_artifact` wraps it in ``EXPORT DATA`` to the models bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from iotbridge.edge_model import FEATURE_NAME_RE, FORMAT, FORMAT_VERSION, KIND, VERSION_RE

QUANTILE_BUCKETS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """What to train: on which metrics, over how many days, how many clusters."""

    project: str
    dataset: str
    metrics: tuple[str, ...]
    model: str = "edge_anomaly"
    num_clusters: int = 4
    training_days: int = 7
    contamination: float = 0.01
    max_iterations: int = 20

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError("edge model needs at least one metric")
        for m in self.metrics:
            if not FEATURE_NAME_RE.fullmatch(m):
                raise ValueError(f"metric {m!r} cannot be a model feature: must match {FEATURE_NAME_RE.pattern}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"duplicate metrics in {self.metrics}")
        if not FEATURE_NAME_RE.fullmatch(self.model):
            raise ValueError(f"model name {self.model!r} must match {FEATURE_NAME_RE.pattern}")
        if not 2 <= self.num_clusters <= 100:  # BigQuery ML KMEANS: num_clusters in [2, 100]
            raise ValueError(f"num_clusters must be in 2..100, got {self.num_clusters}")
        if not 1 <= self.training_days <= 3650:
            raise ValueError(f"training_days must be in 1..3650, got {self.training_days}")
        if not 0 < self.contamination < 0.5:  # ML.DETECT_ANOMALIES accepts [0, 0.5]
            raise ValueError(f"contamination must be in (0, 0.5), got {self.contamination}")
        if not 1 <= self.max_iterations <= 1000:
            raise ValueError(f"max_iterations must be in 1..1000, got {self.max_iterations}")

    @property
    def model_ref(self) -> str:
        return f"{self.project}.{self.dataset}.{self.model}"

    @property
    def quantile_offset(self) -> int:
        return round(QUANTILE_BUCKETS * (1 - self.contamination))


def _lit(s: str) -> str:
    """A GoogleSQL string literal for a value already restricted to a safe alphabet."""
    if "'" in s or "\\" in s or "\n" in s:
        raise ValueError(f"unsafe literal {s!r}")
    return f"'{s}'"


def feature_select(spec: ModelSpec) -> str:
    cols = ",\n  ".join(
        f"(SELECT ANY_VALUE(m.value) FROM UNNEST(metrics) AS m WHERE m.name = {_lit(name)}) AS `{name}`"
        for name in spec.metrics)
    names = ", ".join(_lit(n) for n in spec.metrics)
    return (f"SELECT\n  {cols}\n"
            f"FROM `{spec.project}.{spec.dataset}.telemetry_raw`\n"
            # event_time is the partitioning column: this filter also bounds the bytes scanned.
            f"WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {spec.training_days} DAY)\n"
            f"  AND EXISTS (SELECT 1 FROM UNNEST(metrics) AS m WHERE m.name IN ({names}))")


def create_model(spec: ModelSpec) -> str:
    return (f"CREATE OR REPLACE MODEL `{spec.model_ref}`\n"
            f"OPTIONS (model_type = 'KMEANS', num_clusters = {spec.num_clusters}, "
            f"kmeans_init_method = 'KMEANS++', standardize_features = TRUE, "
            f"max_iterations = {spec.max_iterations})\nAS\n{feature_select(spec)}")


def ml_sources(spec: ModelSpec) -> tuple[str, str]:
    """The BigQuery ML table functions the artifact is read from (cloud)."""
    return (f"ML.FEATURE_INFO(MODEL `{spec.model_ref}`)", f"ML.CENTROIDS(MODEL `{spec.model_ref}`)")


def artifact_select(spec: ModelSpec, version: str, source: str, feature_info: str, centroids: str) -> str:
    """One row, the edge artifact. ``feature_info``/``centroids``: FROM items with the columns of
    ``ML.FEATURE_INFO`` (``input, mean, stddev``) and ``ML.CENTROIDS`` (``centroid_id, feature,
    numerical_value``)."""
    if not VERSION_RE.fullmatch(version):
        raise ValueError(f"model version {version!r} must match {VERSION_RE.pattern}")
    idx = list(enumerate(spec.metrics))
    stats = ",\n    ".join(
        f"ANY_VALUE(IF(input = {_lit(n)}, mean, NULL)) AS mean_{i}, "
        f"ANY_VALUE(IF(input = {_lit(n)}, stddev, NULL)) AS sd_{i}" for i, n in idx)
    cents = ",\n    ".join(f"ANY_VALUE(IF(feature = {_lit(n)}, numerical_value, NULL)) AS c_{i}" for i, n in idx)
    # The device's formula (iotbridge.edge_model.EdgeModel.infer): a missing value is the mean, a zero stddev
    # contributes nothing.
    dist = "\n      + ".join(
        f"POW(IFNULL(SAFE_DIVIDE(IFNULL(t.`{n}`, s.mean_{i}) - c.c_{i}, s.sd_{i}), 0), 2)" for i, n in idx)
    feats = ", ".join(f"STRUCT({_lit(n)} AS name, mean_{i} AS mean, sd_{i} AS stddev)" for i, n in idx)
    cvals = ", ".join(f"c_{i}" for i, _ in idx)
    return f"""WITH training AS (
  SELECT ROW_NUMBER() OVER () AS rid, f.* FROM (
{feature_select(spec)}
  ) AS f
),
stats AS (
  SELECT
    {stats}
  FROM {feature_info}
),
cent AS (
  SELECT centroid_id,
    {cents}
  FROM {centroids}
  GROUP BY centroid_id
),
scored AS (
  SELECT t.rid, MIN(
      {dist}) AS d2
  FROM training AS t CROSS JOIN stats AS s CROSS JOIN cent AS c
  GROUP BY t.rid
)
SELECT
  {_lit(FORMAT)} AS format,
  {FORMAT_VERSION} AS format_version,
  {_lit(KIND)} AS kind,
  {_lit(version)} AS version,
  FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%SZ', CURRENT_TIMESTAMP()) AS trained_at,
  {_lit(source)} AS source,
  (SELECT COUNT(*) FROM scored) AS training_rows,
  {spec.contamination!r} AS contamination,
  (SELECT SQRT(APPROX_QUANTILES(d2, {QUANTILE_BUCKETS})[OFFSET({spec.quantile_offset})]) FROM scored) AS threshold,
  (SELECT [{feats}] FROM stats) AS features,
  ARRAY(SELECT AS STRUCT centroid_id AS id, [{cvals}] AS `values` FROM cent ORDER BY centroid_id) AS centroids"""


def artifact_prefix(version: str) -> str:
    """Object prefix of one model version in the models bucket."""
    if not VERSION_RE.fullmatch(version):
        raise ValueError(f"model version {version!r} must match {VERSION_RE.pattern}")
    return f"edge/{version}/"


# EXPORT DATA needs one '*' in the URI; a one-row result is written as a single file, shard 000000000000.
ARTIFACT_OBJECT = "model-000000000000.json"


def export_artifact(spec: ModelSpec, version: str, bucket: str) -> str:
    """``EXPORT DATA`` of the artifact row to ``gs://{bucket}/edge/{version}/model-*.json`` (one JSON line)."""
    feature_info, centroids = ml_sources(spec)
    body = artifact_select(spec, version, f"bigquery-ml:{spec.model_ref}", feature_info, centroids)
    uri = f"gs://{bucket}/{artifact_prefix(version)}model-*.json"
    # overwrite = false: BigQuery refuses a non-empty destination, so a version, once exported, is never replaced.
    return f"EXPORT DATA OPTIONS (uri = {_lit(uri)}, format = 'JSON', overwrite = false) AS\n{body}"


def literal_table(rows: Sequence[dict[str, object]]) -> str:
    """A FROM item holding ``rows`` (a list of flat dicts of str/float/int), for engines without BigQuery ML."""
    if not rows:
        raise ValueError("literal_table needs at least one row")

    def val(v: object) -> str:
        if isinstance(v, str):
            return _lit(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"unsupported literal {v!r}")
        return f"CAST({float(v)!r} AS FLOAT64)" if isinstance(v, float) else str(v)

    structs = ", ".join("STRUCT(" + ", ".join(f"{val(v)} AS {k}" for k, v in r.items()) + ")" for r in rows)
    return f"UNNEST([{structs}])"

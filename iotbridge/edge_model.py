"""The edge anomaly model: its artifact format, digest, verification, loading and per-reading inference.

Model choice
------------
A k-means anomaly detector over a device's reading, one feature per metric (the payload's
``metrics``, docs/messages.md):

* Cloud trainer: BigQuery ML ``KMEANS`` (``standardize_features = TRUE``) over ``telemetry_raw``, one training row
  per accepted message. It needs no labels — the fleet has no failure labels — and k clusters capture the operating
  modes (idle, running, under load …) that a single mean/stddev per metric would blur into one wide band.
  A reading's anomaly score is its distance to the nearest centroid in standardized units; it is an anomaly when
  the score exceeds the ``1 - contamination`` quantile of the training scores (the rule of
  ``ML.DETECT_ANOMALIES`` for k-means).
* Edge artifact: the whole model is ``k × n`` centroids plus ``n`` means and standard deviations — a few hundred
  bytes of JSON read back with ``ML.CENTROIDS`` and ``ML.FEATURE_INFO`` and written by an ``EXPORT DATA`` query
  (:mod:`iotbridge.ml.sql`). BigQuery ML's own export is a TensorFlow SavedModel (or an XGBoost booster), not
  TFLite/ONNX; shipping the weights instead of the graph removes the conversion step and the TensorFlow runtime
  from the device. Inference is ``k × n`` subtractions and multiplications in pure Python (``bench/edge_model.py``).
* Locally (no BigQuery ML in the local engine) :mod:`iotbridge.ml.train_local` runs the same feature SQL and
  k-means++/Lloyd in NumPy and writes the same format.

Artifact format (``format = "iotbridge-edge-model"``, ``format_version = 1``), a JSON object::

    {"format": "iotbridge-edge-model", "format_version": 1, "kind": "kmeans", "version": "v3",
     "trained_at": "2026-11-27T14:00:00Z", "source": "bigquery-ml:proj.iot.edge_anomaly", "training_rows": 5000,
     "contamination": 0.01, "threshold": 3.1,
     "features": [{"name": "temperature", "mean": 21.0, "stddev": 1.5}, ...],
     "centroids": [{"id": 1, "values": [21.3, ...]}, ...]}

``values`` are in the metric's own units, in ``features`` order (as ``ML.CENTROIDS`` returns them). Integers may
arrive as JSON strings (BigQuery's JSON export writes INT64 that way). A missing metric is imputed with its
training mean (BigQuery ML's rule for NULL); a feature whose training stddev is 0 carries no information and
contributes 0.

The digest is the SHA-256 of the artifact's bytes exactly as stored; a device checks it before parsing anything.
No cloud client and no Pulumi here: this module runs on devices.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = "iotbridge-edge-model"
FORMAT_VERSION = 1
KIND = "kmeans"
# Far above any real artifact (k=16, n=64 is ~25 KB), low enough that a hostile URL cannot exhaust a device.
MAX_ARTIFACT_BYTES = 1 << 20
FEATURE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")  # also a valid BigQuery column name
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """An artifact or model pointer is malformed, too large, or does not match its digest."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, expected_sha256: str) -> None:
    """Raise :class:`ArtifactError` unless ``data`` hashes to ``expected_sha256`` (lower-case hex)."""
    if not SHA256_RE.fullmatch(expected_sha256 or ""):
        raise ArtifactError(f"expected digest {expected_sha256!r} is not 64 lower-case hex characters")
    actual = sha256_hex(data)
    if not hmac.compare_digest(actual, expected_sha256):
        raise ArtifactError(f"digest mismatch: artifact has sha256 {actual}, the config expects {expected_sha256}")


@dataclass(frozen=True)
class Feature:
    name: str
    mean: float
    stddev: float


@dataclass(frozen=True)
class Inference:
    score: float  # distance to the nearest centroid, in standardized units
    anomaly: bool
    cluster: int  # the nearest centroid's id
    features_present: int  # how many of the model's features the reading carried


@dataclass(frozen=True)
class EdgeModel:
    version: str
    features: tuple[Feature, ...]
    centroids: tuple[tuple[int, tuple[float, ...]], ...]  # (id, values in features order, metric units)
    threshold: float
    contamination: float
    trained_at: str = ""
    source: str = ""
    training_rows: int = 0
    # Derived from the fields above in __post_init__, for inference.
    _inv_std: tuple[float, ...] = field(init=False, repr=False, compare=False, default=())
    _means: tuple[float, ...] = field(init=False, repr=False, compare=False, default=())
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _cz: tuple[tuple[int, tuple[float, ...]], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        _validate(self)
        # Centroids pre-divided by stddev: inference is then (x - c) / s per feature with no repeated division.
        inv = tuple(0.0 if f.stddev == 0 else 1.0 / f.stddev for f in self.features)
        object.__setattr__(self, "_inv_std", inv)
        object.__setattr__(self, "_means", tuple(f.mean for f in self.features))
        object.__setattr__(self, "_names", tuple(f.name for f in self.features))
        object.__setattr__(self, "_cz", tuple((cid, tuple(v * s for v, s in zip(vals, inv, strict=True)))
                                              for cid, vals in self.centroids))

    # ------------------------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND, "version": self.version,
            "trained_at": self.trained_at, "source": self.source, "training_rows": self.training_rows,
            "contamination": self.contamination, "threshold": self.threshold,
            "features": [{"name": f.name, "mean": f.mean, "stddev": f.stddev} for f in self.features],
            "centroids": [{"id": cid, "values": list(vals)} for cid, vals in self.centroids],
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, no NaN — the same model always has the same digest."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, obj: Any) -> EdgeModel:
        if not isinstance(obj, Mapping):
            raise ArtifactError("artifact is not a JSON object")
        if obj.get("format") != FORMAT:
            raise ArtifactError(f"artifact format is {obj.get('format')!r}, expected {FORMAT!r}")
        if _int(obj.get("format_version"), "format_version") != FORMAT_VERSION:
            raise ArtifactError(f"unsupported format_version {obj.get('format_version')!r} "
                                f"(this device reads {FORMAT_VERSION})")
        if obj.get("kind") != KIND:
            raise ArtifactError(f"unsupported model kind {obj.get('kind')!r} (this device runs {KIND!r})")
        feats = obj.get("features")
        cents = obj.get("centroids")
        if not isinstance(feats, list) or not isinstance(cents, list):
            raise ArtifactError("artifact needs 'features' and 'centroids' lists")
        try:
            features = tuple(Feature(str(f["name"]), _float(f["mean"], "mean"), _float(f["stddev"], "stddev"))
                             for f in feats)
            centroids = tuple((_int(c["id"], "centroid id"), tuple(_float(v, "centroid value") for v in c["values"]))
                              for c in cents)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"malformed feature or centroid entry: {exc!r}") from exc
        return cls(version=str(obj.get("version", "")), features=features, centroids=centroids,
                   threshold=_float(obj.get("threshold"), "threshold"),
                   contamination=_float(obj.get("contamination"), "contamination"),
                   trained_at=str(obj.get("trained_at") or ""), source=str(obj.get("source") or ""),
                   training_rows=_int(obj.get("training_rows", 0), "training_rows"))

    @classmethod
    def from_bytes(cls, data: bytes) -> EdgeModel:
        if len(data) > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"artifact is {len(data)} bytes, over the {MAX_ARTIFACT_BYTES}-byte limit")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"artifact is not JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def load_verified(cls, data: bytes, sha256: str, version: str | None = None) -> EdgeModel:
        """Check the digest first, then parse; ``version`` (if given) must be the artifact's own version."""
        if len(data) > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"artifact is {len(data)} bytes, over the {MAX_ARTIFACT_BYTES}-byte limit")
        verify_digest(data, sha256)
        model = cls.from_bytes(data)
        if version is not None and model.version != version:
            raise ArtifactError(f"artifact says version {model.version!r}, the config says {version!r}")
        return model

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    # ----------------------------------------------------------------------------------------- inference
    def infer(self, metrics: Mapping[str, Any]) -> Inference | None:
        """Score one reading's ``metrics``; None when it carries none of the model's features."""
        inv = self._inv_std
        means = self._means
        xz = []
        present = 0
        for name, mean, s in zip(self._names, means, inv, strict=True):
            v = metrics.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                present += 1
                xz.append(v * s)
            else:
                xz.append(mean * s)  # BigQuery ML imputes NULL with the training mean
        if present == 0:
            return None
        best_id, best = 0, math.inf
        for cid, cz in self._cz:
            d = 0.0
            for a, b in zip(xz, cz, strict=True):
                d += (a - b) * (a - b)
            if d < best:
                best_id, best = cid, d
        score = math.sqrt(best)
        return Inference(score=score, anomaly=score > self.threshold, cluster=best_id, features_present=present)


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or v is None:
        raise ArtifactError(f"{what} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ArtifactError(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ArtifactError(f"{what} must be finite, got {v!r}")
    return f


def _int(v: Any, what: str) -> int:
    # BigQuery's JSON export writes INT64 as a string.
    if isinstance(v, bool):
        raise ArtifactError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]{1,18}", v):
        return int(v)
    raise ArtifactError(f"{what} must be an integer, got {v!r}")


def _validate(m: EdgeModel) -> None:
    if not VERSION_RE.fullmatch(m.version):
        raise ArtifactError(f"model version {m.version!r} must match {VERSION_RE.pattern}")
    if not m.features:
        raise ArtifactError("model has no features")
    names = [f.name for f in m.features]
    for f in m.features:
        if not FEATURE_NAME_RE.fullmatch(f.name):
            raise ArtifactError(f"feature name {f.name!r} must match {FEATURE_NAME_RE.pattern}")
        for what, v in (("mean", f.mean), ("stddev", f.stddev)):
            if not math.isfinite(v):
                raise ArtifactError(f"feature {f.name!r}: {what} must be finite")
        if f.stddev < 0:
            raise ArtifactError(f"feature {f.name!r}: stddev must be >= 0")
    if len(set(names)) != len(names):
        raise ArtifactError(f"duplicate feature names in {names}")
    if not m.centroids:
        raise ArtifactError("model has no centroids")
    ids = [cid for cid, _ in m.centroids]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"duplicate centroid ids in {ids}")
    for cid, vals in m.centroids:
        if len(vals) != len(m.features):
            raise ArtifactError(f"centroid {cid} has {len(vals)} values for {len(m.features)} features")
        if not all(math.isfinite(v) for v in vals):
            raise ArtifactError(f"centroid {cid} has a non-finite value")
    if not (math.isfinite(m.threshold) and m.threshold >= 0):
        raise ArtifactError(f"threshold must be a number >= 0, got {m.threshold!r}")
    if not 0 < m.contamination < 0.5:
        raise ArtifactError(f"contamination must be in (0, 0.5), got {m.contamination!r}")
    if m.training_rows < 0:
        raise ArtifactError("training_rows must be >= 0")


# ----------------------------------------------------------------------------------------- model pointer


@dataclass(frozen=True)
class ModelPointer:
    """What a device config carries: ``{"model": {"uri": ..., "version": ..., "sha256": ...}}`` (≤ 64 KB total)."""

    uri: str
    version: str
    sha256: str

    SCHEMES = ("file", "http", "https")

    def __post_init__(self) -> None:
        scheme = self.uri.split(":", 1)[0].lower() if ":" in self.uri else ""
        if scheme not in self.SCHEMES:
            raise ArtifactError(f"model uri {self.uri[:80]!r}: scheme must be one of {', '.join(self.SCHEMES)} "
                                "(gs:// objects are rolled out as signed https URLs)")
        if not VERSION_RE.fullmatch(self.version):
            raise ArtifactError(f"model version {self.version!r} must match {VERSION_RE.pattern}")
        if not SHA256_RE.fullmatch(self.sha256):
            raise ArtifactError(f"model sha256 {self.sha256!r} must be 64 lower-case hex characters")

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelPointer | None:
        """The pointer in a device config, None when the config carries no ``model`` key."""
        raw = config.get("model")
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise ArtifactError("config 'model' must be an object with uri, version and sha256")
        missing = [k for k in ("uri", "version", "sha256") if not isinstance(raw.get(k), str)]
        if missing:
            raise ArtifactError(f"config 'model' lacks string field(s): {', '.join(missing)}")
        return cls(uri=raw["uri"], version=raw["version"], sha256=raw["sha256"])

"""Edge model: artifact size and per-reading cost on a device (pure Python, one core).

Models are fitted by the local trainer's k-means (``iotbridge.ml.train_local.fit_kmeans``) on synthetic readings
with the shape of the simulated fleet's telemetry; the threshold is the training quantile computed in NumPy (the
SQL step only changes its last digits, not the size or the cost). Timed per call with ``perf_counter_ns``:

- ``infer``: :meth:`EdgeModel.infer` on one reading's metrics (standardize, nearest of k centroids).
- ``observe``: :meth:`ModelRunner.observe`: infer + the JSON log record handed to the publisher (MQTT excluded).
- ``verify+load``: SHA-256 check and parse of the artifact, once per rollout.

Run: ``.venv/bin/python -m bench.edge_model`` (or ``python -m bench edge_model``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.core import Figure, percentile
from iotbridge.edge_model import EdgeModel, Feature, sha256_hex
from iotbridge.ml.runner import ModelRunner
from iotbridge.ml.train_local import fit_kmeans, standardize

COMMAND = ".venv/bin/python -m bench.edge_model"
CASES = {"k4_n2": (4, 2), "k8_n16": (8, 16)}  # the default model; a large one


def make_model(k: int, n: int, rows: int = 5000, seed: int = 7) -> tuple[EdgeModel, np.ndarray]:
    rng = np.random.default_rng(seed)
    modes = rng.normal(0, 10, size=(k, n)) + np.linspace(20, 1200, n)
    x = modes[rng.integers(k, size=rows)] + rng.normal(0, 1.0, size=(rows, n))
    fitted = fit_kmeans(x, k, seed=seed)
    z = standardize(x, fitted.means, fitted.stddevs)
    cz = (fitted.centroids - fitted.means) / np.where(fitted.stddevs > 0, fitted.stddevs, 1.0)
    d = np.sqrt(((z[:, None, :] - cz[None, :, :]) ** 2).sum(-1)).min(axis=1)
    names = ("temperature", "rpm") if n == 2 else tuple(f"m{i}" for i in range(n))
    model = EdgeModel(
        version="v1",
        features=tuple(Feature(nm, float(fitted.means[i]), float(fitted.stddevs[i])) for i, nm in enumerate(names)),
        centroids=tuple((j + 1, tuple(float(v) for v in fitted.centroids[j])) for j in range(len(fitted.centroids))),
        threshold=float(np.quantile(d, 0.99)), contamination=0.01, trained_at="2026-11-27T00:00:00Z",
        source="bench", training_rows=rows)
    return model, x


def time_calls(fn, args: list, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        for a in args:
            t0 = time.perf_counter_ns()
            fn(a)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def run() -> list[Figure]:
    figures: list[Figure] = []
    for case, (k, n) in CASES.items():
        model, x = make_model(k, n)
        data = model.to_bytes()
        digest = sha256_hex(data)
        readings = [{"ts": i, "seq": i, "metrics": dict(zip(model.feature_names, map(float, row), strict=True))}
                    for i, row in enumerate(x[:5000])]
        metrics = [r["metrics"] for r in readings]
        for m in metrics[:500]:  # warm-up
            model.infer(m)
        infer_us = time_calls(model.infer, metrics, repeat=2)
        sink: list[bytes] = []
        runner = ModelRunner("bench-1", sink.append)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.json"
            path.write_bytes(data)
            loaded = runner.apply_config(json.dumps({"model": {"uri": path.as_uri(), "version": "v1",
                                                               "sha256": digest}}).encode())
        assert loaded is not None and loaded["kind"] == "model_loaded", loaded
        observe_us = time_calls(runner.observe, readings)
        load_us = time_calls(lambda d, digest=digest: EdgeModel.load_verified(d, digest, "v1"), [data] * 200)
        anomalies = sum(1 for m in metrics if (inference := model.infer(m)) is not None and inference.anomaly)
        note = f"k={k} clusters, n={n} metrics"
        figures += [
            Figure("edge_model", f"artifact size ({case})", len(data), "bytes", COMMAND,
                   f"{note}; canonical JSON", {"sha256": digest}),
            Figure("edge_model", f"infer p50 ({case})", round(percentile(infer_us, 0.5), 2), "µs/reading", COMMAND,
                   note, {"p99_us": round(percentile(infer_us, 0.99), 2), "calls": len(infer_us),
                          "anomaly_share_on_training_data": round(anomalies / len(metrics), 4)}),
            Figure("edge_model", f"infer p99 ({case})", round(percentile(infer_us, 0.99), 2), "µs/reading", COMMAND,
                   note),
            Figure("edge_model", f"observe p50 ({case})", round(percentile(observe_us, 0.5), 2), "µs/reading",
                   COMMAND, f"{note}; infer + JSON log record, MQTT publish excluded",
                   {"p99_us": round(percentile(observe_us, 0.99), 2)}),
            Figure("edge_model", f"verify+load p50 ({case})", round(percentile(load_us, 0.5), 2), "µs/rollout",
                   COMMAND, f"{note}; SHA-256 + parse + validate"),
        ]
    return figures


def main() -> int:
    for f in run():
        print(f"{f.name:34} {f.value:>10} {f.unit:12} {f.note}")
        if f.extra:
            print(f"{'':34} {json.dumps(f.extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

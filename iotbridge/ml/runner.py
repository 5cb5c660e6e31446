"""The device side of the edge model: follow the model pointer in the device config, run the model on every
reading, report to ``/devices/{id}/events/logs`` (→ the device-logs topic → ``device_logs``).

A config carrying ``{"model": {"uri": ..., "version": ..., "sha256": ...}}`` (:class:`ModelPointer`) makes the
runner download the artifact (``file://``, or ``http(s)://`` — in the cloud a V4 signed URL of the private models
bucket), check its size and SHA-256 *before* parsing it, check that it names the version the config names, load
it, and swap it in. Anything wrong — unreachable, too large, digest mismatch, malformed, wrong version — and the
model is refused: the runner keeps the model it had (or none) and publishes a ``model_rejected`` log record with
the reason. Log records (JSON, one per message)::

    {"kind": "model_loaded",   "device_id": ..., "model_version": "v2", "model_sha256": ..., "previous_version": "v1",
     "ts": ...}
    {"kind": "model_rejected", "device_id": ..., "model_version": "v1", "model_sha256": ..., "requested_version": "v2",
     "requested_sha256": ..., "reason": "digest mismatch: ...", "ts": ...}
    {"kind": "inference",      "device_id": ..., "model_version": "v1", "seq": 42, "ts": ..., "score": 0.83,
     "anomaly": false, "cluster": 2}

``model_version`` is always the model the device is running (null before the first). A signed URL is a bearer
credential for its lifetime: reasons and logs name the URI without its query string.

Use with the device SDK::

    runner = ModelRunner.for_device(dev)
    ... runner.apply_config(dev.configs.get())     # on each config (not on the MQTT network thread: it downloads)
    ... runner.observe(reading)                     # on each reading the device sends
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

from iotbridge.edge_model import MAX_ARTIFACT_BYTES, ArtifactError, EdgeModel, ModelPointer

log = logging.getLogger(__name__)

LOGS_SUBFOLDER = "logs"
Fetch = Callable[[str], bytes]
Publish = Callable[[bytes], Any]


class FetchError(OSError):
    """The artifact could not be downloaded."""


def redact(uri: str) -> str:
    """``uri`` without query or fragment: a signed URL's signature must not reach a log."""
    p = urlsplit(uri)
    return urlunsplit((p.scheme, p.netloc, p.path, "", ""))


def fetch(uri: str, max_bytes: int = MAX_ARTIFACT_BYTES, timeout: float = 15.0) -> bytes:
    """The bytes at ``uri`` (``file``, ``http``, ``https``), at most ``max_bytes``."""
    parts = urlsplit(uri)
    try:
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise FetchError(f"file URI with a remote host: {redact(uri)}")
            with Path(url2pathname(parts.path)).open("rb") as f:
                data = f.read(max_bytes + 1)
        elif parts.scheme in ("http", "https"):
            req = urllib.request.Request(uri, headers={"User-Agent": "iotbridge-device"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
                data = resp.read(max_bytes + 1)
        else:
            raise FetchError(f"unsupported scheme {parts.scheme!r}")
    except urllib.error.HTTPError as exc:
        raise FetchError(f"download of {redact(uri)} failed: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"download of {redact(uri)} failed: {exc.reason}") from None
    except OSError as exc:
        if isinstance(exc, FetchError):
            raise
        raise FetchError(f"download of {redact(uri)} failed: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise FetchError(f"{redact(uri)} is larger than {max_bytes} bytes")
    return data


class ModelRunner:
    def __init__(self, device_id: str, publish: Publish, fetch: Fetch = fetch,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self._publish = publish
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._active: tuple[EdgeModel, ModelPointer] | None = None  # swapped as one reference
        self.rejected = 0
        self.inferences = 0

    @classmethod
    def for_device(cls, device: Any, **kwargs: Any) -> ModelRunner:
        """A runner publishing through a :class:`iotbridge.device.Device` to its ``events/logs`` topic."""
        return cls(device.identity.device_id,
                   lambda data: device.publish_event(data, sub_folder=LOGS_SUBFOLDER), **kwargs)

    @property
    def model(self) -> EdgeModel | None:
        active = self._active
        return active[0] if active else None

    @property
    def version(self) -> str | None:
        active = self._active
        return active[0].version if active else None

    # -------------------------------------------------------------------------------------------- config
    def apply_config(self, config: bytes) -> dict[str, Any] | None:
        """Act on one device config. Returns the log record published, or None when the config asks for no
        change (no ``model`` key, not a JSON object, or the model already running)."""
        try:
            obj = json.loads(config)
        except (UnicodeDecodeError, ValueError):
            return None  # a config is the operator's bytes; only a JSON object can carry a model
        if not isinstance(obj, dict):
            return None
        try:
            pointer = ModelPointer.from_config(obj)
        except ArtifactError as exc:
            raw = obj.get("model")
            raw = raw if isinstance(raw, dict) else {}
            return self._reject(str(raw["version"]) if raw.get("version") else None,
                                str(raw["sha256"]) if raw.get("sha256") else None, f"bad model pointer: {exc}")
        if pointer is None:
            return None
        current = self._active[1] if self._active else None
        if current is not None and current.version == pointer.version:
            if current.sha256 == pointer.sha256:
                return None
            return self._reject(pointer.version, pointer.sha256,
                                f"version {pointer.version} is already running with sha256 {current.sha256}; "
                                "a version names one artifact: roll out a new version")
        try:
            data = self._fetch(pointer.uri)
            model = EdgeModel.load_verified(data, pointer.sha256, pointer.version)
        except (ArtifactError, OSError) as exc:
            return self._reject(pointer.version, pointer.sha256, str(exc))
        with self._lock:
            previous = self.version
            self._active = (model, pointer)
        log.info("%s: model %s loaded from %s", self.device_id, model.version, redact(pointer.uri))
        return self._emit({"kind": "model_loaded", "previous_version": previous})

    def _reject(self, version: str | None, sha256: str | None, reason: str) -> dict[str, Any]:
        self.rejected += 1
        log.warning("%s: model %s refused, keeping %s: %s", self.device_id, version, self.version, reason)
        return self._emit({"kind": "model_rejected", "requested_version": version, "requested_sha256": sha256,
                           "reason": reason[:500]})

    # ------------------------------------------------------------------------------------------ readings
    def observe(self, reading: Mapping[str, Any]) -> dict[str, Any] | None:
        """Run the model on one telemetry reading (docs/messages.md); publish and return the inference record.
        None without a model, or when the reading carries none of the model's metrics."""
        active = self._active
        metrics = reading.get("metrics")
        if active is None or not isinstance(metrics, Mapping):
            return None
        model = active[0]
        result = model.infer(metrics)
        if result is None:
            return None
        self.inferences += 1
        return self._emit({"kind": "inference", "seq": reading.get("seq"), "reading_ts": reading.get("ts"),
                           "score": round(result.score, 6), "anomaly": result.anomaly, "cluster": result.cluster},
                          active=active)

    # ------------------------------------------------------------------------------------------ publish
    def _emit(self, fields: dict[str, Any], active: tuple[EdgeModel, ModelPointer] | None = None) -> dict[str, Any]:
        active = active or self._active
        record = {"device_id": self.device_id, "model_version": active[0].version if active else None,
                  "model_sha256": active[1].sha256 if active else None,
                  "ts": int(self._clock() * 1000), **fields}
        self._publish(json.dumps(record, separators=(",", ":")).encode())
        return record

"""Decode, validate and shape one telemetry message (docs/messages.md) — plain Python, no Beam.

Identity comes from the Pub/Sub attributes the bridge sets from the authenticated session,
never from the payload: a device cannot write rows in another device's name by putting a ``deviceId`` in its
JSON. Every way a message can be wrong has a reason class (:data:`REASONS`); :func:`parse` raises
:class:`Rejected` with one of them and the pipeline routes the message to ``telemetry_errors``.

The functions here are what the pipeline's DoFns call, what the unit tests call directly and what
``bench/pipeline_cost.py`` times.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

# Reason classes written to telemetry_errors.error; one Beam counter each.
REASONS: dict[str, str] = {
    "missing_device_id": "no deviceId attribute (the bridge always sets it)",
    "bad_device_id": "deviceId attribute does not follow the device id rule",
    "invalid_json": "payload is not UTF-8 JSON",
    "not_an_object": "payload is JSON but not an object",
    "missing_ts": "payload has no ts",
    "bad_ts": "ts is neither an RFC 3339 string with an offset nor integer epoch milliseconds in range",
    "missing_metrics": "payload has no metrics",
    "bad_metrics": "metrics is not a non-empty flat object",
    "bad_metric_value": "a metric is not a finite number",
    "bad_seq": "seq is not a non-negative integer",
}

# The device id rule (docs/device-protocol.md), the registry's: the pipeline's image does not carry the registry.
DEVICE_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}")
# Row keys carry event time as 13 zero-padded digits of epoch milliseconds, so they sort by time
# lexicographically; that bounds ts to [1970, 2286).
MAX_EVENT_MS = 10**13 - 1
MAX_METRIC_NAME = 128
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Rejected(ValueError):
    """The message is not acceptable telemetry; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reading:
    """An accepted telemetry message."""

    device_id: str
    event_time_us: int  # epoch microseconds, from the payload's ts
    publish_time_us: int  # epoch microseconds, when Pub/Sub accepted the message
    message_id: str
    metrics: dict[str, float]
    seq: int | None = None
    device_num_id: str | None = None
    registry_id: str | None = None
    sub_folder: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Stands in for seq in the dedupe key and row key when the device sends none: same payload, same digest.
    payload_digest: str = ""

    @property
    def event_time_ms(self) -> int:
        return self.event_time_us // 1000

    @property
    def dedupe_key(self) -> str:
        """Device id + ts + seq; the payload digest when there is no seq."""
        return f"{self.device_id}#{self.event_time_ms:013d}#{self._discriminator}"

    @property
    def row_key(self) -> str:
        """Bigtable row key: ``{device_id}#{event_time_ms:013d}#{seq or payload digest}`` (spec.BIGTABLE)."""
        return self.dedupe_key

    @property
    def _discriminator(self) -> str:
        return f"{self.seq:010d}" if self.seq is not None else f"h{self.payload_digest}"


def _ts_from_rfc3339(text: str) -> int:
    try:
        # RFC 3339 allows a lower-case 'z' and a space for 'T'; fromisoformat (3.11) takes the rest.
        dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as exc:
        raise Rejected("bad_ts", f"ts {text[:64]!r} is not RFC 3339 ({exc})") from None
    if dt.tzinfo is None:
        raise Rejected("bad_ts", f"ts {text[:64]!r} has no UTC offset (RFC 3339 requires one)")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_ts(value: Any) -> int:
    """The payload's ts as epoch microseconds."""
    if isinstance(value, str):
        us = _ts_from_rfc3339(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        us = value * 1000
    else:
        raise Rejected("bad_ts", f"ts must be an RFC 3339 string or integer epoch ms, not {type(value).__name__}")
    if not 0 <= us // 1000 <= MAX_EVENT_MS:
        raise Rejected("bad_ts", f"ts {value!r} is outside 1970-01-01 .. 2286-11-20")
    return us


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise Rejected("bad_metrics", "metrics must be a non-empty object of name -> number")
    out: dict[str, float] = {}
    for name, v in value.items():
        if not name or len(name) > MAX_METRIC_NAME:
            raise Rejected("bad_metrics", f"metric name {name[:64]!r} must have 1..{MAX_METRIC_NAME} characters")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Rejected("bad_metric_value", f"metric {name!r} is {type(v).__name__}, not a number")
        f = float(v)
        if not math.isfinite(f):
            raise Rejected("bad_metric_value", f"metric {name!r} is not finite")
        out[name] = f
    return out


def _reject_constant(token: str) -> Any:
    # json.loads takes NaN/Infinity by default; they are not JSON (RFC 8259) and BigQuery refuses them.
    raise ValueError(f"{token} is not valid JSON")


# One decoder for every message (json.loads with a keyword argument builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse(data: bytes, attributes: Mapping[str, str], message_id: str, publish_time_us: int) -> Reading:
    """Validate one message; raise :class:`Rejected` with the reason class when it is not telemetry."""
    device_id = attributes.get("deviceId")
    if not device_id:
        raise Rejected("missing_device_id", "the message has no deviceId attribute")
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise Rejected("bad_device_id", f"deviceId {device_id[:64]!r} does not match {DEVICE_ID_RE.pattern}")
    try:
        doc = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise Rejected("invalid_json", str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}")
    if "ts" not in doc:
        raise Rejected("missing_ts", "payload has no ts")
    event_time_us = parse_ts(doc["ts"])
    if "metrics" not in doc:
        raise Rejected("missing_metrics", "payload has no metrics")
    metrics = _metrics(doc["metrics"])
    seq = doc.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 10**10):
        raise Rejected("bad_seq", f"seq {str(seq)[:32]!r} is not an integer in 0..9999999999")
    extra = {k: v for k, v in doc.items() if k not in ("ts", "metrics", "seq")}
    return Reading(
        device_id=device_id,
        event_time_us=event_time_us,
        publish_time_us=publish_time_us,
        message_id=message_id,
        metrics=metrics,
        seq=seq,
        device_num_id=attributes.get("deviceNumId"),
        registry_id=attributes.get("deviceRegistryId"),
        sub_folder=attributes.get("subFolder"),
        extra=extra,
        payload_digest="" if seq is not None else hashlib.sha256(data).hexdigest()[:16],
    )


# ------------------------------------------------------------------------------------------------ rows


@functools.lru_cache(maxsize=8192)
def _utc_second(secs: int) -> str:
    # Readings of a bundle share their seconds: formatting each second once saves most of the cost.
    return datetime.fromtimestamp(secs, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(us: int) -> str:
    """Epoch microseconds as the RFC 3339 text BigQuery's JSON API takes for TIMESTAMP."""
    secs, frac = divmod(us, 1_000_000)
    return f"{_utc_second(secs)}.{frac:06d}Z"


def raw_row(r: Reading) -> dict[str, Any]:
    """The ``telemetry_raw`` row (spec.TABLES)."""
    return {
        "device_id": r.device_id,
        "device_num_id": r.device_num_id,
        "registry_id": r.registry_id,
        "sub_folder": r.sub_folder,
        "event_time": rfc3339(r.event_time_us),
        "publish_time": rfc3339(r.publish_time_us),
        "message_id": r.message_id,
        "seq": r.seq,
        "metrics": [{"name": k, "value": v} for k, v in r.metrics.items()],
        "extra": json.dumps(r.extra, separators=(",", ":"), sort_keys=True) if r.extra else None,
    }


Cell = tuple[str, bytes, bytes, int]  # family, qualifier, value, timestamp (epoch µs, millisecond granularity)


def bigtable_cells(r: Reading) -> tuple[bytes, list[Cell]]:
    """Row key and cells of the Bigtable ``telemetry`` row.

    Every cell carries the event time (truncated to the millisecond granularity Bigtable keeps) as its
    timestamp: writing the same message again overwrites the same version instead of adding one.
    """
    ts = r.event_time_ms * 1000
    cells: list[Cell] = [("m", name.encode(), struct.pack(">d", v), ts) for name, v in r.metrics.items()]
    attrs = {"device_num_id": r.device_num_id, "registry_id": r.registry_id, "sub_folder": r.sub_folder,
             "seq": None if r.seq is None else str(r.seq)}
    cells += [("a", k.encode(), v.encode(), ts) for k, v in attrs.items() if v is not None]
    return r.row_key.encode(), cells


def error_row(reason: str, detail: str, data: bytes | None, attributes: Mapping[str, str] | None,
              message_id: str | None, publish_time_us: int | None) -> dict[str, Any]:
    """The ``telemetry_errors`` row: the reason and the raw payload, untouched (BYTES travel as base64)."""
    return {
        "error": reason,
        "detail": detail,
        "payload": base64.b64encode(data).decode("ascii") if data is not None else None,
        "attributes": json.dumps(dict(attributes or {}), sort_keys=True),
        "publish_time": rfc3339(publish_time_us) if publish_time_us is not None else None,
        "message_id": message_id,
        "device_id": (attributes or {}).get("deviceId"),
    }

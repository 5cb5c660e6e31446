"""Decode, validate and shape one telemetry message (docs/messages.md) — plain Python, no Beam.

A message is read by the payload profiles of its registry or subfolder (``iotbridge.spec.PayloadProfiles``), in
order: ``telemetry-v1`` (:func:`parse`), ``json`` (any object, :func:`flatten`) and ``raw`` (the bytes, optionally
through a user's decoder). :func:`read` is the entry point.

Identity comes from the Pub/Sub attributes the bridge sets from the authenticated session,
never from the payload: a device cannot write rows in another device's name by putting a ``deviceId`` in its
JSON. Every way a message can be wrong has a reason class (:data:`REASONS`); :func:`parse` raises
:class:`Rejected` with one of them and the pipeline routes the message to ``telemetry_errors``.

The functions here are what the pipeline's DoFns call, what the unit tests call directly and what
``bench/pipeline_cost.py`` times.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib
import json
import math
import re
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import orjson

from iotbridge.spec import DEFAULT_PROFILES, Profile

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
# What the other profiles add. telemetry_errors.error holds the first profile's reason, detail every profile's.
PROFILE_REASONS: dict[str, str] = {
    "missing_event_time": "the payload lacks the profile's time_field",
    "bad_event_time": "the time_field is neither RFC 3339 with an offset nor epoch s/ms/us in range",
    "decoder_failed": "the raw profile's decoder raised, returned no JSON object or a string that is not Unicode text",
}
# The pipeline's own: a message that made a transform raise something other than Rejected (a bug, or input no check
# foresaw). It goes to telemetry_errors like a rejected one instead of failing its bundle, which streaming Dataflow
# retries for ever. Its detail names the exception's type and where it was raised, never its message (which may
# quote the payload).
PIPELINE_REASONS: dict[str, str] = {
    "internal_error": "a pipeline step raised an unexpected exception on the message (its type in detail)",
}
INTERNAL_ERROR = "internal_error"
ALL_REASONS: dict[str, str] = {**REASONS, **PROFILE_REASONS, **PIPELINE_REASONS}

# The device id rule (docs/device-protocol.md), the registry's: the pipeline's image does not carry the registry.
DEVICE_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}")
# Row keys carry event time as 13 zero-padded digits of epoch milliseconds, so they sort by time
# lexicographically; that bounds ts to [1970, 2286).
MAX_EVENT_MS = 10**13 - 1
MAX_METRIC_NAME = 128
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_DOUBLE = sys.float_info.max


class Rejected(ValueError):
    """The message is not acceptable telemetry; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str, claimed: bool = False):
        assert reason in ALL_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # The payload is this profile's shape but broken: later profiles must not read it in another way.
        self.claimed = claimed


@dataclass(slots=True)
class Reading:
    """An accepted telemetry message. Not frozen: a frozen dataclass's ``__init__`` sets each of its fields through
    ``object.__setattr__``, a measurable share of the accepted path's CPU (bench/pipeline_cost.py); nothing changes a
    Reading once read."""

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
    profile: str = "telemetry-v1"
    # "payload": the device's time; "publish_time": Pub/Sub's, for payloads that carry none.
    event_time_source: str = "payload"
    labels: dict[str, str] = field(default_factory=dict)
    payload: bytes = b""
    _key: str = field(default="", repr=False, compare=False)

    @property
    def event_time_ms(self) -> int:
        return self.event_time_us // 1000

    @property
    def dedupe_key(self) -> str:
        """Device id + event time + seq; the payload digest when there is no seq, the message id when the event
        time is the publish time."""
        if not self._key:
            # zfill: an f-string's format spec (``:013d``) costs twice as much (bench/pipeline_cost.py).
            self._key = f"{self.device_id}#{str(self.event_time_us // 1000).zfill(13)}#{self._discriminator}"
        return self._key

    @property
    def row_key(self) -> str:
        """Bigtable row key: ``{device_id}#{event_time_ms:013d}#{seq or payload digest}`` (spec.BIGTABLE)."""
        return self.dedupe_key

    @property
    def _discriminator(self) -> str:
        if self.seq is not None:
            return str(self.seq).zfill(10)
        if self.event_time_source == "publish_time":
            # Without a device time every resend has a new publish time; what identifies a Pub/Sub redelivery is its
            # message id. A device resending the same bytes is, without time or seq, a new reading.
            return f"m{self.message_id}"
        return f"h{self.payload_digest}"


def _ts_from_rfc3339(text: str, reason: str = "bad_ts", name: str = "ts") -> int:
    try:
        # RFC 3339 allows a lower-case 'z' and a space for 'T'; fromisoformat (3.11) takes the rest.
        dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as exc:
        raise Rejected(reason, f"{name} {text[:64]!r} is not RFC 3339 ({exc})") from None
    if dt.tzinfo is None:
        raise Rejected(reason, f"{name} {text[:64]!r} has no UTC offset (RFC 3339 requires one)")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_ts(value: Any) -> int:
    """The payload's ts as epoch microseconds."""
    t = type(value)
    if t is int:
        us = value * 1000
    elif t is str:
        us = _ts_from_rfc3339(value)
    else:
        raise Rejected("bad_ts", f"ts must be an RFC 3339 string or integer epoch ms, not {type(value).__name__}")
    if not 0 <= us // 1000 <= MAX_EVENT_MS:
        raise Rejected("bad_ts", f"ts {value!r} is outside 1970-01-01 .. 2286-11-20")
    return us


def _metrics(value: Any) -> dict[str, float]:
    if type(value) is not dict or not value:
        raise Rejected("bad_metrics", "metrics must be a non-empty object of name -> number")
    out: dict[str, float] = {}
    isfinite = math.isfinite
    for name, v in value.items():
        if not 0 < len(name) <= MAX_METRIC_NAME:
            raise Rejected("bad_metrics", f"metric name {name[:64]!r} must have 1..{MAX_METRIC_NAME} characters")
        t = type(v)  # exact types: JSON gives int, float, bool, str, list, dict or None, and bool is not a number
        if t is float:
            if not isfinite(v):
                raise Rejected("bad_metric_value", f"metric {name!r} is not finite")
            out[name] = v
        elif t is int:
            try:
                out[name] = float(v)
            except OverflowError:
                raise Rejected("bad_metric_value", f"metric {name!r} is beyond a double's range") from None
        else:
            raise Rejected("bad_metric_value", f"metric {name!r} is {t.__name__}, not a number")
    return out


def _reject_constant(token: str) -> Any:
    # json.loads takes NaN/Infinity by default; they are not JSON (RFC 8259) and BigQuery refuses them.
    raise ValueError(f"{token} is not valid JSON")


# One decoder for every message (json.loads with a keyword argument builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@functools.lru_cache(maxsize=65536)
def _valid_device_id(device_id: str) -> bool:
    # A fleet's ids repeat message after message: each is matched once.
    return DEVICE_ID_RE.fullmatch(device_id) is not None


def device_identity(attributes: Mapping[str, str]) -> str:
    """The deviceId attribute the bridge set from the authenticated session, checked."""
    device_id = attributes.get("deviceId")
    if not device_id:
        raise Rejected("missing_device_id", "the message has no deviceId attribute")
    if not _valid_device_id(device_id):
        raise Rejected("bad_device_id", f"deviceId {device_id[:64]!r} does not match {DEVICE_ID_RE.pattern}")
    return device_id


def decode_json(data: bytes) -> Any:
    """UTF-8 JSON (RFC 8259: no NaN or Infinity) → Python. orjson reads what it can, several times faster than the
    standard library; what it refuses (invalid JSON, but also a number beyond a double) the standard library decides,
    and its message names the error. orjson reads an integer beyond 64 bits as a double, the standard library as an
    int: either way not a valid ts or seq, and the same metric value."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        doc = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise Rejected("invalid_json", str(exc)[:200]) from None
    if _SURROGATE_ESCAPE.search(data) and not _unicode_text(doc):
        # orjson and msgspec refuse "\ud800" unpaired; the standard library makes a str of it that is not Unicode
        # text: UTF-8 cannot encode it (a Bigtable qualifier), BigQuery refuses it, and the message would fail its
        # bundle for ever downstream.
        raise Rejected("invalid_json", "a string escapes an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)")
    return doc


# A \u escape of a UTF-16 surrogate, paired or not; the decoded document then says whether any is unpaired.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unicode_text(doc: Any) -> bool:
    """Whether every string of ``doc`` (keys too) is Unicode text: no unpaired surrogate, so UTF-8 can encode it."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def parse(data: bytes, attributes: Mapping[str, str], message_id: str, publish_time_us: int) -> Reading:
    """Read one message as ``telemetry-v1``; raise :class:`Rejected` with the reason class when it is not."""
    device_id = device_identity(attributes)
    return _read_v1_common(data, device_id, attributes, message_id, publish_time_us) \
        or _read_v1(decode_json(data), data, device_id, attributes, message_id, publish_time_us)


_V1_KEYS = frozenset(("ts", "metrics", "seq"))


def _read_v1(doc: Any, data: bytes, device_id: str, attributes: Mapping[str, str], message_id: str,
             publish_time_us: int) -> Reading:
    if type(doc) is not dict:
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}")
    # ts and metrics are this profile's keys: a payload with either is a telemetry-v1 message, and if it is a broken
    # one, the firmware's bug shows in telemetry_errors instead of another profile reading it in another way.
    try:
        if "ts" not in doc:
            raise Rejected("missing_ts", "payload has no ts")
        event_time_us = parse_ts(doc["ts"])
        if "metrics" not in doc:
            raise Rejected("missing_metrics", "payload has no metrics")
        metrics = _metrics(doc["metrics"])
        seq = doc.get("seq")
        if seq is not None and (type(seq) is not int or not 0 <= seq < 10**10):
            raise Rejected("bad_seq", f"seq {str(seq)[:32]!r} is not an integer in 0..9999999999")
    except Rejected as exc:
        exc.claimed = "ts" in doc or "metrics" in doc
        raise
    extra = {k: v for k, v in doc.items() if k not in _V1_KEYS} if len(doc) > 2 + (seq is not None) else {}
    return Reading(device_id, event_time_us, publish_time_us, message_id, metrics, seq,
                   attributes.get("deviceNumId"), attributes.get("deviceRegistryId"), attributes.get("subFolder"),
                   extra, "" if seq is not None else _digest(data), "telemetry-v1", "payload", {}, data)


# ------------------------------------------------------------------ telemetry-v1's common shape, read in one go

_MetricName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METRIC_NAME)]


class _CommonV1(msgspec.Struct, gc=False):
    """The shape nearly every telemetry-v1 message has: ts, metrics and maybe seq.

    msgspec decodes and checks it in one pass in C (ints read as floats for metrics, bool and NaN refused, numbers
    beyond a double refused); what it refuses :func:`_read_v1` reads as before, so a rejection's reason and detail
    never come from here. This type skips other keys; :class:`_OnlyCommonV1` refuses them.
    """

    ts: int | str
    metrics: Annotated[dict[_MetricName, float], msgspec.Meta(min_length=1)]
    seq: Annotated[int, msgspec.Meta(ge=0, lt=10**10)] | None = None


class _OnlyCommonV1(_CommonV1, forbid_unknown_fields=True):
    """The common shape with no other key: no ``extra`` to read."""


_ONLY_COMMON_V1 = msgspec.json.Decoder(_OnlyCommonV1)
_COMMON_V1 = msgspec.json.Decoder(_CommonV1)


def _read_v1_common(data: bytes, device_id: str, attributes: Mapping[str, str], message_id: str,
                    publish_time_us: int) -> Reading | None:
    """The reading :func:`_read_v1` makes of a payload of the common shape, for about half its CPU; None for any
    other payload (extra keys, a bad value, not JSON), which :func:`_read_v1` then reads or rejects."""
    extra: dict[str, Any] = {}
    try:
        doc: _CommonV1 = _ONLY_COMMON_V1.decode(data)
    except msgspec.ValidationError:
        # Other keys too (a firmware version, say), or a bad value: the extras are what the full path's decoder
        # reads, if the shape without them holds.
        try:
            doc = _COMMON_V1.decode(data)
            extra = {k: v for k, v in decode_json(data).items() if k not in _V1_KEYS}
        except (msgspec.MsgspecError, ValueError, RecursionError):  # Rejected is a ValueError; msgspec raises
            return None  # RecursionError skipping an extra nested deeper than it recurses: the full path decides
    except (msgspec.MsgspecError, ValueError, RecursionError):  # a key that is not UTF-8: UnicodeDecodeError
        return None
    ts = doc.ts
    if isinstance(ts, int):  # msgspec's int: never a bool
        if not 0 <= ts <= MAX_EVENT_MS:
            return None
        event_time_us = ts * 1000
    else:
        try:
            event_time_us = _ts_from_rfc3339(ts)
        except Rejected:
            return None
        if not 0 <= event_time_us // 1000 <= MAX_EVENT_MS:
            return None
    # The dedupe key as Reading.dedupe_key writes it, while seq and the time are at hand.
    seq = doc.seq
    if seq is None:
        digest = _digest(data)
        key = f"{device_id}#{str(event_time_us // 1000).zfill(13)}#h{digest}"
    else:
        digest = ""
        key = f"{device_id}#{str(event_time_us // 1000).zfill(13)}#{str(seq).zfill(10)}"
    return Reading(device_id, event_time_us, publish_time_us, message_id, doc.metrics, seq,
                   attributes.get("deviceNumId"), attributes.get("deviceRegistryId"), attributes.get("subFolder"),
                   extra, digest, "telemetry-v1", "payload", {}, data, key)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _reading(data: bytes, device_id: str, attributes: Mapping[str, str], message_id: str, publish_time_us: int,
             event_time_us: int, metrics: dict[str, float], labels: dict[str, str], profile: str,
             source: str) -> Reading:
    """A reading of the json and raw profiles: the identity the bridge set, what the profile read, the payload kept.
    The digest stands in for seq only with the device's own time (otherwise the message id does)."""
    return Reading(device_id, event_time_us, publish_time_us, message_id, metrics, None,
                   attributes.get("deviceNumId"), attributes.get("deviceRegistryId"), attributes.get("subFolder"),
                   {}, _digest(data) if source == "payload" else "", profile, source, labels, data)


# ------------------------------------------------------------------------------------ json and raw profiles

# Epoch numbers without a unit: by magnitude. Seconds reach 1e11 in the year 5138, milliseconds 1e14 in 5138 too;
# microseconds of any time after 1973 are above 1e14.
_AUTO_UNIT_LIMITS = ((1e11, 1_000_000), (1e14, 1_000))
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


def parse_event_time(value: Any, unit: str, name: str) -> int:
    """A profile's time field as epoch microseconds: RFC 3339 text, or an epoch number in ``unit``."""
    if isinstance(value, str) and unit in ("auto", "rfc3339"):
        us = _ts_from_rfc3339(value, "bad_event_time", name)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and unit != "rfc3339" \
            and math.isfinite(value):
        factor = _UNIT_US.get(unit) or next((f for limit, f in _AUTO_UNIT_LIMITS if abs(value) < limit), 1)
        us = int(value * factor) if isinstance(value, float) else value * factor
    else:
        raise Rejected("bad_event_time", f"{name} is {type(value).__name__} {str(value)[:40]!r}, not "
                       + ("RFC 3339 text" if unit == "rfc3339" else f"an epoch number ({unit})" if unit != "auto"
                          else "RFC 3339 text or an epoch number"))
    if not 0 <= us // 1000 <= MAX_EVENT_MS:
        raise Rejected("bad_event_time", f"{name} {value!r} is outside 1970-01-01 .. 2286-11-20")
    return us


def flatten(doc: dict[str, Any], skip: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Numeric leaves (booleans as 0/1) as metrics, string leaves as labels, each named by its dotted path.

    Array items are named by their index (``fans.0``); nulls and paths longer than a metric name may be are not
    extracted (the row's payload column keeps them); ``skip`` is the time field's path.
    """
    metrics: dict[str, float] = {}
    labels: dict[str, str] = {}
    try:
        _walk(doc, "", skip, metrics, labels)
    except RecursionError:  # deeper than Python's stack: the same walk with a list for a stack
        metrics.clear()
        labels.clear()
        _walk_deep([(str(k), v) for k, v in reversed(doc.items())], skip, metrics, labels)
    return metrics, labels


def _walk(node: dict[str, Any] | list[Any], prefix: str, skip: str | None, metrics: dict[str, float],
          labels: dict[str, str]) -> None:
    """Depth first, in document order; exact JSON types take the short way, anything else a decoder returned (a
    subclass of float, say) :func:`_walk_deep`'s."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        path = f"{prefix}{k}"
        if path == skip:
            continue
        t = type(v)
        if t is dict or t is list:
            _walk(v, path + ".", skip, metrics, labels)
        elif len(path) > MAX_METRIC_NAME:
            continue
        elif t is float:
            if math.isfinite(v):
                metrics[path] = v
        elif t is str:
            labels[path] = v
        elif t is int:
            if -_MAX_DOUBLE <= v <= _MAX_DOUBLE:  # an integer beyond a double: the payload keeps it
                metrics[path] = float(v)
        elif t is bool:
            metrics[path] = 1.0 if v else 0.0
        elif v is not None:
            _walk_deep([(path, v)], skip, metrics, labels)


def _walk_deep(stack: list[tuple[str, Any]], skip: str | None, metrics: dict[str, float],
               labels: dict[str, str]) -> None:
    while stack:
        path, v = stack.pop()
        if path == skip:
            continue
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}", c) for k, c in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}", c) for i, c in reversed(list(enumerate(v))))
        elif len(path) > MAX_METRIC_NAME:
            continue
        elif isinstance(v, bool):
            metrics[path] = 1.0 if v else 0.0
        elif isinstance(v, (int, float)):
            try:
                f = float(v)
            except OverflowError:  # an integer beyond a double: the payload keeps it
                continue
            if math.isfinite(f):
                metrics[path] = f
        elif isinstance(v, str):
            labels[path] = v


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Rejected("missing_event_time", f"payload has no {path}")
    return node


def _read_object(doc: Any, data: bytes, profile: Profile, device_id: str, attributes: Mapping[str, str],
                 message_id: str, publish_time_us: int) -> Reading:
    """A JSON object (or a decoder's dict) as the ``json`` profile reads it."""
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}")
    if profile.time_field:
        event_time_us = parse_event_time(_lookup(doc, profile.time_field), profile.time_unit, profile.time_field)
        source = "payload"
    else:
        event_time_us, source = publish_time_us, "publish_time"
    metrics, labels = flatten(doc, profile.time_field)
    return _reading(data, device_id, attributes, message_id, publish_time_us, event_time_us, metrics, labels,
                    profile.name, source)


@functools.lru_cache(maxsize=64)
def load_decoder(path: str) -> Callable[[bytes], Any]:
    """The raw profile's decoder ``module:function``; ImportError/AttributeError when it is not there."""
    module, _, name = path.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"decoder {path} is not callable")
    return fn


def _read_raw(data: bytes, profile: Profile, device_id: str, attributes: Mapping[str, str], message_id: str,
              publish_time_us: int) -> Reading:
    if profile.decoder is None:
        return _reading(data, device_id, attributes, message_id, publish_time_us, publish_time_us, {}, {}, "raw",
                        "publish_time")
    try:
        doc = load_decoder(profile.decoder)(data)
    except Exception as exc:  # noqa: BLE001 - user code: whatever it raises, the message is unreadable by it
        raise Rejected("decoder_failed", f"{profile.decoder}: {type(exc).__name__}: {str(exc)[:160]}") from None
    if not isinstance(doc, dict):
        raise Rejected("decoder_failed", f"{profile.decoder} returned {type(doc).__name__}, not a dict")
    reading = _read_object(doc, data, profile, device_id, attributes, message_id, publish_time_us)
    # A decoder's str need not be Unicode text (bytes.decode(..., "surrogateescape") leaves unpaired surrogates):
    # UTF-8 cannot encode it, for BigQuery or a Bigtable qualifier. JSON decoding never makes one (decode_json).
    for text in (*reading.metrics, *reading.labels, *reading.labels.values()):
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                raise Rejected("decoder_failed", f"{profile.decoder} returned a string that is not Unicode text "
                                                 "(an unpaired UTF-16 surrogate)") from None
    return reading


_UNDECODED = object()


def read(data: bytes, attributes: Mapping[str, str], message_id: str, publish_time_us: int,
         profiles: tuple[Profile, ...] = DEFAULT_PROFILES) -> Reading:
    """Read one message with the first of ``profiles`` that can; :class:`Rejected` when none can.

    The rejection carries the first profile's reason, and its detail every profile's. A telemetry-v1 payload that
    is broken (it has ``ts`` or ``metrics``) is rejected at once rather than read by a later profile.
    """
    device_id = device_identity(attributes)
    # The common telemetry-v1 shape first; b'"metrics"' spares the try to payloads of other shapes.
    if profiles and profiles[0].name == "telemetry-v1" and b'"metrics"' in data:
        reading = _read_v1_common(data, device_id, attributes, message_id, publish_time_us)
        if reading is not None:
            return reading
    doc: Any = _UNDECODED
    failures: list[tuple[str, str, str]] = []  # profile, reason, detail
    for profile in profiles:
        name = profile.name
        try:
            if name == "raw":
                return _read_raw(data, profile, device_id, attributes, message_id, publish_time_us)
            if doc is _UNDECODED:
                try:
                    doc = decode_json(data)
                except Rejected as exc:
                    doc = exc
            if isinstance(doc, Rejected):
                raise doc
            if name == "telemetry-v1":
                if type(doc) is dict and "ts" not in doc and "metrics" not in doc:
                    # Not this profile's shape (a later one's, most often): said without raising.
                    failures.append((name, "missing_ts", "payload has no ts"))
                    continue
                return _read_v1(doc, data, device_id, attributes, message_id, publish_time_us)
            return _read_object(doc, data, profile, device_id, attributes, message_id, publish_time_us)
        except Rejected as exc:
            if exc.claimed:
                raise
            failures.append((name, exc.reason, exc.detail))
    _, reason, detail = failures[0]
    if len(failures) > 1:
        detail = "; ".join(f"{name}: {why}: {text}" for name, why, text in failures)[:1000]
    raise Rejected(reason, detail)


# ------------------------------------------------------------------------------------------------ rows


# Epoch second -> its text. Readings of a bundle share their seconds: formatting each second once saves most of the
# cost, and a dict's get is cheaper than an lru_cache's call.
_SECONDS: dict[int, str] = {}


def _utc_second(secs: int) -> str:
    if len(_SECONDS) >= 8192:
        _SECONDS.clear()
    text = _SECONDS[secs] = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text


def rfc3339(us: int) -> str:
    """Epoch microseconds as the RFC 3339 text BigQuery's JSON API takes for TIMESTAMP."""
    secs, frac = divmod(us, 1_000_000)
    # zfill: a third of the cost of the format spec :06d
    return f"{_SECONDS.get(secs) or _utc_second(secs)}.{str(frac).zfill(6)}Z"


def _extra_json() -> Callable[[dict[str, Any]], str]:
    """json.dumps(extra, separators=(",", ":"), sort_keys=True), for a third of its cost: the standard library's C
    encoder, made once (json.dumps makes an encoder per call, and JSONEncoder.encode sets the C one up per call).
    Without circular-reference markers: decoded JSON has no cycles."""
    encoder = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return encoder.encode
    chunks = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
    return lambda extra: "".join(chunks(extra, 0))


_EXTRA_JSON = _extra_json()


_BASE64 = binascii.b2a_base64


def raw_row(r: Reading) -> dict[str, Any]:
    """The ``telemetry_raw`` row (spec.TABLES)."""
    # rfc3339() written out twice: this runs for every message (bench/pipeline_cost.py).
    event_s, event_frac = divmod(r.event_time_us, 1_000_000)
    publish_s, publish_frac = divmod(r.publish_time_us, 1_000_000)
    return {
        "device_id": r.device_id,
        "device_num_id": r.device_num_id,
        "registry_id": r.registry_id,
        "sub_folder": r.sub_folder,
        "event_time": f"{_SECONDS.get(event_s) or _utc_second(event_s)}.{str(event_frac).zfill(6)}Z",
        "publish_time": f"{_SECONDS.get(publish_s) or _utc_second(publish_s)}.{str(publish_frac).zfill(6)}Z",
        "message_id": r.message_id,
        "seq": r.seq,
        "metrics": [{"name": k, "value": v} for k, v in r.metrics.items()],
        "extra": _EXTRA_JSON(r.extra) if r.extra else None,
        "labels": [{"name": k, "value": v} for k, v in r.labels.items()] if r.labels else [],
        "profile": r.profile,
        "event_time_source": r.event_time_source,
        "payload": _BASE64(r.payload, newline=False).decode("ascii"),
    }


_DOUBLE = struct.Struct(">d")
Cell = tuple[str, bytes, bytes, int]  # family, qualifier, value, timestamp (epoch µs, millisecond granularity)


def bigtable_cells(r: Reading) -> tuple[bytes, list[Cell]]:
    """Row key and cells of the Bigtable ``telemetry`` row.

    Every cell carries the event time (truncated to the millisecond granularity Bigtable keeps) as its
    timestamp: writing the same message again overwrites the same version instead of adding one.
    """
    ts = r.event_time_us // 1000 * 1000
    pack = _DOUBLE.pack
    cells: list[Cell] = [("m", name.encode(), pack(v), ts) for name, v in r.metrics.items()]
    # Written out rather than looped over: this runs for every message (bench/pipeline_cost.py).
    append = cells.append
    if r.device_num_id is not None:
        append(("a", b"device_num_id", r.device_num_id.encode(), ts))
    if r.registry_id is not None:
        append(("a", b"registry_id", r.registry_id.encode(), ts))
    if r.sub_folder is not None:
        append(("a", b"sub_folder", r.sub_folder.encode(), ts))
    if r.seq is not None:
        append(("a", b"seq", b"%d" % r.seq, ts))
    cells += (("a", b"profile", r.profile.encode(), ts),
              ("a", b"event_time_source", r.event_time_source.encode(), ts))
    if r.labels:
        cells += [("l", k.encode(), v.encode(), ts) for k, v in r.labels.items()]
    if r.profile == "raw":
        cells.append(("p", b"raw", r.payload, ts))
    return (r._key or r.dedupe_key).encode(), cells


def internal_error_detail(step: str, exc: BaseException) -> str:
    """``telemetry_errors.detail`` of an ``internal_error``: the step, the exception's type and the function, file and
    line that raised it. Not the exception's text: a parser's message may quote the payload, and the payload is in
    the row's own column already."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        where = f" in {code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{step}: {type(exc).__name__}{where}"


def error_row(reason: str, detail: str, data: bytes | None, attributes: Mapping[str, str] | None,
              message_id: str | None, publish_time_us: int | None) -> dict[str, Any]:
    """The ``telemetry_errors`` row: the reason and the raw payload, untouched (BYTES travel as base64). ``detail``
    can quote a decoder's exception, whose text need not be Unicode text: an unpaired surrogate is written as its
    escape, or BigQuery would refuse the row and the dead letters would fail their bundle for ever."""
    return {
        "error": reason,
        "detail": detail if detail.isascii() else detail.encode("utf-8", "backslashreplace").decode("utf-8"),
        "payload": base64.b64encode(data).decode("ascii") if data is not None else None,
        "attributes": json.dumps(dict(attributes or {}), sort_keys=True),
        "publish_time": rfc3339(publish_time_us) if publish_time_us is not None else None,
        "message_id": message_id,
        "device_id": (attributes or {}).get("deviceId"),
    }

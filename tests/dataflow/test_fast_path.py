"""The accepted path's shortcuts change nothing the pipeline writes (dataflow_jobs/telemetry.py).

The common telemetry-v1 shape is read in one msgspec pass; every payload, well-formed or broken, must come out of
:func:`telemetry.read` and :func:`telemetry.parse` exactly as it does with that shortcut switched off: the same
reading, dedupe key, BigQuery row and Bigtable cells (compared by ``repr``, so 0.0 is not -0.0 and 1 is not 1.0),
or the same rejection (reason, detail, claimed). Payloads are generated as JSON text, so that they carry what a
firmware may send and ``json.dumps`` never writes: duplicate keys, numbers beyond a double, more digits than a
double holds, NaN, invalid UTF-8.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench import pipeline_cost
from dataflow_jobs import telemetry

PUBLISH_US = 1_795_000_030_123_456
ATTRS = {"deviceId": "dev-0001", "deviceNumId": "10001", "deviceRegistryId": "fleet"}
RUNS = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _token(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


# Numbers as JSON text: what json.dumps writes, and what it never does.
NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: json.dumps(f)),
    st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["-0", "-0.0", "1e400", "-1e999", "9" * 400, "123456789012345678901234567890",
                     "1.7976931348623157e308", "1.7976931348623159e308", "4.9e-324", "2e-400", "NaN", "Infinity"]),
)
OTHER = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.just("[1, 2]"), st.just("{}")).map(
    lambda v: v if v in ("[1, 2]", "{}") else _token(v))
NAMES = st.one_of(st.sampled_from(["temperature", "rpm", "t", "", "ts"]), st.text(max_size=6),
                  st.text(alphabet="aé€", min_size=126, max_size=130))


def _rfc3339(moment: datetime, digits: int, offset_min: int, lower: bool, space: bool) -> str:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{moment.microsecond:06d}{'7' * 3}"[:digits + 1] if digits
                                                    else "")
    if space:
        text = text.replace("T", " ")
    if offset_min == 0:
        return text + ("z" if lower else "Z")
    sign = "+" if offset_min > 0 else "-"
    return text + f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"


RFC3339 = st.builds(_rfc3339, st.datetimes(min_value=datetime(1969, 12, 31), max_value=datetime(2300, 1, 1)),
                    st.sampled_from([0, 1, 3, 6, 9]), st.integers(-900, 900), st.booleans(), st.booleans()).map(_token)
TIMES = st.one_of(
    st.integers(-5, telemetry.MAX_EVENT_MS + 5).map(str),
    st.integers(1_700_000_000_000, 1_900_000_000_000).map(str),
    RFC3339,
    st.sampled_from(['"2026-11-18T10:00:20"', '"soon"', '"2026-11-18T10:00:20.250+01:00"', '"1970-01-01T00:00:00Z"',
                     '"2286-11-20T17:46:39.999Z"', '"2286-11-20T17:46:40Z"', '"2026-11-18T23:59:60Z"']),
    NUMBERS, OTHER,
)


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{_token(k)}: {v}" for k, v in pairs) + "}"


METRICS = st.one_of(
    st.lists(st.tuples(NAMES, st.one_of(NUMBERS, NUMBERS, OTHER)), max_size=5).map(_object),
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(-1e6, 1e6).map(str)), min_size=1, max_size=4)
    .map(_object),
    OTHER, NUMBERS,
)
SEQS = st.one_of(st.integers(-3, 10**10 + 3).map(str), st.integers(0, 10**4).map(str), NUMBERS, OTHER)
KEYS = st.sampled_from(["ts", "metrics", "seq", "fw", "Ts"])


# Values of the common shape, near its edges.
GOOD_TIMES = st.one_of(
    st.integers(0, telemetry.MAX_EVENT_MS).map(str), RFC3339,
    st.sampled_from([-1, 0, telemetry.MAX_EVENT_MS, telemetry.MAX_EVENT_MS + 1, 2**64]).map(str),
    st.sampled_from(['"2026-11-18T10:00:20"', '"1969-12-31T23:59:59.999Z"', '"1970-01-01T00:00:00Z"',
                     '"2286-11-20T17:46:39.999Z"', '"2286-11-20T17:46:40Z"', '"soon"']),
)
GOOD_NUMBERS = st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
                         st.integers(-(2**70), 2**70).map(str), NUMBERS.filter(lambda n: n not in ("NaN", "Infinity")))
GOOD_METRICS = st.lists(st.tuples(NAMES, GOOD_NUMBERS), min_size=1, max_size=5).map(_object)
GOOD_SEQS = st.one_of(st.integers(0, 10**10 - 1).map(str), st.just("null"), st.just(str(10**10)))


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A telemetry-v1-like object as text: its keys in any order, some missing, some twice, some extra; half of them
    of the common shape, with values near its edges."""
    if draw(st.booleans()):
        keys = draw(st.permutations(["ts", "metrics", "seq"][:draw(st.integers(2, 3))]))
        if draw(st.integers(0, 4)) == 0:
            keys.append(draw(KEYS))
        values = {"ts": GOOD_TIMES, "metrics": GOOD_METRICS, "seq": GOOD_SEQS, "fw": OTHER, "Ts": TIMES}
    else:
        keys = draw(st.lists(KEYS, max_size=5))
        if draw(st.booleans()):  # most payloads have at least the two keys of the shape
            keys = ["ts", "metrics", *keys]
        values = {"ts": TIMES, "metrics": METRICS, "seq": SEQS, "fw": OTHER, "Ts": TIMES}
    text = _object([(k, draw(values[k])) for k in keys])
    data = text.encode()
    if draw(st.integers(0, 9)) == 0:  # broken bytes: cut short, or not UTF-8
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.sampled_from([b"", b"\xff", b"\xc3", b" "])) + data[cut:]
    return data


def _outcome(read, data: bytes) -> tuple:
    try:
        r = read(data)
    except telemetry.Rejected as exc:
        return "rejected", exc.reason, exc.detail, exc.claimed
    return "read", repr(r), r.dedupe_key, repr(telemetry.raw_row(r)), repr(telemetry.bigtable_cells(r))


def _without_shortcut(read, data: bytes) -> tuple:
    with mock.patch.object(telemetry, "_read_v1_common", lambda *args: None):
        return _outcome(read, data)


def _both(read, data: bytes) -> tuple[tuple, tuple]:
    fast = _outcome(read, data)
    taken = telemetry._read_v1_common(data, ATTRS["deviceId"], ATTRS, "42", PUBLISH_US) is not None
    event(f"{fast[0]}{' by the shortcut' if taken else ''}")  # --hypothesis-show-statistics: how many took it
    return fast, _without_shortcut(read, data)


def _read(data: bytes) -> telemetry.Reading:
    return telemetry.read(data, ATTRS, "42", PUBLISH_US)


def _parse(data: bytes) -> telemetry.Reading:
    return telemetry.parse(data, ATTRS, "42", PUBLISH_US)


@RUNS
@given(payloads())
def test_read_with_the_shortcut_is_read_without_it(data):
    fast, full = _both(_read, data)
    assert fast == full


@RUNS
@given(payloads())
def test_parse_with_the_shortcut_is_parse_without_it(data):
    fast, full = _both(_parse, data)
    assert fast == full


@pytest.mark.parametrize("depth", [10, 1100, 3000])
@pytest.mark.parametrize("where", ["extra", "inside an extra object", "metrics"])
def test_deep_nesting_is_read_or_rejected_as_without_the_shortcut(depth: int, where: str) -> None:
    """msgspec raises RecursionError (neither of its own errors nor a ValueError) skipping a value nested deeper than
    it recurses: out of the pipeline's DoFn, which catches Rejected only, that would fail the bundle, and streaming
    Dataflow retries a failed bundle without end. A 3 KB payload must be read or rejected as the full path does."""
    nested = "[" * depth + "]" * depth
    body = {"extra": f'"x": {nested}', "inside an extra object": f'"x": {{"y": {{"z": {nested}}}}}',
            "metrics": f'"m2": {nested}'}[where]
    data = ('{"ts": 1, "metrics": {"a": 1}, ' + body + "}").encode()
    if where == "metrics":
        data = ('{"ts": 1, "metrics": {"a": 1, ' + body + "}}").encode()
    for read in (_read, _parse):
        assert _outcome(read, data) == _without_shortcut(read, data)


def test_the_shortcut_reads_the_fleets_usual_messages():
    """Not vacuous: the bench's payloads without extra keys are read by the shortcut, not past it."""
    msgs = [(d, a) for d, a in pipeline_cost.payloads(200) if b'"fw"' not in d]
    assert len(msgs) == 180
    for data, attrs in msgs:
        r = telemetry._read_v1_common(data, attrs["deviceId"], attrs, "42", PUBLISH_US)
        assert r is not None and _outcome(_read, data) == _without_shortcut(_read, data)


@settings(database=None)
@given(st.integers(0, (telemetry.MAX_EVENT_MS + 1) * 1000 - 1))
def test_rfc3339_text_is_datetimes(us):
    want = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert telemetry.rfc3339(us) == want


@settings(database=None)
@given(st.integers(0, telemetry.MAX_EVENT_MS), st.one_of(st.none(), st.integers(0, 10**10 - 1)),
       st.sampled_from(["payload", "publish_time"]))
def test_dedupe_key_is_zero_padded_as_documented(ms, seq, source):
    r = telemetry.Reading("dev-1", ms * 1000 + 999, 5, "m7", {"t": 1.0}, seq, payload_digest="abc",
                          event_time_source=source)
    tail = f"{seq:010d}" if seq is not None else "mm7" if source == "publish_time" else "habc"
    assert r.dedupe_key == f"dev-1#{ms:013d}#{tail}"


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**80), 2**80), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12)


@settings(database=None)
@given(st.dictionaries(st.text(max_size=6), JSON_VALUES, min_size=1, max_size=4))
def test_the_extra_column_is_json_dumps(extra):
    assert telemetry.raw_row(telemetry.Reading("dev-1", 0, 0, "1", {"t": 1.0}, extra=extra))["extra"] \
        == json.dumps(extra, separators=(",", ":"), sort_keys=True)

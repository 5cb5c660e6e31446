"""The streaming telemetry pipeline: Pub/Sub → validate → dedupe → BigQuery + Bigtable → 1-minute
aggregates → threshold rules → config-change requests back to the devices.

The story, in the order the transforms run:

1. **ReadTelemetry** pulls the telemetry subscription with attributes. The bridge put the device's
   authenticated identity into the attributes (``deviceId`` …, docs/messages.md); the payload is the device's own
   bytes and is never trusted for identity.
2. **Parse** reads the payload with the payload profiles of its registry / subfolder (``--payload_profiles``:
   ``telemetry-v1``, ``json``, ``raw``, tried in order) and stamps each accepted reading with its event time
   (the payload's own, or the publish time for a payload that has none). Anything else goes to the ``errors``
   output with a reason class and the raw payload, is counted (Beam counter ``telemetry/rejected_<reason>``) and
   lands in ``telemetry_errors``: the pipeline never dies on input. A message that makes the reading raise
   anything else (a bug) is written there too, reason ``internal_error``, rather than failing its bundle.
3. **DropDuplicates** keeps the first reading per device id + event time + seq (a payload hash without seq; the
   Pub/Sub message id for a payload without a time) seen within ``--dedupe_seconds`` of processing time.
   Pub/Sub delivers at least once and devices resend after a lost PUBACK; ``id_label`` is not used because the
   bridge cannot give a resend the same id (and the DirectRunner rejects it).
4. **WriteRaw** streams one ``telemetry_raw`` row per reading; **WriteBigtable** writes one Bigtable row per
   reading whose key is ``{device_id}#{event_time_ms:013d}#{seq or its stand-in}`` and whose cells carry the
   event time as their timestamp, so a replay older than the dedupe horizon overwrites the same cell versions.
5. **AggregatePerMinute**: 1-minute event-time windows per device and metric, fired when the watermark passes
   the window end and once more for each late reading within ``--allowed_lateness_seconds``. Panes discard
   what they fired, so ``telemetry_1m`` holds additive partial aggregates: sum ``count``, min ``min``,
   max ``max`` and count-weight ``mean`` over the rows of one window to get the window's figures (the
   ``telemetry_hourly`` view does exactly that). ``pane_timing`` says which firing wrote a row.
6. **RequestConfigChanges** checks each reading against ``--threshold_rules`` and publishes
   ``{"device_id": ..., "config": {...}}`` to the config-requests topic, at most one per device per
   ``--rule_min_interval_seconds`` of the device's event time.

Run it on Dataflow (normally through the Flex Template that ``gcp_iot_bridge/infra/pipeline.py`` builds)::

    python -m dataflow_jobs.telemetry_pipeline \\
        --input_subscription=projects/P/subscriptions/iot-dev-telemetry-pipeline \\
        --bigquery_dataset=P.iot --bigtable_instance=projects/P/instances/iot-dev \\
        --config_requests_topic=projects/P/topics/iot-dev-config-requests \\
        --threshold_rules='{"temperature": {"above": 80, "config": {"fan": "max"}}}' \\
        --runner=DataflowRunner --project=P --region=europe-west1 --temp_location=gs://B/tmp

or locally against the emulators (``PUBSUB_EMULATOR_HOST`` and ``BIGTABLE_EMULATOR_HOST`` set) with
``--runner=BundleBasedDirectRunner --bigquery_endpoint=http://127.0.0.1:PORT``. Flags this module does not
know are passed to Beam's ``PipelineOptions``; ``--streaming`` is always on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import BooleanCoder, VarIntCoder
from apache_beam.io.gcp.bigtableio import WriteToBigTable
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics.metric import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.runner import PipelineResult
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteRuntimeState,
    ReadModifyWriteStateSpec,
    RuntimeTimer,
    TimerSpec,
)
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfo

from dataflow_jobs import rules as rules_mod
from dataflow_jobs import schema, telemetry
from dataflow_jobs.sinks import InsertRows, ToDirectRow
from iotbridge import spec

_LOG = logging.getLogger(__name__)

ERRORS_TAG = "errors"
WINDOW_SECONDS = 60

# Beam's DoFn parameter defaults are sentinels the runner replaces with the value they name, but its annotations
# give them the sentinel's own type (``_DoFnParam``, ``StateParam``, ``TimerParam``), so a parameter defaulting to
# one would be typed as the sentinel. These are the same objects (Beam recognises them by equality), typed as what
# ``process`` actually receives.
TIMESTAMP = cast(Timestamp, beam.DoFn.TimestampParam)
WINDOW = cast(window.IntervalWindow, beam.DoFn.WindowParam)
PANE = cast(PaneInfo, beam.DoFn.PaneInfoParam)


def state(spec: ReadModifyWriteStateSpec) -> ReadModifyWriteRuntimeState:
    """The ``StateParam`` sentinel for ``spec``, typed as the state the runner passes."""
    return cast(ReadModifyWriteRuntimeState, beam.DoFn.StateParam(spec))


def timer(spec: TimerSpec) -> RuntimeTimer:
    """The ``TimerParam`` sentinel for ``spec``, typed as the timer the runner passes."""
    return cast(RuntimeTimer, beam.DoFn.TimerParam(spec))

# --------------------------------------------------------------------------------------------- flags

_PROJECT = r"[a-z][-a-z0-9]{4,28}[a-z0-9]"
_PUBSUB_ID = r"[a-zA-Z][-_.~+%a-zA-Z0-9]{2,254}"


@dataclass(frozen=True)
class Flag:
    """One pipeline flag; ``metadata.json`` lists exactly these (a test checks name, helpText and regex)."""

    name: str
    label: str
    help: str
    regex: str
    default: str | None = None  # None: required
    param_type: str | None = None  # the Flex Template paramType, for the console's resource pickers

    @property
    def optional(self) -> bool:
        return self.default is not None

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "label": self.label, "helpText": self.help,
                               "regexes": [self.regex], "isOptional": self.optional}
        if self.param_type:
            out["paramType"] = self.param_type
        return out


FLAGS: tuple[Flag, ...] = (
    Flag("input_subscription", "Telemetry subscription",
         "Pub/Sub subscription with the bridge's telemetry, as projects/PROJECT/subscriptions/NAME.",
         rf"^projects/{_PROJECT}/subscriptions/{_PUBSUB_ID}$", param_type="PUBSUB_SUBSCRIPTION"),
    Flag("bigquery_dataset", "BigQuery dataset",
         "Dataset holding telemetry_raw, telemetry_1m and telemetry_errors, as PROJECT.DATASET.",
         rf"^{_PROJECT}\.[A-Za-z0-9_]{{1,1024}}$"),
    Flag("bigtable_instance", "Bigtable instance",
         "Bigtable instance of the telemetry table, as projects/PROJECT/instances/INSTANCE.",
         rf"^projects/{_PROJECT}/instances/[a-z][-a-z0-9]{{4,31}}[a-z0-9]$"),
    Flag("bigtable_table", "Bigtable table",
         "Bigtable table id for one row per accepted message.",
         r"^[-_.a-zA-Z0-9]{1,50}$", default=schema.BIGTABLE_TABLE),
    Flag("config_requests_topic", "Config-requests topic",
         "Pub/Sub topic for config-change requests, as projects/PROJECT/topics/NAME.",
         rf"^projects/{_PROJECT}/topics/{_PUBSUB_ID}$", param_type="PUBSUB_TOPIC"),
    Flag("threshold_rules", "Threshold rules",
         'JSON object: metric name -> {"above": N and/or "below": N, "config": {...}}; '
         "a reading that crosses a limit requests that config for its device.",
         r"^\s*\{.*\}\s*$", default="{}"),
    Flag("rule_min_interval_seconds", "Config request interval",
         "At most one config request per device per this many seconds of event time.",
         r"^[1-9][0-9]{0,6}$", default="300"),
    Flag("allowed_lateness_seconds", "Allowed lateness",
         "How long after a 1-minute window closes late readings still update telemetry_1m, in seconds.",
         r"^[0-9]{1,6}$", default="900"),
    Flag("dedupe_seconds", "Dedupe horizon",
         "How long, in seconds of processing time, a reading's identity (device id + event time + seq or payload "
         "hash; the message id for a payload without a time) is remembered to drop duplicates.",
         r"^[1-9][0-9]{0,6}$", default="600"),
    Flag("payload_profiles", "Payload profiles",
         'JSON object: the payload profiles (telemetry-v1, json, raw) tried in order, as {"default": [...], '
         '"registries": {"REGISTRY": [...]}, "subfolders": {"REGISTRY/SUBFOLDER": [...]}}.',
         r"^\s*\{.*\}\s*$", default=spec.PayloadProfiles().to_json()),
    Flag("bigquery_endpoint", "BigQuery endpoint",
         "BigQuery API endpoint; empty for Google's. A plaintext http:// endpoint (a local BigQuery) gets "
         "no credentials.",
         r"^(https?://[-.a-zA-Z0-9]+(:[0-9]{1,5})?/?)?$", default=""),
)


TEMPLATE_NAME = "gcp-iot-bridge telemetry pipeline"
TEMPLATE_DESCRIPTION = (
    "Streaming: device telemetry from Pub/Sub, validated with the bridge's identity attributes, into BigQuery "
    "(telemetry_raw, telemetry_1m, telemetry_errors) and Bigtable (telemetry); threshold rules publish "
    "config-change requests.")


def template_metadata() -> dict[str, Any]:
    """``metadata.json``, generated from :data:`FLAGS`: ``python -m dataflow_jobs.telemetry_pipeline
    --write-metadata`` rewrites the file (a test fails while it differs)."""
    return {"name": TEMPLATE_NAME, "description": TEMPLATE_DESCRIPTION, "streaming": True,
            "parameters": [f.metadata() for f in FLAGS]}


def write_metadata(path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(template_metadata(), indent=2, ensure_ascii=False) + "\n")


def _checked(flag: Flag) -> Callable[[str], str]:
    pattern = re.compile(flag.regex, re.DOTALL)

    def check(value: str) -> str:
        if not pattern.match(value):
            raise argparse.ArgumentTypeError(f"--{flag.name}={value[:80]!r} does not match {flag.regex}")
        return value

    return check


class _DefaultsShown(argparse.HelpFormatter):
    """Shows an optional flag's default after its help (the help text itself is metadata.json's helpText)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)r)"
        return text


def flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataflow_jobs.telemetry_pipeline",
        formatter_class=_DefaultsShown,
        description="Streaming telemetry pipeline (Pub/Sub -> BigQuery + Bigtable -> config requests). "
                    "Other flags go to Beam's PipelineOptions (--runner, --project, --region ...).")
    for f in FLAGS:
        parser.add_argument(f"--{f.name}", type=_checked(f), required=not f.optional, default=f.default,
                            help=f.help)
    return parser


@dataclass(frozen=True)
class Settings:
    input_subscription: str
    bigquery_project: str
    bigquery_dataset: str
    bigtable_project: str
    bigtable_instance: str
    bigtable_table: str
    config_requests_topic: str
    rules: tuple[rules_mod.ThresholdRule, ...]
    rule_min_interval_seconds: int
    allowed_lateness_seconds: int
    dedupe_seconds: int
    bigquery_endpoint: str | None
    profiles: spec.PayloadProfiles = spec.PayloadProfiles()

    def table(self, name: str) -> str:
        return f"{self.bigquery_project}.{self.bigquery_dataset}.{name}"

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Settings:
        bq_project, dataset = ns.bigquery_dataset.split(".", 1)
        _, bt_project, _, bt_instance = ns.bigtable_instance.split("/")
        return cls(
            input_subscription=ns.input_subscription,
            bigquery_project=bq_project,
            bigquery_dataset=dataset,
            bigtable_project=bt_project,
            bigtable_instance=bt_instance,
            bigtable_table=ns.bigtable_table,
            config_requests_topic=ns.config_requests_topic,
            rules=rules_mod.parse_rules(ns.threshold_rules),
            rule_min_interval_seconds=int(ns.rule_min_interval_seconds),
            allowed_lateness_seconds=int(ns.allowed_lateness_seconds),
            dedupe_seconds=int(ns.dedupe_seconds),
            bigquery_endpoint=ns.bigquery_endpoint or None,
            profiles=spec.parse_payload_profiles(ns.payload_profiles),
        )


# ---------------------------------------------------------------------------------------- transforms


def _epoch_us(value: Any) -> int | None:
    """A Pub/Sub publish time (datetime, Beam or protobuf Timestamp) as epoch microseconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, Timestamp):
        return value.micros
    if hasattr(value, "seconds") and hasattr(value, "nanos"):  # google.protobuf.Timestamp
        return value.seconds * 1_000_000 + value.nanos // 1000
    return None


class ParseTelemetry(beam.DoFn):
    """PubsubMessage → Reading stamped with its event time, or an error row on the ``errors`` output.

    Each message is read by the profiles of its registry / subfolder (``deviceRegistryId`` / ``subFolder``
    attributes, set by the bridge); ``accepted_<profile>`` counts what each profile read. A message that makes the
    reading raise anything but :class:`telemetry.Rejected` (a bug, or input no check foresaw) is an error row too,
    reason ``internal_error``: an exception escaping ``process`` would fail the bundle, and streaming Dataflow
    retries a failed bundle for ever, so one device's message would stall the pipeline.

    The counters are added up per bundle and incremented once each in ``finish_bundle``, which Beam runs in the
    step's metrics scope as it does ``process``: with a worker's metrics container current, the two ``inc`` calls of
    an accepted message cost about 0.3 µs, its tally in a dict about 0.09 µs. A failed bundle's counts are not
    committed either way.
    """

    def __init__(self, profiles: spec.PayloadProfiles | None = None) -> None:
        self.profiles = profiles or spec.PayloadProfiles()
        # (registry, subfolder) -> its profile list: looked up once per pair, not per message.
        self._lists: dict[tuple[str | None, str | None], tuple[spec.Profile, ...]] = {}
        self.accepted = Metrics.counter("telemetry", "accepted")
        self.by_profile = {p: Metrics.counter("telemetry", f"accepted_{p}") for p in spec.PROFILE_NAMES}
        self.rejected = {r: Metrics.counter("telemetry", f"rejected_{r}") for r in telemetry.ALL_REASONS}
        self.start_bundle()

    def start_bundle(self) -> None:
        # This bundle's counts: profile -> accepted, reason -> rejected; the internal errors already logged.
        self._accepted: dict[str, int] = dict.fromkeys(spec.PROFILE_NAMES, 0)
        self._rejected: dict[str, int] = {}
        self._logged: set[str] = set()

    def finish_bundle(self) -> None:
        accepted, rejected = self._accepted, self._rejected
        self.start_bundle()
        total = 0
        for profile, n in accepted.items():
            if n:
                self.by_profile[profile].inc(n)
                total += n
        if total:
            self.accepted.inc(total)
        for reason, n in rejected.items():
            self.rejected[reason].inc(n)

    def process(self, msg: PubsubMessage, element_ts: Timestamp = TIMESTAMP) -> Iterable[Any]:
        attributes: dict[str, str] = {}
        publish_us: int | None = None
        data = b""
        try:
            attributes = dict(msg.attributes or {})
            publish_us = _epoch_us(msg.publish_time)
            if publish_us is None:
                # Without a timestamp attribute the element timestamp is the publish time.
                publish_us = element_ts.micros
            data = msg.data or b""
            where = (attributes.get("deviceRegistryId"), attributes.get("subFolder"))
            profiles = self._lists.get(where)
            if profiles is None:
                if len(self._lists) >= 4096:  # subfolders are the devices' to name: the cache stays bounded
                    self._lists.clear()
                profiles = self._lists[where] = self.profiles.for_message(*where)
            reading = telemetry.read(data, attributes, msg.message_id or "", publish_us, profiles)
        except telemetry.Rejected as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:  # noqa: BLE001 - any other exception is this message's, not the bundle's
            reason = telemetry.INTERNAL_ERROR
            detail = _internal_error("Parse", exc, self._logged, msg.message_id, attributes.get("deviceId"))
        else:
            self._accepted[reading.profile] += 1
            yield window.TimestampedValue(reading, Timestamp(micros=reading.event_time_us))
            return
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        yield TaggedOutput(ERRORS_TAG, telemetry.error_row(
            reason, detail, data, attributes, msg.message_id, publish_us))


def _internal_error(step: str, exc: Exception, logged: set[str], message_id: str | None,
                    device_id: str | None) -> str:
    """The ``internal_error`` detail of ``exc``, logged once per distinct detail in ``logged`` (the DoFn's, reset
    each bundle): a bug every message hits does not flood the log; the counter and ``telemetry_errors`` have every
    message."""
    detail = telemetry.internal_error_detail(step, exc)
    if detail not in logged:
        logged.add(detail)
        _LOG.error("telemetry message %s of device %s written to telemetry_errors as %s: %s",
                   message_id, device_id, telemetry.INTERNAL_ERROR, detail)
    return detail


def _reading_attributes(r: telemetry.Reading) -> dict[str, str]:
    """The bridge's attributes a Reading keeps, for its error row."""
    pairs = (("deviceId", r.device_id), ("deviceNumId", r.device_num_id), ("deviceRegistryId", r.registry_id),
             ("subFolder", r.sub_folder))
    return {k: v for k, v in pairs if v is not None}


class PerReading(beam.DoFn):
    """``fn(reading)``'s outputs, for a step after the parse that runs code over a reading's device-given content
    (its BigQuery row, its Bigtable cells). A reading that makes ``fn`` raise is an ``internal_error`` row on the
    ``errors`` output, as in :class:`ParseTelemetry`, instead of a bundle that fails for ever. The reading's other
    steps (aggregates, rules) are not held back. ``fn`` returns its outputs made (a tuple), not a generator that
    would raise later."""

    def __init__(self, step: str, fn: Callable[[telemetry.Reading], Iterable[Any]]) -> None:
        self.step = step
        self.fn = fn
        self.internal_errors = Metrics.counter("telemetry", f"rejected_{telemetry.INTERNAL_ERROR}")
        self._logged: set[str] = set()

    def start_bundle(self) -> None:
        self._logged = set()

    def process(self, reading: telemetry.Reading) -> Iterable[Any]:
        try:
            out = self.fn(reading)
        except Exception as exc:  # noqa: BLE001 - any other exception is this reading's, not the bundle's
            detail = _internal_error(self.step, exc, self._logged, reading.message_id, reading.device_id)
            self.internal_errors.inc()  # rare: counted as it happens
            yield TaggedOutput(ERRORS_TAG, telemetry.error_row(
                telemetry.INTERNAL_ERROR, detail, reading.payload, _reading_attributes(reading), reading.message_id,
                reading.publish_time_us))
            return
        yield from out


def _raw_rows(r: telemetry.Reading) -> tuple[tuple[str, dict[str, Any]]]:
    return ((r.dedupe_key, telemetry.raw_row(r)),)


def _bigtable_rows(r: telemetry.Reading) -> tuple[tuple[bytes, list[telemetry.Cell]]]:
    return (telemetry.bigtable_cells(r),)


class FirstPerKey(beam.DoFn):
    """Emit the first value of each key; forget the key ``seconds`` of processing time later.

    Beam's ``DeduplicatePerKey`` does the same without a counter; duplicates dropped is a figure operators
    want (a device resending after lost PUBACKs shows up here) and the emulator test waits on it.
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, seconds: int, counter: str = "duplicates_dropped"):
        self.horizon = Duration(seconds=seconds)
        self.dropped = Metrics.counter("telemetry", counter)

    def process(self, element, seen: ReadModifyWriteRuntimeState = state(SEEN), expiry: RuntimeTimer = timer(EXPIRY)):
        if seen.read():
            self.dropped.inc()
            return
        seen.write(True)
        expiry.set(Timestamp.now() + self.horizon)
        yield element[1]

    @userstate.on_timer(EXPIRY)
    def expire(self, seen: ReadModifyWriteRuntimeState = state(SEEN)):
        seen.clear()


class DropDuplicates(beam.PTransform):
    """First reading per :attr:`telemetry.Reading.dedupe_key` within ``seconds`` of processing time."""

    def __init__(self, seconds: int, label: str | None = None):
        super().__init__(label)
        self.seconds = seconds

    def expand(self, input_or_inputs):
        return (input_or_inputs
                | "KeyByIdentity" >> beam.Map(lambda r: (r.dedupe_key, r)).with_output_types(
                    typehints.Tuple[str, typehints.Any])
                | "FirstPerKey" >> beam.ParDo(FirstPerKey(self.seconds)))


def _stats(acc: tuple) -> tuple[int, float, float, float, float]:
    """(count, sum, min, max, running mean) of a ``MinMaxMean`` accumulator. A job updated in place may still hold the
    previous version's (count, sum, min, max) for the windows open during the update: its running mean is the sum
    over the count (clamped to [min, max] when that sum had already overflowed)."""
    if len(acc) == 5:
        return acc
    n, s, lo, hi = acc
    return n, s, lo, hi, (min(max(s / n, lo), hi) if n else 0.0)


class MinMaxMean(beam.CombineFn):
    """(count, mean, min, max) of the values of one key and window. The mean is the sum over the count while that sum
    is finite. Values near the ends of the float range (each finite, their sum not: 1.5e308 twice) take the running
    mean instead, a count-weighted average that stays within [min, max]: an infinite mean would make a row BigQuery
    refuses (JSON has no Infinity), and its batch would be retried for ever."""

    def create_accumulator(self):
        return 0, 0.0, float("inf"), float("-inf"), 0.0

    def add_input(self, acc, value):
        n, s, lo, hi, mean = _stats(acc)
        n += 1
        return n, s + value, min(lo, value), max(hi, value), mean * ((n - 1) / n) + value / n

    def merge_accumulators(self, accumulators):
        stats = [_stats(a) for a in accumulators]
        n = sum(a[0] for a in stats)
        if not n:
            return self.create_accumulator()
        return (n, sum(a[1] for a in stats), min(a[2] for a in stats), max(a[3] for a in stats),
                sum(a[4] * (a[0] / n) for a in stats))

    def extract_output(self, acc):
        n, s, lo, hi, mean = _stats(acc)
        exact = s / n if n else 0.0
        return n, (exact if math.isfinite(exact) else min(max(mean, lo), hi)), lo, hi


class FormatMinuteRow(beam.DoFn):
    """((device, metric), stats) in a window → (insert id, ``telemetry_1m`` row)."""

    def process(self, element, win: window.IntervalWindow = WINDOW, pane: PaneInfo = PANE):
        (device_id, metric), (n, mean, lo, hi) = element
        start, end = win.start.micros, win.end.micros
        timing = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}.get(int(pane.timing), "UNKNOWN")
        row = {
            "device_id": device_id, "metric": metric,
            "window_start": telemetry.rfc3339(start), "window_end": telemetry.rfc3339(end),
            "count": n, "min": lo, "max": hi, "mean": mean, "pane_timing": timing,
        }
        yield f"{device_id}|{metric}|{start}|{pane.index}", row


class AggregatePerMinute(beam.PTransform):
    """1-minute event-time windows per device and metric → ``(insert id, telemetry_1m row)``."""

    def __init__(self, allowed_lateness_seconds: int, label: str | None = None):
        super().__init__(label)
        self.allowed_lateness = allowed_lateness_seconds

    def expand(self, input_or_inputs):
        return (input_or_inputs
                | "PerMetric" >> beam.FlatMap(lambda r: [((r.device_id, m), v) for m, v in r.metrics.items()])
                | "Minute" >> beam.WindowInto(
                    window.FixedWindows(WINDOW_SECONDS),
                    # Fire at the watermark, then once per late reading (leader_board's late trigger);
                    # discarding panes keep the rows additive.
                    trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                    allowed_lateness=self.allowed_lateness)
                | "Stats" >> beam.CombinePerKey(MinMaxMean())
                | "Rows" >> beam.ParDo(FormatMinuteRow()))


class RateLimitPerDevice(beam.DoFn):
    """At most one request per device per ``interval`` of event time (one integer of state per device)."""

    LAST = ReadModifyWriteStateSpec("last_request_us", VarIntCoder())

    def __init__(self, interval_seconds: int):
        self.interval_us = interval_seconds * 1_000_000
        self.suppressed = Metrics.counter("rules", "config_requests_rate_limited")
        self.sent = Metrics.counter("rules", "config_requests")

    def process(self, element, ts: Timestamp = TIMESTAMP, last: ReadModifyWriteRuntimeState = state(LAST)):
        device_id, (config, fired) = element
        previous = last.read()
        if previous is not None and ts.micros < previous + self.interval_us:
            self.suppressed.inc()
            return
        last.write(ts.micros)
        self.sent.inc()
        yield PubsubMessage(rules_mod.config_request(device_id, config),
                            {"source": "telemetry-pipeline", "rules": ",".join(fired), "deviceId": device_id})


class RequestConfigChanges(beam.PTransform):
    """Readings that cross a threshold → config-change request messages (PubsubMessage)."""

    def __init__(self, rules: tuple[rules_mod.ThresholdRule, ...], min_interval_seconds: int,
                 label: str | None = None):
        super().__init__(label)
        self.rules = rules
        self.min_interval_seconds = min_interval_seconds

    def expand(self, input_or_inputs):
        rules = self.rules

        def breaches(r: telemetry.Reading):
            hit = rules_mod.evaluate(r, rules)
            return [(r.device_id, hit)] if hit else []

        return (input_or_inputs
                | "CheckThresholds" >> beam.FlatMap(breaches).with_output_types(
                    typehints.Tuple[str, typehints.Any])
                | "RateLimit" >> beam.ParDo(RateLimitPerDevice(self.min_interval_seconds)))


def _error_id(row: dict[str, Any]) -> tuple[str, tuple[str, dict[str, Any]]]:
    """An error row keyed by its insert id (the message id), the pair itself the value FirstPerKey passes on."""
    rid = row["message_id"] or json.dumps(row, sort_keys=True)[:128]
    return rid, (rid, row)


class ProcessTelemetry(beam.PTransform):
    """Everything between the Pub/Sub read and the sinks; returns a dict of the outputs.

    ``raw`` (insert id, telemetry_raw row), ``bigtable`` (row key, cells), ``minute`` (insert id, telemetry_1m
    row), ``errors`` (insert id, telemetry_errors row), ``requests`` PubsubMessages. Tests drive it from
    ``beam.Create`` / ``TestStream``; :func:`build` connects it to the real sources and sinks.
    """

    def __init__(self, settings: Settings, label: str | None = None):
        super().__init__(label)
        self.s = settings

    def expand(self, input_or_inputs):
        parsed = input_or_inputs | "Parse" >> beam.ParDo(ParseTelemetry(self.s.profiles)).with_outputs(
            ERRORS_TAG, main="readings")
        readings = parsed.readings | "DropDuplicates" >> DropDuplicates(self.s.dedupe_seconds)
        raw = readings | "RawRows" >> beam.ParDo(PerReading("RawRows", _raw_rows)).with_outputs(
            ERRORS_TAG, main="rows")
        bigtable = readings | "BigtableCells" >> beam.ParDo(PerReading("BigtableCells", _bigtable_rows)).with_outputs(
            ERRORS_TAG, main="rows")
        return {
            "raw": raw.rows,
            "bigtable": bigtable.rows,
            "minute": readings | "AggregatePerMinute" >> AggregatePerMinute(self.s.allowed_lateness_seconds),
            # A Pub/Sub redelivery or replay (seek) of an unreadable message has its message id: one error row.
            "errors": ((parsed[ERRORS_TAG], raw[ERRORS_TAG], bigtable[ERRORS_TAG])
                       | "AllErrors" >> beam.Flatten()
                       | "ErrorIds" >> beam.Map(_error_id).with_output_types(typehints.Tuple[str, typehints.Any])
                       | "FirstErrorPerId" >> beam.ParDo(
                           FirstPerKey(self.s.dedupe_seconds, "error_duplicates_dropped"))),
            "requests": readings | "RequestConfigChanges" >> RequestConfigChanges(
                self.s.rules, self.s.rule_min_interval_seconds),
        }


def build(p: beam.Pipeline, s: Settings) -> None:
    """Wire the real source and sinks around :class:`ProcessTelemetry`."""
    out = (p
           | "ReadTelemetry" >> ReadFromPubSub(subscription=s.input_subscription, with_attributes=True)
           | "Process" >> ProcessTelemetry(s))
    # Applying a sink adds it to the pipeline; what it returns is not used.
    _ = out["raw"] | "WriteRaw" >> beam.ParDo(InsertRows(s.table(schema.RAW), s.bigquery_endpoint))
    _ = out["minute"] | "WriteMinute" >> beam.ParDo(InsertRows(s.table(schema.MINUTE), s.bigquery_endpoint))
    _ = out["errors"] | "WriteErrors" >> beam.ParDo(InsertRows(s.table(schema.ERRORS), s.bigquery_endpoint))
    _ = (out["bigtable"]
         | "BigtableRows" >> beam.ParDo(ToDirectRow())
         | "WriteBigtable" >> WriteToBigTable(project_id=s.bigtable_project, instance_id=s.bigtable_instance,
                                              table_id=s.bigtable_table))
    _ = out["requests"] | "PublishConfigRequests" >> WriteToPubSub(s.config_requests_topic, with_attributes=True)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, PipelineOptions]:
    parser = flag_parser()
    ns, beam_args = parser.parse_known_args(argv)
    try:
        settings = Settings.from_args(ns)
    except rules_mod.RuleError as exc:
        parser.error(str(exc))
    except spec.ProfileError as exc:
        parser.error(f"--payload_profiles: {exc}")
    for profile in settings.profiles.all():
        if profile.decoder:
            # The launcher imports what the workers will: a decoder missing from the image fails the launch.
            try:
                telemetry.load_decoder(profile.decoder)
            except (ImportError, AttributeError, TypeError) as exc:
                parser.error(f"--payload_profiles: decoder {profile.decoder} cannot be loaded: {exc}")
    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = True
    return settings, options


def run(argv: Sequence[str] | None = None) -> PipelineResult:
    """Build and start the pipeline; returns the runner's result without waiting (a streaming job never ends)."""
    settings, options = parse_args(argv)
    p = beam.Pipeline(options=options)
    build(p, settings)
    return p.run()


if __name__ == "__main__":
    import os
    import sys

    if sys.argv[1:] == ["--write-metadata"]:
        write_metadata(os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata.json"))
        sys.exit(0)
    logging.getLogger().setLevel(logging.INFO)
    result = run()
    # On Dataflow (the Flex Template launcher) submitting is the whole job of this process; a local runner
    # runs the pipeline inside it, so wait.
    if type(result).__name__ != "DataflowPipelineResult":
        result.wait_until_finish()

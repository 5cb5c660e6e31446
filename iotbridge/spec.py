"""The one description of the messaging and storage topology (docs/messages.md, docs/storage.md).

The Pulumi program (``infra/``) and the local stack (``iotctl local up``) both build from this module, so the
cloud and the laptop have the same topics, subscriptions, tables and views. Pure data: no cloud client,
no Pulumi.

Physical names derive from the stack's prefix: ``topic_name("iot-dev", "telemetry") == "iot-dev-telemetry"``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

# --------------------------------------------------------------------------------------------- Pub/Sub


@dataclass(frozen=True)
class TopicSpec:
    key: str
    description: str


@dataclass(frozen=True)
class SubscriptionSpec:
    key: str
    topic: str  # a TopicSpec key
    description: str
    kind: Literal["pull", "bigquery"] = "pull"
    ack_deadline_seconds: int = 60
    # Pub/Sub forwards a message to the dead-letter topic after max_delivery_attempts. Every subscription does,
    # except the dead-letter audit itself and a subscription Dataflow reads (see ``dataflow``).
    dead_letter: bool = True
    bigquery_table: str | None = None  # for kind == "bigquery": a TableSpec name
    exactly_once: bool = False
    # False: only the local stack creates it; in the cloud another resource owns the subscription
    # (the config-push function's Eventarc trigger creates its own).
    cloud: bool = True
    # Read by a Dataflow job's Pub/Sub source. The runner holds messages and extends their deadlines itself, so
    # delivery attempts climb on healthy messages: Pub/Sub documents dead-letter topics and exponential-backoff
    # retry policies as unsupported with Dataflow. Such a subscription has neither; the pipeline dead-letters
    # what it cannot accept into its own table (telemetry_errors).
    dataflow: bool = False

    def __post_init__(self) -> None:
        if self.dataflow and self.dead_letter:
            raise ValueError(f"subscription {self.key}: Dataflow does not support a dead-letter policy on its input")


TOPICS: dict[str, TopicSpec] = {
    t.key: t
    for t in (
        TopicSpec("telemetry", "Device telemetry from the bridge (/devices/{id}/events), IoT Core attributes."),
        TopicSpec("state", "Device state from the bridge (/devices/{id}/state)."),
        TopicSpec("config-requests", "Requests for a device config change (operators, the pipeline's rules)."),
        TopicSpec("device-logs", "Device logs and edge-model inference results (/devices/{id}/events/logs)."),
        TopicSpec("dead-letter", "Messages a subscriber failed max_delivery_attempts times."),
        TopicSpec("device-commands", "Configs and commands fanned out to every bridge host."),
    )
}

SUBSCRIPTIONS: dict[str, SubscriptionSpec] = {
    s.key: s
    for s in (
        SubscriptionSpec("telemetry-pipeline", "telemetry", "The streaming pipeline's input.",
                         dead_letter=False, dataflow=True),
        # The state topic has no subscription of the stack's: the bridge writes each device's last state into the
        # registry itself. Whoever wants the stream of states subscribes to the topic, as with IoT Core.
        SubscriptionSpec("config-requests-push", "config-requests",
                         "Config requests to the config-push function (locally a push subscription; "
                         "in the cloud the Eventarc trigger owns its subscription).", cloud=False),
        SubscriptionSpec("device-logs-bigquery", "device-logs", "Device logs straight into BigQuery.",
                         kind="bigquery", bigquery_table="device_logs"),
        SubscriptionSpec("dead-letter-audit", "dead-letter", "Keeps dead-lettered messages for inspection.",
                         dead_letter=False, ack_deadline_seconds=600),
    )
}


def topic_name(prefix: str, key: str) -> str:
    if key not in TOPICS:
        raise KeyError(f"unknown topic {key!r}; known: {sorted(TOPICS)}")
    return f"{prefix}-{key}"


def subscription_name(prefix: str, key: str) -> str:
    if key not in SUBSCRIPTIONS:
        raise KeyError(f"unknown subscription {key!r}; known: {sorted(SUBSCRIPTIONS)}")
    return f"{prefix}-{key}"


# Attribute names the bridge sets on every message, as IoT Core did (docs/messages.md).
ATTRIBUTES = ("deviceId", "deviceNumId", "deviceRegistryId", "deviceRegistryLocation", "projectId", "subFolder",
              "gatewayId")

# ----------------------------------------------------------------------------------------- MQTT topics

# The MQTT topic layout devices see, as IoT Core defined it (docs/device-protocol.md): every topic of a device is
# ``/devices/{device_id}/{kind}``, events optionally with a subfolder (``/devices/{d}/events/{sub}``) and
# commands with one (``/devices/{d}/commands/{sub}``). Devices publish events and state; they receive config and
# commands; a gateway publishes attach and detach for the devices bound to it, and receives errors on its own.
EVENTS = "events"
STATE = "state"
CONFIG = "config"
COMMANDS = "commands"
ATTACH = "attach"
DETACH = "detach"
ERRORS = "errors"
DEVICE_PUBLISHES = (EVENTS, STATE)  # what a device (or a gateway for an attached device) may publish
GATEWAY_PUBLISHES = (ATTACH, DETACH)  # what a gateway publishes for a bound device
DEVICE_RECEIVES = (CONFIG, COMMANDS)  # what a device (or a gateway for an attached device) may subscribe to
TOPIC_KINDS = (EVENTS, STATE, CONFIG, COMMANDS, ATTACH, DETACH, ERRORS)


def device_topic(device_id: str, kind: str, sub_folder: str = "") -> str:
    """``/devices/{device_id}/{kind}[/{sub_folder}]``; a subfolder only for events and commands."""
    if kind not in TOPIC_KINDS:
        raise ValueError(f"unknown topic kind {kind!r}; known: {list(TOPIC_KINDS)}")
    if sub_folder and kind not in (EVENTS, COMMANDS):
        raise ValueError(f"{kind} topics have no subfolder")
    return f"/devices/{device_id}/{kind}" + (f"/{sub_folder}" if sub_folder else "")


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """``(device_id, kind, sub_folder)`` of a topic of the layout above; None for any other topic. The device id
    is not validated here (the registry's rule is the caller's)."""
    parts = topic.split("/", 4)
    if len(parts) < 4 or parts[0] != "" or parts[1] != "devices" or not parts[2]:
        return None
    kind = parts[3]
    if len(parts) == 5:
        return (parts[2], kind, parts[4]) if kind in (EVENTS, COMMANDS) and parts[4] else None
    return (parts[2], kind, "") if kind in TOPIC_KINDS else None


# Inside a broker host only (never a device's topic): the front republishes what a gateway publishes for an attached
# device under ``iotbridge/gateway/{gateway_id}/devices/{device_id}/{events|state}[/{sub}]``, so that the bridge
# service learns the gateway (the ``gatewayId`` attribute) from the topic, as it learns the device.
GATEWAY_RELAY_PREFIX = "iotbridge/gateway"


def relayed_topic(gateway_id: str, device_id: str, kind: str, sub_folder: str = "") -> str:
    return f"{GATEWAY_RELAY_PREFIX}/{gateway_id}{device_topic(device_id, kind, sub_folder)}"


def parse_relayed_topic(topic: str) -> tuple[str, str, str, str] | None:
    """``(gateway_id, device_id, kind, sub_folder)`` of a relayed topic; None for any other topic."""
    head = GATEWAY_RELAY_PREFIX + "/"
    if not topic.startswith(head):
        return None
    gateway_id, sep, rest = topic[len(head):].partition("/")
    parsed = parse_device_topic("/" + rest) if sep and gateway_id else None
    return (gateway_id, *parsed) if parsed is not None else None


def valid_sub_folder(sub_folder: str) -> bool:
    """A subfolder a topic may carry: no MQTT wildcard, no NUL, no empty level at either end ("" is no subfolder)."""
    return not any(c in sub_folder for c in "+#\x00") and not sub_folder.startswith("/") and not sub_folder.endswith(
        "/")


# ----------------------------------------------------------------------------------------- payloads

# How the pipeline reads a device's message. Devices keep their firmware: a registry, or one subfolder of it,
# names the profiles its payloads may follow, tried in order; the first that reads a message writes the row.
PROFILE_NAMES = ("telemetry-v1", "json", "raw")
TIME_UNITS = ("auto", "s", "ms", "us", "rfc3339")
_DECODER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_PROFILE_REGISTRY_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}")


class ProfileError(ValueError):
    """A payload-profile description is invalid; the message names the entry at fault."""


@dataclass(frozen=True)
class Profile:
    """One entry of a profile list.

    ``telemetry-v1``: ``{ts, metrics, seq}``. ``json``: any JSON object, numeric leaves as metrics named by their
    path; event time from ``time_field`` (a dotted path) or, without one, the Pub/Sub publish time. ``raw``: the
    bytes as they came; with ``decoder`` (``module:function``, importable on the workers) the bytes are decoded to
    a JSON-shaped dict that is then read as ``json`` reads an object.
    """

    name: Literal["telemetry-v1", "json", "raw"]
    time_field: str | None = None
    time_unit: Literal["auto", "s", "ms", "us", "rfc3339"] = "auto"
    decoder: str | None = None

    def to_json(self) -> str | dict[str, str]:
        extra = {k: v for k, v in (("time_field", self.time_field), ("decoder", self.decoder)) if v}
        if self.time_unit != "auto":
            extra["time_unit"] = self.time_unit
        return {"profile": self.name, **extra} if extra else self.name


DEFAULT_PROFILES: tuple[Profile, ...] = (Profile("telemetry-v1"), Profile("json"))


@dataclass(frozen=True)
class PayloadProfiles:
    """The profile lists of a stack: a default, per registry, and per ``registry/subfolder`` (most specific wins)."""

    default: tuple[Profile, ...] = DEFAULT_PROFILES
    registries: tuple[tuple[str, tuple[Profile, ...]], ...] = ()
    subfolders: tuple[tuple[str, tuple[Profile, ...]], ...] = ()  # key "registry/subfolder"

    def for_message(self, registry_id: str | None, sub_folder: str | None) -> tuple[Profile, ...]:
        if registry_id and sub_folder:
            for key, profiles in self.subfolders:
                if key == f"{registry_id}/{sub_folder}":
                    return profiles
        for key, profiles in self.registries:
            if key == registry_id:
                return profiles
        return self.default

    def all(self) -> list[Profile]:
        listed = [*self.registries, *self.subfolders]
        return [*self.default, *(p for _, ps in listed for p in ps)]

    def to_json(self) -> str:
        """Canonical JSON text: what the pipeline flag carries."""
        doc: dict[str, object] = {"default": [p.to_json() for p in self.default]}
        if self.registries:
            doc["registries"] = {k: [p.to_json() for p in ps] for k, ps in self.registries}
        if self.subfolders:
            doc["subfolders"] = {k: [p.to_json() for p in ps] for k, ps in self.subfolders}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _profile(value: object, where: str) -> Profile:
    if isinstance(value, str):
        value = {"profile": value}
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: a profile is a name or an object with \"profile\"")
    unknown = sorted(set(value) - {"profile", "time_field", "time_unit", "decoder"})
    if unknown:
        raise ProfileError(f"{where}: unknown keys {unknown}; allowed: profile, time_field, time_unit, decoder")
    name = value.get("profile")
    if name not in PROFILE_NAMES:
        raise ProfileError(f"{where}: profile {name!r} is not one of {', '.join(PROFILE_NAMES)}")
    time_field, unit, decoder = value.get("time_field"), value.get("time_unit", "auto"), value.get("decoder")
    if name == "telemetry-v1" and len(value) > 1:
        raise ProfileError(f"{where}: telemetry-v1 takes no options (its time is always ts)")
    if time_field is not None and (not isinstance(time_field, str) or not time_field or
                                   any(not part for part in time_field.split("."))):
        raise ProfileError(f"{where}: time_field must be a dotted path such as \"meta.sampled_at\"")
    if unit not in TIME_UNITS:
        raise ProfileError(f"{where}: time_unit {unit!r} is not one of {', '.join(TIME_UNITS)}")
    if unit != "auto" and time_field is None:
        raise ProfileError(f"{where}: time_unit needs a time_field")
    if decoder is not None:
        if name != "raw":
            raise ProfileError(f"{where}: only the raw profile takes a decoder")
        if not isinstance(decoder, str) or not _DECODER_RE.fullmatch(decoder):
            raise ProfileError(f"{where}: decoder {decoder!r} is not an import path module:function")
    if name == "raw" and decoder is None and time_field is not None:
        raise ProfileError(f"{where}: a raw profile reads a time_field only through its decoder")
    return Profile(name, time_field, unit, decoder)


def _profile_list(value: object, where: str) -> tuple[Profile, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{where}: must be a non-empty list of profiles")
    profiles = tuple(_profile(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len({p.name for p in profiles}) != len(profiles):
        raise ProfileError(f"{where}: a profile appears twice")
    return profiles


def _json_object(text: str, error: type[ValueError], shape: str) -> dict[str, object]:
    """A stack-config value that must be a JSON object (empty text: ``{}``); ``error`` says what is wrong."""
    try:
        doc = json.loads(text or "{}")
    except ValueError as exc:
        raise error(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise error(f"must be a JSON object {shape}")
    return doc


def parse_payload_profiles(text: str) -> PayloadProfiles:
    """Parse the JSON description; :class:`ProfileError` names the entry at fault::

        {"default": ["telemetry-v1", "json"],
         "registries": {"plant": [{"profile": "json", "time_field": "meta.sampled_at"}]},
         "subfolders": {"plant/vibration": [{"profile": "raw", "decoder": "decoders.vibration:decode"}]}}
    """
    doc = _json_object(text, ProfileError, "with default, registries and/or subfolders")
    unknown = sorted(set(doc) - {"default", "registries", "subfolders"})
    if unknown:
        raise ProfileError(f"unknown keys {unknown}; allowed: default, registries, subfolders")
    default = _profile_list(doc["default"], "default") if "default" in doc else DEFAULT_PROFILES
    sections: dict[str, list[tuple[str, tuple[Profile, ...]]]] = {"registries": [], "subfolders": []}
    for section, out in sections.items():
        entries = doc.get(section, {})
        if not isinstance(entries, dict):
            raise ProfileError(f"{section}: must be an object keyed by "
                               + ("registry id" if section == "registries" else "registry/subfolder"))
        for key, value in sorted(entries.items()):
            registry, slash, sub = key.partition("/")
            if not _PROFILE_REGISTRY_RE.fullmatch(registry) or (section == "subfolders") != bool(slash and sub):
                raise ProfileError(f"{section}: {key!r} is not "
                                   + ("a registry id" if section == "registries" else "registry/subfolder"))
            out.append((key, _profile_list(value, f"{section}.{key}")))
    return PayloadProfiles(default, tuple(sections["registries"]), tuple(sections["subfolders"]))


# ------------------------------------------------------------------------------------ threshold rules

# The pipeline's threshold rules (stack config ``pipelineThresholdRules``, pipeline flag ``--threshold_rules``): a
# JSON object keyed by metric name, each rule ``{"above": N and/or "below": N, "config": {...}}``. The stack's
# config, the Pulumi component and the pipeline all check them with :func:`parse_threshold_rules`, so a rule set
# ``pulumi preview`` accepts is one the pipeline launches with.
RULE_KEYS = ("above", "below", "config")
MAX_RULE_METRIC = 128  # a metric name is 1..128 characters (docs/messages.md): a longer one could never fire


class RuleError(ValueError):
    """A threshold-rule set is invalid; the message names the metric and the key at fault."""


@dataclass(frozen=True)
class ThresholdRule:
    """One rule: a reading of ``metric`` strictly above ``above`` or below ``below`` requests ``config``."""

    metric: str
    config: dict[str, object]
    above: float | None = None
    below: float | None = None

    def breached(self, value: float) -> bool:
        return (self.above is not None and value > self.above) or (self.below is not None and value < self.below)

    def describe(self) -> str:
        parts = [f"{self.metric}>{self.above:g}" if self.above is not None else "",
                 f"{self.metric}<{self.below:g}" if self.below is not None else ""]
        return "|".join(p for p in parts if p)


def _rule_limit(metric: str, rule: dict[str, object], key: str) -> float | None:
    v = rule.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RuleError(f"{metric}.{key} must be a finite number, got {v!r}")
    return float(v)


def parse_threshold_rules(text: str) -> tuple[ThresholdRule, ...]:
    """The rules of a JSON rule set, sorted by metric; :class:`RuleError` names the metric and key at fault."""
    doc = _json_object(text, RuleError, "keyed by metric name")
    rules = []
    for metric, rule in sorted(doc.items()):
        if not 1 <= len(metric) <= MAX_RULE_METRIC:
            raise RuleError(f"metric name {metric[:64]!r} must have 1..{MAX_RULE_METRIC} characters")
        if not isinstance(rule, dict):
            raise RuleError(f"{metric} must be an object with above/below and config")
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise RuleError(f"{metric} has unknown keys {unknown}; allowed: {', '.join(RULE_KEYS)}")
        above, below = _rule_limit(metric, rule, "above"), _rule_limit(metric, rule, "below")
        if above is None and below is None:
            raise RuleError(f"{metric} needs 'above' or 'below'")
        config = rule.get("config")
        if not isinstance(config, dict) or not config:
            raise RuleError(f"{metric}.config must be a non-empty JSON object")
        rules.append(ThresholdRule(metric, config, above, below))
    return tuple(rules)


# -------------------------------------------------------------------------------------------- BigQuery

FieldType = Literal["STRING", "BYTES", "INT64", "FLOAT64", "BOOL", "TIMESTAMP", "JSON", "RECORD"]


@dataclass(frozen=True)
class Column:
    name: str
    type: FieldType
    mode: Literal["NULLABLE", "REQUIRED", "REPEATED"] = "NULLABLE"
    description: str = ""
    fields: tuple[Column, ...] = ()

    def to_api(self) -> dict[str, object]:
        """The BigQuery REST/JSON schema form of this column."""
        out: dict[str, object] = {"name": self.name, "type": self.type, "mode": self.mode}
        if self.description:
            out["description"] = self.description
        if self.fields:
            out["fields"] = [f.to_api() for f in self.fields]
        return out


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    columns: tuple[Column, ...]
    partition_field: str | None = None
    clustering: tuple[str, ...] = ()

    def schema(self) -> list[dict[str, object]]:
        return [c.to_api() for c in self.columns]

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


_METRIC = Column("metrics", "RECORD", "REPEATED", "The payload's metrics, one entry per name.",
                 (Column("name", "STRING", "REQUIRED"), Column("value", "FLOAT64", "REQUIRED")))

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        TableSpec(
            "telemetry_raw",
            "One row per accepted telemetry message.",
            (
                Column("device_id", "STRING", "REQUIRED", "From the bridge's authenticated identity."),
                Column("device_num_id", "STRING"),
                Column("registry_id", "STRING"),
                Column("sub_folder", "STRING"),
                Column("event_time", "TIMESTAMP", "REQUIRED",
                       "From the payload (telemetry-v1 ts, a profile's time_field) or the publish time: "
                       "event_time_source says which."),
                Column("publish_time", "TIMESTAMP", "REQUIRED", "When Pub/Sub accepted the message."),
                Column("message_id", "STRING", "REQUIRED", "Pub/Sub message id."),
                Column("seq", "INT64", description="The device's message counter, if sent."),
                _METRIC,
                Column("extra", "STRING", description="Payload keys other than ts/metrics/seq, as JSON text."),
                # Nullable, appended: a deployed table takes the new columns as an in-place schema update.
                Column("labels", "RECORD", "REPEATED", "String leaves of a json payload, named by their path.",
                       (Column("name", "STRING", "REQUIRED"), Column("value", "STRING", "REQUIRED"))),
                Column("profile", "STRING", description="The payload profile that read the message: "
                                                        "telemetry-v1, json or raw."),
                Column("event_time_source", "STRING",
                       description="payload (the device's own time) or publish_time (Pub/Sub's)."),
                Column("payload", "BYTES", description="The message data as the device sent it."),
            ),
            partition_field="event_time",
            clustering=("device_id",),
        ),
        TableSpec(
            "telemetry_1m",
            "Per device, metric and 1-minute event-time window.",
            (
                Column("device_id", "STRING", "REQUIRED"),
                Column("metric", "STRING", "REQUIRED"),
                Column("window_start", "TIMESTAMP", "REQUIRED"),
                Column("window_end", "TIMESTAMP", "REQUIRED"),
                Column("count", "INT64", "REQUIRED"),
                Column("min", "FLOAT64", "REQUIRED"),
                Column("max", "FLOAT64", "REQUIRED"),
                Column("mean", "FLOAT64", "REQUIRED"),
                # Panes discard what they fired: a late firing adds a row; combine the rows of one window.
                Column("pane_timing", "STRING", description="ON_TIME or LATE: which firing wrote the row."),
            ),
            partition_field="window_start",
            clustering=("device_id", "metric"),
        ),
        TableSpec(
            "telemetry_errors",
            "Messages the pipeline could not accept, with the reason and the raw payload.",
            (
                Column("error", "STRING", "REQUIRED", "Reason class, e.g. invalid_json, missing_ts."),
                Column("detail", "STRING", description="Human-readable detail."),
                Column("payload", "BYTES", description="The raw message data, untouched."),
                Column("attributes", "STRING", description="The Pub/Sub attributes, as JSON text."),
                Column("publish_time", "TIMESTAMP"),
                Column("message_id", "STRING"),
                Column("device_id", "STRING"),
            ),
            partition_field="publish_time",
            clustering=("error",),
        ),
        TableSpec(
            # Written by a Pub/Sub BigQuery subscription with write_metadata: its fixed column set.
            "device_logs",
            "Device logs and edge-model inference results, written by a Pub/Sub BigQuery subscription.",
            (
                Column("subscription_name", "STRING"),
                Column("message_id", "STRING"),
                Column("publish_time", "TIMESTAMP"),
                Column("data", "STRING", description="The log record (JSON text)."),
                Column("attributes", "STRING", description="The Pub/Sub attributes, as JSON text."),
            ),
            partition_field="publish_time",
        ),
    )
}


@dataclass(frozen=True)
class ViewSpec:
    name: str
    description: str
    sql: str  # with {project} and {dataset} placeholders

    def render(self, project: str, dataset: str) -> str:
        return self.sql.format(project=project, dataset=dataset)


VIEWS: dict[str, ViewSpec] = {
    v.name: v
    for v in (
        ViewSpec(
            "device_latest",
            "Latest reading per device and metric (dashboard: fleet table).",
            # Ranked per device AND metric: a device that sends its metrics in separate messages keeps each one.
            """SELECT device_id, metric, value, event_time
FROM (
  SELECT t.device_id, m.name AS metric, m.value AS value, t.event_time,
         ROW_NUMBER() OVER (PARTITION BY t.device_id, m.name ORDER BY t.event_time DESC) AS rn
  FROM `{project}.{dataset}.telemetry_raw` AS t, UNNEST(t.metrics) AS m
)
WHERE rn = 1""",
        ),
        ViewSpec(
            "telemetry_hourly",
            "Hourly aggregates per device and metric (dashboard: trends).",
            """SELECT device_id, metric, TIMESTAMP_TRUNC(window_start, HOUR) AS hour,
       SUM(`count`) AS readings, MIN(`min`) AS min, MAX(`max`) AS max,
       SUM(mean * `count`) / SUM(`count`) AS mean
FROM `{project}.{dataset}.telemetry_1m`
GROUP BY device_id, metric, hour""",
        ),
        ViewSpec(
            "errors_hourly",
            "Rejected messages per hour and reason (dashboard: data quality).",
            """SELECT TIMESTAMP_TRUNC(publish_time, HOUR) AS hour, error, COUNT(*) AS messages
FROM `{project}.{dataset}.telemetry_errors`
GROUP BY hour, error""",
        ),
        # Edge model monitoring over the device-logs records of iotbridge.ml.runner. The device id is
        # the bridge's authenticated deviceId attribute, not what the payload claims.
        ViewSpec(
            "edge_model_hourly",
            "Edge-model inferences per device, hour and model version: inference rate, anomaly rate, mean score.",
            """SELECT JSON_VALUE(attributes, '$.deviceId') AS device_id,
       TIMESTAMP_TRUNC(publish_time, HOUR) AS hour,
       JSON_VALUE(data, '$.model_version') AS model_version,
       COUNT(*) AS inferences,
       COUNT(*) / 60 AS inferences_per_minute,
       COUNTIF(JSON_VALUE(data, '$.anomaly') = 'true') AS anomalies,
       SAFE_DIVIDE(COUNTIF(JSON_VALUE(data, '$.anomaly') = 'true'), COUNT(*)) AS anomaly_rate,
       AVG(SAFE_CAST(JSON_VALUE(data, '$.score') AS FLOAT64)) AS mean_score
FROM `{project}.{dataset}.device_logs`
WHERE JSON_VALUE(data, '$.kind') = 'inference'
GROUP BY device_id, hour, model_version""",
        ),
        ViewSpec(
            "edge_model_fleet",
            "Per device: the model version it last reported running, inferences and anomalies over 24 h, its "
            "last refused model and why (the last 30 days of device_logs; `iotctl models status`).",
            """WITH logs AS (
  SELECT JSON_VALUE(attributes, '$.deviceId') AS device_id, publish_time,
         JSON_VALUE(data, '$.kind') AS kind,
         JSON_VALUE(data, '$.model_version') AS model_version,
         JSON_VALUE(data, '$.requested_version') AS requested_version,
         JSON_VALUE(data, '$.reason') AS reason,
         JSON_VALUE(data, '$.anomaly') = 'true' AS anomaly
  FROM `{project}.{dataset}.device_logs`
  WHERE publish_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL 30 DAY)
    AND JSON_VALUE(data, '$.kind') IN ('inference', 'model_loaded', 'model_rejected')
),
latest AS (
  SELECT device_id, model_version, publish_time AS last_seen
  FROM logs
  WHERE device_id IS NOT NULL
  QUALIFY ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY publish_time DESC) = 1
),
refusals AS (
  SELECT device_id, requested_version AS last_rejected_version, reason AS last_rejected_reason,
         publish_time AS last_rejected_time
  FROM logs
  WHERE kind = 'model_rejected'
  QUALIFY ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY publish_time DESC) = 1
),
recent AS (
  SELECT device_id, COUNTIF(kind = 'inference') AS inferences_24h,
         COUNTIF(kind = 'inference' AND anomaly) AS anomalies_24h
  FROM logs
  WHERE publish_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL 24 HOUR)
  GROUP BY device_id
)
SELECT l.device_id, l.model_version, l.last_seen,
       IFNULL(r.inferences_24h, 0) AS inferences_24h, IFNULL(r.anomalies_24h, 0) AS anomalies_24h,
       SAFE_DIVIDE(r.anomalies_24h, r.inferences_24h) AS anomaly_rate_24h,
       f.last_rejected_version, f.last_rejected_reason, f.last_rejected_time
FROM latest AS l
LEFT JOIN recent AS r ON r.device_id = l.device_id
LEFT JOIN refusals AS f ON f.device_id = l.device_id""",
        ),
    )
}

# -------------------------------------------------------------------------------------------- Bigtable


@dataclass(frozen=True)
class BigtableSpec:
    table: str = "telemetry"
    # m: metric name -> value (8-byte big-endian double); a: Pub/Sub attributes, ids and the profile;
    # l: label name -> text (json strings); p: the payload of a raw-profile message, as it came.
    column_families: tuple[str, ...] = ("m", "a", "l", "p")
    row_key_doc: str = "{device_id}#{event_time_ms:013d}#{seq, h+payload hash, or m+message id}"
    extra: dict[str, str] = field(default_factory=dict)


BIGTABLE = BigtableSpec()


# Custom metrics a broker host writes every minute (on its gce_instance, labels registry_id and host), which the
# stack declares, alerts on and charts.
CONNECTED_DEVICES_METRIC = "custom.googleapis.com/iot/connected_devices"  # the front's live sessions
# How often a deployed broker host re-checks its connected devices against the registry (blocked, deleted,
# credentials): the longest a revoked device keeps its session.
CLOUD_RECHECK_INTERVAL_S = 30.0
# What the registry costs a broker host (iotbridge/bridge/regcache.py; the capacity planner counts with these):
# each re-check round reads, per registry the host serves and whatever its number of devices, the change query
# (billed one read even when nothing changed) and the registry's settings; a CONNECT the host's cache cannot serve
# reads the device once; a session writes its presence record at connect and removes it at disconnect; a device's
# PINGREQ is written as its lastHeartbeatTime at most every HEARTBEAT_RECORD_S (IoT Core's "may be stale by a few
# minutes").
RECHECK_READS_PER_ROUND = 2
CONNECT_READS = 1
PRESENCE_WRITES_PER_SESSION = 2
HEARTBEAT_RECORD_S = 300.0
BROKER_STORED_METRIC = "custom.googleapis.com/iot/broker_stored_messages"  # what Mosquitto holds
BROKER_DROPPED_METRIC = "custom.googleapis.com/iot/broker_dropped_messages"  # dropped over a queue bound, per minute
# Mosquitto's per-client queue bound (max_queued_messages): the bridge's persistent session fills during a Pub/Sub
# outage; the stack alerts at half of it.
BROKER_MAX_QUEUED_MESSAGES = 1_000_000
# Who authenticates devices on a broker host (the stack's brokerDeviceAuth, BridgeSettings.device_auth): "front",
# the TLS front (every feature), or "mosquitto", Mosquitto itself with the device plugin and the auth daemon
# (docs/broker-scaling.md, "Devices authenticated by Mosquitto").
DEVICE_AUTH_MODES = ("front", "mosquitto")


# ------------------------------------------------------------------------------- messages between the parts
# The config request (topic config-requests) and the fan-out message (topic device-commands), defined once here:
# every producer builds them and every consumer reads them with these functions (docs/messages.md).

CONFIG_REQUEST_FIELDS = ("device_id", "registry_id", "config", "binary_data", "version_to_update")
# IoT Core's camelCase names, accepted in a request too.
CONFIG_REQUEST_ALIASES = {"deviceId": "device_id", "registryId": "registry_id", "binaryData": "binary_data",
                          "versionToUpdate": "version_to_update"}
FANOUT_KIND_CONFIG = "config"
FANOUT_KIND_COMMAND = "command"


class MessageError(ValueError):
    """A config request or fan-out message that breaks its format; ``reason`` names the rule
    (docs/messages.md, the dead-letter reasons)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ConfigRequest:
    device_id: str
    data: bytes
    version_to_update: int = 0
    registry_id: str = ""  # empty: the deployment's own registry


def config_request(device_id: str, data: bytes, version_to_update: int = 0, registry_id: str = "") -> bytes:
    """A config request's body: the config's bytes as base64, so they reach the device byte-identical."""
    import base64

    body: dict[str, object] = {"device_id": device_id, "binary_data": base64.b64encode(bytes(data)).decode()}
    if registry_id:
        body["registry_id"] = registry_id
    if version_to_update:
        body["version_to_update"] = int(version_to_update)
    return json.dumps(body, separators=(",", ":")).encode()


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Python accepts them, devices' parsers do not


def parse_config_request(raw: bytes) -> ConfigRequest:
    """The request in a config-requests message, or :class:`MessageError`. ``config`` (a JSON object) is stored as
    compact JSON; ``binary_data`` (base64) is stored as the bytes it encodes, untouched. The device id is not
    checked here (the registry does)."""
    import base64
    import binascii

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError("malformed_json", f"request is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError("not_an_object", f"request must be a JSON object, got {type(obj).__name__}")
    req: dict[str, object] = {}
    for key, value in obj.items():
        name = CONFIG_REQUEST_ALIASES.get(key, key)
        if name not in CONFIG_REQUEST_FIELDS:
            raise MessageError("invalid_request", f"unknown field {key!r}; allowed: {sorted(CONFIG_REQUEST_FIELDS)}")
        if name in req:
            raise MessageError("invalid_request", f"field {name!r} given twice")
        req[name] = value
    device_id = req.get("device_id")
    if device_id is None:
        raise MessageError("invalid_request", "device_id is required")
    if not isinstance(device_id, str):
        raise MessageError("invalid_device_id", f"device_id must be a string, got {type(device_id).__name__}")
    registry_id = req.get("registry_id", "")
    if not isinstance(registry_id, str):
        raise MessageError("invalid_request", "registry_id must be a string")
    if ("config" in req) == ("binary_data" in req):
        raise MessageError("invalid_request", "give exactly one of config (a JSON object) or binary_data (base64)")
    if "config" in req:
        if not isinstance(req["config"], dict):
            raise MessageError("not_an_object", f"config must be a JSON object, got {type(req['config']).__name__}")
        data = json.dumps(req["config"], separators=(",", ":"), ensure_ascii=False).encode()
    else:
        if not isinstance(req["binary_data"], str):
            raise MessageError("invalid_request", "binary_data must be a base64 string")
        try:
            data = base64.b64decode(req["binary_data"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MessageError("invalid_request", f"binary_data is not base64: {exc}") from None
    version = req.get("version_to_update", 0)
    # IoT Core's JSON carried int64 as a string; bool is an int in Python and means nothing here.
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise MessageError("invalid_request", f"version_to_update must be a non-negative integer, got {version!r}")
    return ConfigRequest(device_id=device_id, data=data, version_to_update=version, registry_id=registry_id)


@dataclass(frozen=True)
class FanoutMessage:
    """A config version or a command on its way to whichever broker host the device is connected to: ``data`` is
    the payload, byte for byte; the rest travels as attributes."""

    kind: str  # FANOUT_KIND_CONFIG | FANOUT_KIND_COMMAND
    device_id: str
    version: int = 0  # configs
    sub_folder: str = ""  # commands
    registry_id: str = ""  # empty: the deployment's own registry
    host_id: str = ""  # the broker host holding the device (its presence); each host's subscription filters on it

    def attributes(self) -> dict[str, str]:
        attrs = {"kind": self.kind, "deviceId": self.device_id}
        if self.host_id:
            attrs[FANOUT_HOST_ATTRIBUTE] = validate_host_id(self.host_id)
        if self.kind == FANOUT_KIND_CONFIG:
            attrs["version"] = str(self.version)
        elif self.sub_folder:
            attrs["subFolder"] = self.sub_folder
        if self.registry_id:
            attrs["registryId"] = self.registry_id
        return attrs

    @classmethod
    def from_attributes(cls, attrs: dict[str, str]) -> FanoutMessage:
        """MessageError for an unknown kind, a version that is not a number, or a device id or subfolder that
        could widen an MQTT topic (attributes become topic levels)."""
        kind, device_id = attrs.get("kind", ""), attrs.get("deviceId", "")
        if kind not in (FANOUT_KIND_CONFIG, FANOUT_KIND_COMMAND):
            raise MessageError("unknown_kind", f"fan-out message of unknown kind {kind!r}")
        sub_folder = attrs.get("subFolder", "")
        if not FANOUT_DEVICE_ID_RE.fullmatch(device_id) or any(c in sub_folder for c in "+#\x00"):
            raise MessageError("invalid_target", "invalid deviceId/subFolder")
        version = attrs.get("version", "0")
        if not version.isdigit():
            raise MessageError("invalid_version", f"version {version!r} is not a number")
        return cls(kind, device_id, int(version), sub_folder, attrs.get("registryId", ""),
                   attrs.get(FANOUT_HOST_ATTRIBUTE, ""))


# Targeted delivery: a fan-out message names the host that holds the device in this attribute, and each host's
# delivery subscription is created with a Pub/Sub filter on it (docs/messages.md).
FANOUT_HOST_ATTRIBUTE = "hostId"
# A host id becomes part of a subscription name ("{prefix}-device-commands-{host}": letters, digits and
# "-_.~+%", at most 255 characters, starting with a letter) and a quoted string of a filter: no quote, backslash
# or space can occur in it, so the filter needs no escaping. A Compute Engine instance name (the cloud's host id)
# is 1-63 lowercase letters, digits and dashes, starting with a letter.
HOST_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~+%-]{0,62}")
# Pub/Sub's limit of a subscription filter's length, in bytes.
MAX_FILTER_BYTES = 256


def validate_host_id(host_id: str) -> str:
    if not HOST_ID_RE.fullmatch(host_id):
        raise MessageError("invalid_host", f"broker host id {host_id!r} must match {HOST_ID_RE.pattern}")
    return host_id


def host_filter(host_id: str) -> str:
    """The Pub/Sub filter of a host's delivery subscription: only the messages published for that host."""
    text = f'attributes.{FANOUT_HOST_ATTRIBUTE} = "{validate_host_id(host_id)}"'
    if len(text.encode()) > MAX_FILTER_BYTES:  # cannot happen with HOST_ID_RE's 63 characters; kept as the rule
        raise MessageError("invalid_host", f"filter {text!r} is longer than {MAX_FILTER_BYTES} bytes")
    return text


# The registry's device id rule (iotbridge.registry.DEVICE_ID_RE), repeated here because this module imports nothing.
FANOUT_DEVICE_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}")

"""The stack's configuration: the one reader of ``pulumi.Config`` in this program.

``load()`` reads every key this project knows, validates it with pydantic and returns one frozen
``StackConfig``. It runs before any resource is declared, so a bad value fails ``pulumi preview`` at once with a
single line naming the key and what is allowed, e.g.::

    config gcp-iot-bridge:bigtableMaxNodes=0: must be >= 1; allowed: an integer 1..1000, >= bigtableMinNodes ...

Keys live in the project namespace (``gcp-iot-bridge:``) except the provider's own ``gcp:project`` and
``gcp:region``. ``Pulumi.yaml`` declares the same keys with their types and defaults; a test keeps the two in step.
To add a key: add a ``Key`` to ``KEYS``, a field to ``StackConfig`` (same default), and the schema entry in
``Pulumi.yaml``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pulumi
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iotbridge import spec
from iotbridge.planning import host_sizing

PROJECT = "gcp-iot-bridge"

# Public GCP regions. A typo such as "us-central" or "europe-west" must fail
# here, not 10 minutes into `pulumi up` with a 400 from the first regional API.
GCP_REGIONS: frozenset[str] = frozenset({
    "africa-south1",
    "asia-east1", "asia-east2",
    "asia-northeast1", "asia-northeast2", "asia-northeast3",
    "asia-south1", "asia-south2",
    "asia-southeast1", "asia-southeast2",
    "australia-southeast1", "australia-southeast2",
    "europe-central2", "europe-north1", "europe-north2", "europe-southwest1",
    "europe-west1", "europe-west2", "europe-west3", "europe-west4", "europe-west6", "europe-west8",
    "europe-west9", "europe-west10", "europe-west12",
    "me-central1", "me-central2", "me-west1",
    "northamerica-northeast1", "northamerica-northeast2", "northamerica-south1",
    "southamerica-east1", "southamerica-west1",
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1",
    "us-west1", "us-west2", "us-west3", "us-west4",
})
BIGQUERY_MULTI_REGIONS = frozenset({"US", "EU"})

# Physical names are "{prefix}-{suffix}". The tightest fit is the model signer's service account id,
# "{prefix}-models-signer": with the longest prefix (16) it is exactly the 30 characters service account ids allow.
# tests/infra/test_api_schema.py builds the whole program at the longest and the shortest prefix and project id
# these patterns accept, and holds every name against its API's rules.
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{1,14}[a-z0-9]$")
_PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
_REGISTRY_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}$")
_MEMBER_RE = re.compile(r"^(user|group|serviceAccount|domain):[^\s:]+$")
# Who may call the admin API: the members iotbridge/admin/auth.py can match a verified caller against. It cannot
# resolve a group (that needs the Cloud Identity Groups API and a Workspace role), so group: is refused here.
_ADMIN_MEMBER_RE = re.compile(r"^(?:(user|serviceAccount):[^\s:@,]+@[^\s:@,]+|domain:[^\s:@,]+)$")
_ZONE_RE = re.compile(r"^(?P<region>[a-z]+-[a-z]+\d+)-(?P<zone>[a-z])$")
# A CryptoKey's full resource name, as Cloud KMS and every CMEK field take it (the project part as _PROJECT_RE).
_KMS_KEY_RE = re.compile(r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/locations/(?P<location>[a-z0-9-]+)"
                         r"/keyRings/[A-Za-z0-9_-]{1,63}/cryptoKeys/[A-Za-z0-9_-]{1,63}$")


# The pipeline reads telemetry-v1, then any JSON object (iotbridge.spec.DEFAULT_PROFILES).
DEFAULT_PAYLOAD_PROFILES = spec.PayloadProfiles().to_json()


class ConfigError(pulumi.RunError):
    """Invalid stack configuration. A ``RunError`` so that Pulumi prints the one line, not a traceback."""


Kind = Literal["string", "integer", "boolean", "array"]


@dataclass(frozen=True)
class Key:
    key: str  # the full config key, e.g. "gcp-iot-bridge:bigtableMaxNodes"
    field: str  # the StackConfig field
    kind: Kind  # the Pulumi.yaml schema type
    allowed: str  # what the one-line error tells the operator
    required: bool = False
    deprecated: str = ""  # what to set instead; a deprecated key has no default and warns when set


MAX_BROKER_HOSTS = host_sizing.MAX_HOSTS  # a regional managed instance group's limit


def _p(name: str) -> str:
    return f"{PROJECT}:{name}"


KEYS: tuple[Key, ...] = (
    Key("gcp:project", "project", "string", "a GCP project id (6-30 chars: lowercase letters, digits, hyphens)",
        required=True),
    Key("gcp:region", "region", "string", "a GCP region, e.g. us-central1, europe-west1", required=True),
    Key(_p("prefix"), "prefix", "string",
        "3-16 chars: lowercase letter first, then lowercase letters, digits, hyphens (e.g. iot-dev)", required=True),
    Key(_p("deletionProtection"), "deletion_protection", "boolean",
        "true (protect data: prod) or false (one `pulumi destroy` removes everything: dev, demo)", required=True),
    Key(_p("labels"), "labels", "array", 'a list of "key=value" GCP labels (lowercase letters, digits, _ and -)'),
    Key(_p("pubsubMessageRetentionSeconds"), "pubsub_message_retention_seconds", "integer",
        "an integer 600..2678400 (10 minutes to 31 days)"),
    Key(_p("pubsubMaxDeliveryAttempts"), "pubsub_max_delivery_attempts", "integer", "an integer 5..100"),
    Key(_p("bigqueryDataset"), "bigquery_dataset", "string", "letters, digits and underscores (e.g. iot)"),
    Key(_p("bigqueryLocation"), "bigquery_location", "string", "US, EU or a GCP region", required=True),
    Key(_p("bigqueryTableExpirationDays"), "bigquery_table_expiration_days", "integer",
        "0 (keep data) or days 1..3650 after which table data expires"),
    Key(_p("bigtableZones"), "bigtable_zones", "array",
        "1-4 distinct zones of the stack's region, e.g. [us-central1-b]", required=True),
    Key(_p("bigtableStorageType"), "bigtable_storage_type", "string", "SSD or HDD"),
    Key(_p("bigtableMinNodes"), "bigtable_min_nodes", "integer", "an integer 1..1000"),
    Key(_p("bigtableMaxNodes"), "bigtable_max_nodes", "integer",
        "an integer 1..1000, >= bigtableMinNodes and <= 10 x bigtableMinNodes"),
    Key(_p("bigtableCpuTarget"), "bigtable_cpu_target", "integer", "an integer 10..80 (percent CPU)"),
    Key(_p("bigtableGcMaxAgeDays"), "bigtable_gc_max_age_days", "integer", "an integer 1..3650 (days)"),
    Key(_p("registryId"), "registry_id", "string",
        'a device registry id ([a-zA-Z][a-zA-Z0-9_.~%-]{2,254}); empty: {prefix}-registry'),
    Key(_p("brokerMinHosts"), "broker_min_hosts", "integer",
        f"an integer 1..{MAX_BROKER_HOSTS} (the fewest broker hosts the autoscaler keeps)"),
    Key(_p("brokerMaxHosts"), "broker_max_hosts", "integer",
        f"an integer 1..{MAX_BROKER_HOSTS}, >= brokerMinHosts (the most broker hosts the autoscaler starts; "
        f"a regional managed instance group holds up to {MAX_BROKER_HOSTS})"),
    Key(_p("brokerHosts"), "broker_hosts", "integer", f"an integer 1..{MAX_BROKER_HOSTS}",
        deprecated="brokerMinHosts and brokerMaxHosts"),
    Key(_p("brokerMachineType"), "broker_machine_type", "string",
        f"a Compute Engine machine type of a known size: {host_sizing.known_machine_types()}"),
    Key(_p("brokerDeviceSourceRanges"), "broker_device_source_ranges", "array",
        'a list of CIDR ranges devices connect from'),
    Key(_p("brokerDeviceAuth"), "broker_device_auth", "string",
        "front (the TLS front authenticates devices: every feature) or mosquitto (Mosquitto with the device plugin "
        "and the auth daemon: less CPU and memory per connection; no gateways, HTTP bridge or client certificates)"),
    Key(_p("pipelineThresholdRules"), "pipeline_threshold_rules", "string",
        'a JSON object: metric -> {"above"/"below": N, "config": {...}}'),
    Key(_p("pipelinePayloadProfiles"), "pipeline_payload_profiles", "string",
        'a JSON object: {"default": [...], "registries": {"REGISTRY": [...]}, "subfolders": {"REGISTRY/SUB": [...]}} '
        'of profiles telemetry-v1, json, raw (a name or {"profile", "time_field", "time_unit", "decoder"})'),
    Key(_p("pipelineMaxWorkers"), "pipeline_max_workers", "integer", 'an integer 1..1000'),
    Key(_p("pipelineMachineType"), "pipeline_machine_type", "string", 'a Compute Engine machine type'),
    Key(_p("pipelineImage"), "pipeline_image", "string",
        'an image reference; empty: build and push the Flex Template image'),
    Key(_p("workbenchEnabled"), "workbench_enabled", "boolean", 'true or false'),
    Key(_p("workbenchZone"), "workbench_zone", "string", 'a zone in gcp:region (required when workbenchEnabled)'),
    Key(_p("workbenchIdleTimeoutMinutes"), "workbench_idle_timeout_minutes", "integer",
        'an integer 10..1440 (minutes)'),
    Key(_p("workbenchUsers"), "workbench_users", "array", 'IAM members (user:, group:, serviceAccount:, domain:)'),
    Key(_p("edgeMlTrain"), "edge_ml_train", "boolean", 'true or false (KMEANS fails on an empty telemetry_raw)'),
    Key(_p("edgeMlModelVersion"), "edge_ml_model_version", "string", "letters, digits, '.', '_', '-' (up to 63)"),
    Key(_p("edgeMlSigners"), "edge_ml_signers", "array", 'IAM members allowed to mint signed URLs for model artifacts'),
    Key(_p("alertEmail"), "alert_email", "string", 'an email address, or empty for no notification channel'),
    Key(_p("adminApiReaders"), "admin_api_readers", "array",
        "IAM members who may call the admin API's read methods (user:EMAIL, serviceAccount:EMAIL, domain:DOMAIN; "
        "not group:)"),
    Key(_p("adminApiWriters"), "admin_api_writers", "array",
        "IAM members who may call every admin API method (user:EMAIL, serviceAccount:EMAIL, domain:DOMAIN; "
        "not group:)"),
    Key(_p("adminApiMinInstances"), "admin_api_min_instances", "integer", "an integer 0..100 (0: scale to zero)"),
    Key(_p("adminApiMaxInstances"), "admin_api_max_instances", "integer",
        "an integer 1..100, >= adminApiMinInstances"),
    Key(_p("adminApiImage"), "admin_api_image", "string",
        "an image reference; empty: build and push the admin API image"),
    Key(_p("adminApiPublicAccess"), "admin_api_public_access", "string",
        "allUsers (grant roles/run.invoker to allUsers) or invokerIamDisabled (for organizations whose policy "
        "refuses allUsers)"),
    Key(_p("kmsKeyName"), "kms_key_name", "string",
        "empty (Google-managed keys) or projects/P/locations/L/keyRings/R/cryptoKeys/K with L = gcp:region "
        "(and bigqueryLocation = gcp:region)"),
)
KEY_BY_FIELD: dict[str, Key] = {k.field: k for k in KEYS}
KEY_BY_NAME: dict[str, Key] = {k.key: k for k in KEYS}


class StackConfig(BaseModel):
    """One stack's validated configuration. Components receive pieces of it through their ``*Args``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    stack: str
    project: str
    region: str
    prefix: str
    deletion_protection: bool
    labels: dict[str, str] = Field(default_factory=dict)
    pubsub_message_retention_seconds: int = Field(default=604800, ge=600, le=2678400)
    pubsub_max_delivery_attempts: int = Field(default=5, ge=5, le=100)
    bigquery_dataset: str = "iot"
    bigquery_location: str
    bigquery_table_expiration_days: int = Field(default=0, ge=0, le=3650)
    bigtable_zones: tuple[str, ...]
    bigtable_storage_type: Literal["SSD", "HDD"] = "SSD"
    bigtable_min_nodes: int = Field(default=1, ge=1, le=1000)
    bigtable_max_nodes: int = Field(default=3, ge=1, le=1000)
    bigtable_cpu_target: int = Field(default=60, ge=10, le=80)
    bigtable_gc_max_age_days: int = Field(default=30, ge=1, le=3650)
    registry_id: str = ""
    broker_min_hosts: int = Field(default=2, ge=1, le=MAX_BROKER_HOSTS)
    broker_max_hosts: int = Field(default=10, ge=1, le=MAX_BROKER_HOSTS)
    broker_hosts: int | None = Field(default=None, ge=1, le=MAX_BROKER_HOSTS)  # deprecated: parse() maps it
    broker_machine_type: str = "e2-standard-2"
    broker_device_source_ranges: tuple[str, ...] = ("0.0.0.0/0",)
    broker_device_auth: Literal["front", "mosquitto"] = "front"  # spec.DEVICE_AUTH_MODES
    pipeline_threshold_rules: str = "{}"
    pipeline_payload_profiles: str = DEFAULT_PAYLOAD_PROFILES
    pipeline_max_workers: int = Field(default=3, ge=1, le=1000)
    pipeline_machine_type: str = "n2-standard-2"
    pipeline_image: str = ""
    workbench_enabled: bool = False
    workbench_zone: str = ""
    workbench_idle_timeout_minutes: int = Field(default=60, ge=10, le=1440)
    workbench_users: tuple[str, ...] = ()
    edge_ml_train: bool = False
    edge_ml_model_version: str = "v1"
    edge_ml_signers: tuple[str, ...] = ()
    alert_email: str = ""
    admin_api_readers: tuple[str, ...] = ()
    admin_api_writers: tuple[str, ...] = ()
    admin_api_min_instances: int = Field(default=0, ge=0, le=100)
    admin_api_max_instances: int = Field(default=3, ge=1, le=100)
    admin_api_image: str = ""
    admin_api_public_access: Literal["allUsers", "invokerIamDisabled"] = "allUsers"
    kms_key_name: str = ""

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not _PROJECT_RE.match(v):
            raise ValueError("not a GCP project id")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if v not in GCP_REGIONS:
            close = difflib.get_close_matches(v, sorted(GCP_REGIONS), n=1)
            raise ValueError("not a GCP region" + (f" (did you mean {close[0]}?)" if close else ""))
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX_RE.match(v) or "--" in v:
            raise ValueError("not a valid name prefix")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} is not a valid GCP label key")
            if not _LABEL_VALUE_RE.match(value):
                raise ValueError(f"label value {value!r} is not a valid GCP label value")
        return v

    @field_validator("bigquery_dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not _DATASET_RE.match(v):
            raise ValueError("not a BigQuery dataset id")
        return v

    @field_validator("bigquery_location")
    @classmethod
    def _bq_location(cls, v: str) -> str:
        if v not in BIGQUERY_MULTI_REGIONS and v not in GCP_REGIONS:
            raise ValueError("not a BigQuery location")
        return v

    @field_validator("bigtable_zones")
    @classmethod
    def _zones(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not 1 <= len(v) <= 4:
            raise ValueError(f"{len(v)} zones given")
        if len(set(v)) != len(v):
            raise ValueError("zones repeat")
        for zone in v:
            if not _ZONE_RE.match(zone):
                raise ValueError(f"{zone!r} is not a zone")
        return v

    @field_validator("registry_id")
    @classmethod
    def _registry_id(cls, v: str) -> str:
        if v and not _REGISTRY_RE.match(v):
            raise ValueError("not a registry id")
        return v

    @field_validator("broker_machine_type")
    @classmethod
    def _broker_machine_type(cls, v: str) -> str:
        host_sizing.memory_mib(v)  # the hosts' limits are sized from its memory
        return v

    @field_validator("broker_device_source_ranges")
    @classmethod
    def _ranges(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("no range given: no device could connect")
        for cidr in v:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR range") from None
        return v

    @field_validator("pipeline_threshold_rules")
    @classmethod
    def _rules(cls, v: str) -> str:
        # The pipeline's own schema (iotbridge.spec): a rule set accepted here is one the pipeline launches with.
        try:
            spec.parse_threshold_rules(v)
        except spec.RuleError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("pipeline_payload_profiles")
    @classmethod
    def _payload_profiles(cls, v: str) -> str:
        try:
            spec.parse_payload_profiles(v)
        except spec.ProfileError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("workbench_zone")
    @classmethod
    def _wb_zone(cls, v: str) -> str:
        if v and not _ZONE_RE.match(v):
            raise ValueError(f"{v!r} is not a zone")
        return v

    @field_validator("workbench_users", "edge_ml_signers")
    @classmethod
    def _members(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for member in v:
            if not _MEMBER_RE.match(member):
                raise ValueError(f"{member!r} is not an IAM member (user:, group:, serviceAccount:, domain:)")
        return v

    @field_validator("admin_api_readers", "admin_api_writers")
    @classmethod
    def _admin_members(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for member in v:
            if member.startswith("group:"):
                raise ValueError(f"{member!r}: the admin API cannot resolve group membership; list its members or "
                                 "use domain:")
            if not _ADMIN_MEMBER_RE.match(member):
                raise ValueError(f"{member!r} is not user:EMAIL, serviceAccount:EMAIL or domain:DOMAIN")
        return v

    @field_validator("edge_ml_model_version")
    @classmethod
    def _model_version(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
            raise ValueError("not a model version name")
        return v

    @field_validator("alert_email")
    @classmethod
    def _email(cls, v: str) -> str:
        if v and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", v):
            raise ValueError("not an email address")
        return v

    @field_validator("kms_key_name")
    @classmethod
    def _kms_key(cls, v: str) -> str:
        if v and not _KMS_KEY_RE.match(v):
            raise ValueError("not a Cloud KMS CryptoKey name")
        return v

    # ----------------------------------------------------------------------------------- derived values
    @property
    def all_labels(self) -> dict[str, str]:
        """The operator's labels plus the ones that say where a resource came from."""
        return {**self.labels, "app": "gcp-iot-bridge", "stack": _label_value(self.stack), "managed-by": "pulumi"}

    @property
    def registry(self) -> str:
        """The device registry id: ``registryId``, or ``{prefix}-registry``."""
        return self.registry_id or f"{self.prefix}-registry"

    @property
    def bigtable_gc_max_age(self) -> str:
        """The GC max age as the duration the Bigtable GC policy takes (hours: Go duration syntax)."""
        return f"{self.bigtable_gc_max_age_days * 24}h"

    @property
    def kms_key_location(self) -> str | None:
        """The location of ``kmsKeyName`` (e.g. ``us-central1``), or None when the stack uses Google-managed keys."""
        found = _KMS_KEY_RE.match(self.kms_key_name)
        return found.group("location") if found else None


def _label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def _fail(key: Key, raw: object, why: str) -> ConfigError:
    shown = "" if raw is None else f"={raw}"
    return ConfigError(f"config {key.key}{shown}: {why}; allowed: {key.allowed}")


def _decode(key: Key, raw: str) -> object:
    """The typed value of one raw config string, as the Pulumi CLI passes it (YAML scalars as text, lists as JSON)."""
    if key.kind == "string":
        return raw
    if key.kind == "integer":
        try:
            return int(raw.strip())
        except ValueError:
            raise _fail(key, raw, "not an integer") from None
    if key.kind == "boolean":
        if raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise _fail(key, raw, "not a boolean")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise _fail(key, raw, "not a list") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(key, raw, "not a list of strings")
    if key.field == "labels":
        labels: dict[str, str] = {}
        for item in value:
            name, sep, val = item.partition("=")
            if not sep:
                raise _fail(key, raw, f"{item!r} is not key=value")
            labels[name] = val
        return labels
    return tuple(value)


def parse(raw: Mapping[str, str | None], stack: str) -> StackConfig:
    """Validate raw config values keyed by full config key (``gcp:region``, ``gcp-iot-bridge:prefix``).

    Unknown keys in the project namespace are refused, so a misspelt key cannot silently fall back to a default.
    """
    unknown = sorted(k for k in raw if k.startswith(f"{PROJECT}:") and k not in KEY_BY_NAME)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(KEY_BY_NAME), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"config {unknown[0]}: unknown key{hint}; allowed: "
                          + ", ".join(k.key for k in KEYS if k.key.startswith(PROJECT)))

    values: dict[str, object] = {"stack": stack}
    for key in KEYS:
        text = raw.get(key.key)
        if text is None or text == "":
            if key.required:
                raise _fail(key, None, "required but not set")
            continue
        values[key.field] = _decode(key, text)

    try:
        cfg = StackConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        key = KEY_BY_FIELD.get(field)
        if key is None:
            raise ConfigError(f"config: {err['msg']}") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise _fail(key, raw.get(key.key), msg) from None

    # Rules that join two keys.
    cfg = _broker_hosts(cfg, raw)
    if cfg.bigtable_max_nodes < cfg.bigtable_min_nodes:
        raise _fail(KEY_BY_FIELD["bigtable_max_nodes"], cfg.bigtable_max_nodes,
                    f"less than bigtableMinNodes={cfg.bigtable_min_nodes}")
    # Bigtable refuses an autoscaling range whose maximum is more than 10x its minimum.
    if cfg.bigtable_max_nodes > 10 * cfg.bigtable_min_nodes:
        raise _fail(KEY_BY_FIELD["bigtable_max_nodes"], cfg.bigtable_max_nodes,
                    f"more than 10 x bigtableMinNodes={cfg.bigtable_min_nodes}")
    if cfg.admin_api_max_instances < cfg.admin_api_min_instances:
        raise _fail(KEY_BY_FIELD["admin_api_max_instances"], cfg.admin_api_max_instances,
                    f"less than adminApiMinInstances={cfg.admin_api_min_instances}")
    if cfg.workbench_enabled and not cfg.workbench_zone:
        raise _fail(KEY_BY_FIELD["workbench_zone"], None, "required when workbenchEnabled is true")
    if cfg.workbench_zone and not cfg.workbench_zone.startswith(f"{cfg.region}-"):
        raise _fail(KEY_BY_FIELD["workbench_zone"], cfg.workbench_zone, f"not in gcp:region={cfg.region}")
    for zone in cfg.bigtable_zones:
        if not zone.startswith(f"{cfg.region}-"):
            raise _fail(KEY_BY_FIELD["bigtable_zones"], json.dumps(list(cfg.bigtable_zones)),
                        f"zone {zone} is not in gcp:region={cfg.region}")
    # One key serves every store, so it must sit where all of them are: Bigtable takes only a key in its clusters'
    # region, BigQuery only one in the dataset's location, Cloud Storage one in the bucket's location. A key
    # elsewhere fails `pulumi up` half-way, after some stores exist with it and others do not.
    if cfg.kms_key_location is not None:
        if cfg.kms_key_location != cfg.region:
            raise _fail(KEY_BY_FIELD["kms_key_name"], cfg.kms_key_name,
                        f"key location {cfg.kms_key_location} is not gcp:region={cfg.region}")
        if cfg.bigquery_location.lower() != cfg.region:
            raise _fail(KEY_BY_FIELD["kms_key_name"], cfg.kms_key_name,
                        f"bigqueryLocation={cfg.bigquery_location} is not gcp:region={cfg.region}, and the dataset "
                        "needs a key in its own location")
    return cfg


def _broker_hosts(cfg: StackConfig, raw: Mapping[str, str | None]) -> StackConfig:
    """The deprecated fixed host count read as equal bounds; the bounds checked against each other."""
    if cfg.broker_hosts is not None:
        # The Pulumi CLI passes Pulumi.yaml's defaults as if the stack set them: only a value other than the
        # default says the stack asked for bounds too.
        fields = StackConfig.model_fields
        given = [k.key for k in KEYS if k.field in ("broker_min_hosts", "broker_max_hosts")
                 and getattr(cfg, k.field) != fields[k.field].default]
        if given:
            raise _fail(KEY_BY_FIELD["broker_hosts"], cfg.broker_hosts,
                        f"deprecated, and {given[0]} is set too: remove brokerHosts")
        cfg = cfg.model_copy(update={"broker_min_hosts": cfg.broker_hosts, "broker_max_hosts": cfg.broker_hosts})
    if cfg.broker_max_hosts < cfg.broker_min_hosts:
        raise _fail(KEY_BY_FIELD["broker_max_hosts"], cfg.broker_max_hosts,
                    f"less than brokerMinHosts={cfg.broker_min_hosts}")
    return cfg


def deprecations(raw: Mapping[str, str | None]) -> list[str]:
    """One warning per deprecated key the stack sets, saying what to set instead."""
    return [f"config {k.key} is deprecated: set {k.deprecated} instead "
            f"({k.key}={raw[k.key]} is read as both set to {raw[k.key]})"
            for k in KEYS if k.deprecated and raw.get(k.key)]


def _raw_from_pulumi() -> dict[str, str | None]:
    raw: dict[str, str | None] = {}
    gcp = pulumi.Config("gcp")
    project = pulumi.Config(PROJECT)
    for key in KEYS:
        namespace, _, name = key.key.partition(":")
        raw[key.key] = (gcp if namespace == "gcp" else project).get(name)
    # Every project-namespace key the engine passed, so that parse() can refuse a misspelt one. The runtime keeps
    # them in a context variable (set by the language host) or in PULUMI_CONFIG; both are read.
    from pulumi.runtime import config as runtime_config

    for name in list(runtime_config.CONFIG.get()) + list(runtime_config.get_config_env()):
        if name.startswith(f"{PROJECT}:") and name not in raw:
            raw[name] = str(runtime_config.get_config(name))
    return raw


def load() -> StackConfig:
    """Read and validate this stack's config. Raises ``ConfigError`` (one line) before any resource exists."""
    raw = _raw_from_pulumi()
    for warning in deprecations(raw):
        pulumi.log.warn(warning)
    return parse(raw, pulumi.get_stack())

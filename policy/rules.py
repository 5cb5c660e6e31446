"""The guard rails of gcp-iot-bridge as plain functions, so that the policy pack and the tests share one truth.

A resource rule takes a ``Resource`` (type token, name, inputs in the engine's camelCase form) and the
``StackContext`` (what the stack's config asks for) and returns violation messages; an empty list passes.
A stack rule takes every resource at once. ``__main__.py`` wraps each in a CrossGuard policy; the tests run
them over the resources the program declares under mocks for dev, prod and demo, and over bad fixtures.

Values the engine cannot know during a preview (an output of a resource not yet created) arrive as ``UNKNOWN``;
a rule never fails on an unknown value, only on what is known to be wrong or missing.

This module imports nothing outside the standard library: the pack runs in its own virtualenv.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PROJECT = "gcp-iot-bridge"
UNKNOWN = "<unknown during preview>"

# The signature Pulumi's wire format puts on a secret value (sdk/go/common/resource/properties.go); mock inputs
# keep it, so a test can tell a Pulumi secret from a plain string.
_SIG_KEY = "4dabf18193072939515e22adb298388d"
_SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"

REQUIRED_LABELS = ("app", "stack")

# Google's health-check and network-load-balancer probe ranges: every probe comes from one of these.
HEALTH_CHECK_RANGES = tuple(ipaddress.ip_network(r) for r in (
    "35.191.0.0/16", "130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22"))
MQTT_TLS_PORT = "8883"
HTTP_BRIDGE_PORT = "8443"  # the HTTP device bridge, TLS like MQTT
DEVICE_PORTS = frozenset({MQTT_TLS_PORT, HTTP_BRIDGE_PORT})

BASIC_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})

# The one service that may be open to all at the Cloud Run level: the admin API, which verifies every request's
# token itself because Google's clients send access tokens that Cloud Run's invoker check refuses
# (gcp_iot_bridge/infra/admin_api.py). It is recognized by its name ("{prefix}-admin-api") AND by its container
# saying that it authenticates (ADMIN_AUTH=google): a service with that name that does not, or any other
# service, must stay internal and keep Cloud Run's invoker check.
CLOUD_RUN_SERVICE = "gcp:cloudrunv2/service:Service"
ADMIN_API_SUFFIX = "-admin-api"
ADMIN_API_AUTH = ("ADMIN_AUTH", "google")
RUN_INVOKER = "roles/run.invoker"

# Subscriptions that must not dead-letter: the audit subscription on the dead-letter topic itself
# (iotbridge.spec: dead_letter=False; a test keeps the two in step). A subscription a Dataflow job reads is exempt
# too, found from the job's parameters rather than by name (see subscription_dead_letter).
DEAD_LETTER_EXEMPT_SUFFIXES = ("-dead-letter-audit",)

DATAFLOW_JOB_TYPES = ("gcp:dataflow/job:Job", "gcp:dataflow/flexTemplateJob:FlexTemplateJob")
_SUBSCRIPTION_PATH = re.compile(r"^projects/[^/]+/subscriptions/([^/]+)$")

_DEFAULT_SA = re.compile(r"(^default$|^\d+-compute@developer\.gserviceaccount\.com$|@appspot\.gserviceaccount\.com$)")

_LABELABLE_FILE = pathlib.Path(__file__).resolve().parent / "labelable_types.json"


def _load_labelable() -> dict[str, str]:
    return dict(json.loads(_LABELABLE_FILE.read_text(encoding="utf-8"))["types"])


LABELABLE: dict[str, str] = _load_labelable()


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StackContext:
    """What the stack's config asks of its resources."""

    stack: str
    protect: bool
    kms_key_name: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], stack: str) -> StackContext:
        """From config keyed ``gcp-iot-bridge:deletionProtection`` (as a stack file or the engine has it).

        Values may be typed (a stack file read as YAML) or text (the engine's PULUMI_CONFIG).
        """
        def get(name: str) -> Any:
            return config.get(f"{PROJECT}:{name}")

        raw_protect = get("deletionProtection")
        if raw_protect is None:
            raise ValueError(f"{PROJECT}:deletionProtection is not set for stack {stack!r}")
        protect = raw_protect if isinstance(raw_protect, bool) else str(raw_protect).strip().lower() == "true"
        kms = get("kmsKeyName")
        return cls(stack=stack, protect=protect, kms_key_name=str(kms) if kms else None)


@dataclass(frozen=True)
class Resource:
    """One declared resource: its type token, logical name and inputs (camelCase, secrets unwrapped)."""

    type: str
    name: str
    props: Mapping[str, Any]
    provider_props: Mapping[str, Any] = field(default_factory=dict)
    secret_paths: frozenset[str] = frozenset()  # dotted paths of inputs that were Pulumi secrets

    @classmethod
    def from_inputs(cls, type_: str, name: str, inputs: Mapping[str, Any],
                    provider_props: Mapping[str, Any] | None = None) -> Resource:
        """From mock or engine inputs, remembering which values were secrets."""
        secrets: set[str] = set()
        props = _unwrap(inputs, "", secrets)
        return cls(type_, name, props, dict(provider_props or {}), frozenset(secrets))


def _unwrap(value: Any, path: str, secrets: set[str]) -> Any:
    if isinstance(value, Mapping):
        if value.get(_SIG_KEY) == _SECRET_SIG:
            secrets.add(path)
            return _unwrap(value.get("value"), path, secrets)
        return {k: _unwrap(v, f"{path}.{k}" if path else str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v, f"{path}[{i}]", secrets) for i, v in enumerate(value)]
    return value


def _get(props: Mapping[str, Any], path: str, default: Any = None) -> Any:
    cur: Any = props
    for part in path.split("."):
        if cur == UNKNOWN:
            return UNKNOWN
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _known(value: Any) -> bool:
    return value is not None and value != UNKNOWN


def _as_list(value: Any) -> list[Any]:
    if value is None or value == UNKNOWN:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


# ---------------------------------------------------------------------------------------------- rules

ResourceRule = Callable[[Resource, StackContext], list[str]]
StackRule = Callable[[Sequence[Resource], StackContext], list[str]]


def bucket_access(r: Resource, ctx: StackContext) -> list[str]:
    if r.type != "gcp:storage/bucket:Bucket":
        return []
    out = []
    uniform = r.props.get("uniformBucketLevelAccess")
    if uniform != UNKNOWN and not _truthy(uniform):
        out.append("bucket must set uniformBucketLevelAccess=true (no per-object ACLs)")
    pap = r.props.get("publicAccessPrevention")
    if pap != UNKNOWN and pap != "enforced":
        out.append(f"bucket must set publicAccessPrevention='enforced' (got {pap!r})")
    return out


def _iam_entries(r: Resource) -> list[tuple[str, str]]:
    """(role, member) pairs granted by an IAM member/binding/policy resource or a BigQuery dataset's accesses."""
    pairs: list[tuple[str, str]] = []
    if "iam" in r.type.split(":")[-1].lower():
        role = r.props.get("role")
        for member in _as_list(r.props.get("member")) + _as_list(r.props.get("members")):
            pairs.append((str(role), str(member)))
        policy = r.props.get("policyData")
        if isinstance(policy, str) and policy != UNKNOWN:
            try:
                bindings = json.loads(policy).get("bindings", [])
            except (ValueError, AttributeError):
                bindings = []
            for b in bindings:
                for member in b.get("members", []):
                    pairs.append((str(b.get("role")), str(member)))
    if r.type == "gcp:bigquery/dataset:Dataset":
        for access in _as_list(r.props.get("accesses")):
            if not isinstance(access, Mapping):
                continue
            for key in ("iamMember", "specialGroup"):
                if _known(access.get(key)):
                    pairs.append((str(access.get("role")), str(access[key])))
    return pairs


def _is_admin_api_invoker(r: Resource) -> bool:
    """An invoker grant on the admin API's Cloud Run service (by the service name the grant names)."""
    name = r.props.get("name")
    return r.type.startswith(("gcp:cloudrunv2/serviceIamMember:", "gcp:cloudrunv2/serviceIamBinding:")) \
        and isinstance(name, str) and name.endswith(ADMIN_API_SUFFIX)


def authenticating_admin_api(r: Resource) -> bool:
    """The admin API's service: named ``*-admin-api`` and every container verifying tokens itself."""
    name = r.props.get("name")
    if r.type != CLOUD_RUN_SERVICE or not isinstance(name, str) or not name.endswith(ADMIN_API_SUFFIX):
        return False
    containers = _as_list(_get(r.props, "template.containers"))
    key, want = ADMIN_API_AUTH
    return bool(containers) and all(
        isinstance(c, Mapping) and any(isinstance(e, Mapping) and e.get("name") == key and e.get("value") == want
                                       for e in _as_list(c.get("envs")))
        for c in containers)


def no_public_access(r: Resource, ctx: StackContext) -> list[str]:
    # The admin API's invoker is checked by public_cloud_run_authenticates, which sees the service it opens.
    return [f"{role} granted to {member}: nothing may be public"
            for role, member in _iam_entries(r) if member in PUBLIC_MEMBERS
            and not (role == RUN_INVOKER and _is_admin_api_invoker(r))]


def no_basic_roles(r: Resource, ctx: StackContext) -> list[str]:
    return [f"basic role {role} granted to {member}: grant a predefined role instead"
            for role, member in _iam_entries(r) if role in BASIC_ROLES]


def no_service_account_keys(r: Resource, ctx: StackContext) -> list[str]:
    if r.type == "gcp:serviceaccount/key:Key":
        return ["user-managed service-account key: use the attached service account (workload identity) instead"]
    return []


# Where each workload names the identity it runs as; (path, required).
WORKLOAD_IDENTITY: dict[str, tuple[tuple[str, bool], ...]] = {
    "gcp:dataflow/job:Job": (("serviceAccountEmail", True),),
    "gcp:dataflow/flexTemplateJob:FlexTemplateJob": (("serviceAccountEmail", True),),
    "gcp:cloudfunctionsv2/function:Function": (("serviceConfig.serviceAccountEmail", True),
                                               ("buildConfig.serviceAccount", False)),
    "gcp:cloudfunctions/function:Function": (("serviceAccountEmail", True),),
    "gcp:cloudrunv2/service:Service": (("template.serviceAccount", True),),
    "gcp:eventarc/trigger:Trigger": (("serviceAccount", True),),
    "gcp:compute/instance:Instance": (("serviceAccount.email", True),),
    "gcp:compute/instanceTemplate:InstanceTemplate": (("serviceAccount.email", True),),
    "gcp:compute/regionInstanceTemplate:RegionInstanceTemplate": (("serviceAccount.email", True),),
}


def _service_account_email(value: Any) -> str | None:
    if not _known(value):
        return None
    # A build service account is given as its full resource name.
    return str(value).rsplit("/", 1)[-1]


def dedicated_service_accounts(r: Resource, ctx: StackContext) -> list[str]:
    out = []
    for path, required in WORKLOAD_IDENTITY.get(r.type, ()):
        value = _get(r.props, path)
        if value == UNKNOWN:
            continue
        email = _service_account_email(value)
        if email is None or email == "":
            if required:
                out.append(f"{path} is not set: the workload would run as the default compute service account")
        elif _DEFAULT_SA.search(email):
            out.append(f"{path}={email} is a default service account: give the workload its own")
    return out


def service_accounts_not_shared(resources: Sequence[Resource], ctx: StackContext) -> list[str]:
    """One identity per workload kind: the pipeline, the function, its trigger and the broker hosts differ."""
    users: dict[str, set[str]] = {}
    for r in resources:
        for path, _ in WORKLOAD_IDENTITY.get(r.type, ()):
            email = _service_account_email(_get(r.props, path))
            if email:
                users.setdefault(email, set()).add(r.type.split(":")[-1] + "/" + path.split(".")[0])
    return [f"service account {email} is shared by {', '.join(sorted(kinds))}: one per workload"
            for email, kinds in sorted(users.items()) if len(kinds) > 1]


AUTOSCALER_TYPES = ("gcp:compute/regionAutoscaler:RegionAutoscaler", "gcp:compute/autoscaler:Autoscaler")
GROUP_TYPES = ("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager",
               "gcp:compute/instanceGroupManager:InstanceGroupManager")


def groups_autoscaled_in_production(resources: Sequence[Resource], ctx: StackContext) -> list[str]:
    """In a protected (production) stack every managed instance group, the broker hosts', has an autoscaler: a
    fixed-size group holds a fixed number of devices. An autoscaler's target names its group (``.../NAME``); a
    target unknown during preview counts for one group without a known one."""
    if not ctx.protect:
        return []
    targets = [_get(a.props, "target") for a in resources if a.type in AUTOSCALER_TYPES]
    unknown = sum(1 for t in targets if not _known(t))
    out = []
    for group in (r for r in resources if r.type in GROUP_TYPES):
        name = _get(group.props, "name")
        if any(_known(t) and str(t).rsplit("/", 1)[-1] == name for t in targets):
            continue
        if unknown:
            unknown -= 1
            continue
        out.append(f"{group.type} {group.name}: no autoscaler targets it; a production broker tier scales with "
                   "its devices (RegionAutoscaler)")
    return out


def dataflow_private_workers(r: Resource, ctx: StackContext) -> list[str]:
    if r.type not in ("gcp:dataflow/job:Job", "gcp:dataflow/flexTemplateJob:FlexTemplateJob"):
        return []
    ip = r.props.get("ipConfiguration")
    if ip == UNKNOWN or ip == "WORKER_IP_PRIVATE":
        return []
    return [f"Dataflow workers must not have public IPs: ipConfiguration={ip!r}, want 'WORKER_IP_PRIVATE'"]


_INVOKER_TYPES = ("gcp:cloudfunctionsv2/functionIamMember:", "gcp:cloudfunctionsv2/functionIamBinding:",
                  "gcp:cloudfunctions/functionIamMember:", "gcp:cloudfunctions/functionIamBinding:",
                  "gcp:cloudrunv2/serviceIamMember:", "gcp:cloudrunv2/serviceIamBinding:",
                  "gcp:cloudrun/iamMember:", "gcp:cloudrun/iamBinding:")


def function_internal_only(r: Resource, ctx: StackContext) -> list[str]:
    setting = None
    if r.type == "gcp:cloudfunctionsv2/function:Function":
        setting, want, path = _get(r.props, "serviceConfig.ingressSettings"), "ALLOW_INTERNAL_ONLY", \
            "serviceConfig.ingressSettings"
    elif r.type == "gcp:cloudfunctions/function:Function":
        setting, want, path = r.props.get("ingressSettings"), "ALLOW_INTERNAL_ONLY", "ingressSettings"
    elif r.type == CLOUD_RUN_SERVICE:
        if authenticating_admin_api(r):
            return []
        setting, want, path = r.props.get("ingress"), "INGRESS_TRAFFIC_INTERNAL_ONLY", "ingress"
        if _truthy(r.props.get("invokerIamDisabled")):
            return ["invokerIamDisabled=true: only the admin API, which verifies every caller, may drop Cloud Run's "
                    "invoker check"]
    elif r.type.startswith(_INVOKER_TYPES):
        return [f"{role} granted to {member}: the function must have no public invoker"
                for role, member in _iam_entries(r) if member in PUBLIC_MEMBERS
                and not (role == RUN_INVOKER and _is_admin_api_invoker(r))]
    else:
        return []
    if setting in (UNKNOWN, want):
        return []
    # Unset means ALLOW_ALL for functions and INGRESS_TRAFFIC_ALL for Cloud Run.
    return [f"{path}={setting!r}: ingress must be {want!r}"]


def public_cloud_run_authenticates(resources: Sequence[Resource], ctx: StackContext) -> list[str]:
    """A public invoker on a Cloud Run service is allowed only on a service of this stack that authenticates every
    request itself (the admin API)."""
    authenticating = {str(r.props.get("name")) for r in resources if authenticating_admin_api(r)}
    out = []
    for r in resources:
        if not r.type.startswith(_INVOKER_TYPES):
            continue
        name = r.props.get("name")
        for role, member in _iam_entries(r):
            if member in PUBLIC_MEMBERS and name != UNKNOWN and name not in authenticating:
                out.append(f"{r.type} {r.name}: {role} granted to {member} on {name!r}, which is not a service of "
                           f"this stack that verifies callers itself ({ADMIN_API_AUTH[0]}={ADMIN_API_AUTH[1]})")
    return out


def dataflow_subscriptions(resources: Sequence[Resource]) -> tuple[set[str], bool]:
    """Names of the subscriptions Dataflow jobs read (a parameter ``projects/P/subscriptions/NAME``), and whether
    some job's parameters are unknown during this preview (then the set may be incomplete)."""
    names: set[str] = set()
    unknown = False
    for r in resources:
        if r.type not in DATAFLOW_JOB_TYPES:
            continue
        params = r.props.get("parameters")
        if params == UNKNOWN:
            unknown = True
            continue
        for value in (params or {}).values() if isinstance(params, Mapping) else ():
            if value == UNKNOWN:
                unknown = True
            elif isinstance(value, str) and (m := _SUBSCRIPTION_PATH.match(value)):
                names.add(m.group(1))
    return names, unknown


def subscription_dead_letter(resources: Sequence[Resource], ctx: StackContext) -> list[str]:
    """Every subscription dead-letters, except the dead-letter audit and those a Dataflow job reads.

    Pub/Sub documents dead-letter topics and exponential-backoff retry policies as unsupported on a subscription
    Dataflow reads: the runner holds messages and extends their deadlines, so delivery attempts climb and healthy
    messages get dead-lettered. There the pipeline dead-letters itself, and the subscription must have neither.
    """
    read_by_dataflow, inputs_unknown = dataflow_subscriptions(resources)
    out: list[str] = []
    for r in resources:
        if r.type != "gcp:pubsub/subscription:Subscription":
            continue
        name = str(r.props.get("name") or r.name)
        if name.endswith(DEAD_LETTER_EXEMPT_SUFFIXES):
            continue
        policy = r.props.get("deadLetterPolicy")
        if name in read_by_dataflow:
            for field_name in ("deadLetterPolicy", "retryPolicy"):
                if _known(r.props.get(field_name)):
                    out.append(f"subscription {name} is read by Dataflow, which does not support its {field_name}: "
                               "dead-letter inside the pipeline instead")
            continue
        if policy == UNKNOWN:
            continue
        if not isinstance(policy, Mapping) or not _get(policy, "deadLetterTopic"):
            # During a preview, a Dataflow job whose input is not known yet may be reading this one.
            if not inputs_unknown:
                out.append(f"subscription {name} has no deadLetterPolicy.deadLetterTopic: a poison message would "
                           "be redelivered until retention expires")
            continue
        attempts = policy.get("maxDeliveryAttempts")
        if isinstance(attempts, (int, float)) and not 5 <= attempts <= 100:
            out.append(f"subscription {name}: maxDeliveryAttempts={attempts} outside Pub/Sub's 5..100")
    return out


def deletion_protection_follows_stack(r: Resource, ctx: StackContext) -> list[str]:
    """``deletionProtection`` is the one teardown switch: protected data in prod, one-command destroy elsewhere."""
    p = r.props
    want = "protected" if ctx.protect else "destroyable"
    checks: list[tuple[str, Any, Callable[[Any], bool]]] = []
    if r.type == "gcp:bigquery/table:Table":
        # The provider's default is true: a destroyable stack must say false.
        checks.append(("deletionProtection", p.get("deletionProtection", True),
                       (lambda v: _truthy(v)) if ctx.protect else (lambda v: not _truthy(v))))
    elif r.type == "gcp:bigquery/dataset:Dataset":
        checks.append(("deleteContentsOnDestroy", p.get("deleteContentsOnDestroy", False),
                       (lambda v: not _truthy(v)) if ctx.protect else (lambda v: _truthy(v))))
    elif r.type == "gcp:bigtable/instance:Instance":
        checks.append(("deletionProtection", p.get("deletionProtection", True),
                       (lambda v: _truthy(v)) if ctx.protect else (lambda v: not _truthy(v))))
    elif r.type == "gcp:bigtable/table:Table":
        if ctx.protect:
            checks.append(("deletionProtection", p.get("deletionProtection"), lambda v: v == "PROTECTED"))
        else:
            checks.append(("deletionProtection", p.get("deletionProtection"), lambda v: v != "PROTECTED"))
    elif r.type == "gcp:storage/bucket:Bucket":
        checks.append(("forceDestroy", p.get("forceDestroy", False),
                       (lambda v: not _truthy(v)) if ctx.protect else (lambda v: _truthy(v))))
    elif r.type == CLOUD_RUN_SERVICE:
        # The provider's default is true, and a protected service makes `pulumi destroy` fail.
        checks.append(("deletionProtection", p.get("deletionProtection", True),
                       (lambda v: _truthy(v)) if ctx.protect else (lambda v: not _truthy(v))))
    elif r.type == "gcp:firestore/database:Database":
        # The provider's default deletionPolicy ABANDON leaves the database behind on destroy, and the next
        # `pulumi up` fails with "already exists". DELETE always: a protected stack relies on the database's
        # own delete protection, which makes `pulumi destroy` fail loudly instead of skipping it silently.
        checks.append(("deletionPolicy", p.get("deletionPolicy", "ABANDON"), lambda v: v == "DELETE"))
        checks.append(("deleteProtectionState", p.get("deleteProtectionState"),
                       (lambda v: v == "DELETE_PROTECTION_ENABLED") if ctx.protect
                       else (lambda v: v != "DELETE_PROTECTION_ENABLED")))
    elif r.type in ("gcp:dataflow/job:Job", "gcp:dataflow/flexTemplateJob:FlexTemplateJob"):
        # Explicit either way: the provider's default differs between classic and flex template jobs.
        checks.append(("onDelete", p.get("onDelete"),
                       (lambda v: v == "drain") if ctx.protect else (lambda v: v == "cancel")))
        # Every stack waits for the job to stop. Without the wait, destroy removes the subnetwork and bucket the
        # workers still use, and the next launch under the same name meets the job that is still cancelling
        # ("There is already an active job named ..."). A cancel takes minutes; a drain of a streaming job can
        # keep the provider waiting for hours, and only protected stacks drain.
        checks.append(("skipWaitOnJobTermination", p.get("skipWaitOnJobTermination", False),
                       lambda v: not _truthy(v)))
    return [f"{path}={value!r} does not fit a {want} stack (deletionProtection={str(ctx.protect).lower()})"
            for path, value, ok in checks if value != UNKNOWN and not ok(value)]


# Where each resource takes its customer-managed key.
CMEK_PATHS: dict[str, tuple[str, ...]] = {
    "gcp:pubsub/topic:Topic": ("kmsKeyName",),
    "gcp:bigquery/dataset:Dataset": ("defaultEncryptionConfiguration.kmsKeyName",),
    "gcp:bigtable/instance:Instance": ("clusters[].kmsKeyName",),
    "gcp:storage/bucket:Bucket": ("encryption.defaultKmsKeyName",),
    "gcp:dataflow/job:Job": ("kmsKeyName",),
    "gcp:dataflow/flexTemplateJob:FlexTemplateJob": ("kmsKeyName",),
}


def cmek_when_asked(r: Resource, ctx: StackContext) -> list[str]:
    if not ctx.kms_key_name or r.type not in CMEK_PATHS:
        return []
    out = []
    for path in CMEK_PATHS[r.type]:
        if "[]." in path:
            head, tail = path.split("[].")
            items = _get(r.props, head)
            values = [UNKNOWN] if items == UNKNOWN else [_get(i, tail) for i in _as_list(items)] or [None]
        else:
            values = [_get(r.props, path)]
        for value in values:
            if value != UNKNOWN and value != ctx.kms_key_name:
                out.append(f"{path}={value!r}: the stack asks for CMEK with {ctx.kms_key_name}")
    return out


_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


def labels_everywhere(r: Resource, ctx: StackContext) -> list[str]:
    field_name = LABELABLE.get(r.type)
    if field_name is None:
        return []
    own = r.props.get(field_name)
    if own == UNKNOWN:
        return []
    defaults = r.provider_props.get("defaultLabels") or {}
    if isinstance(defaults, str) and defaults != UNKNOWN:
        # Provider inputs of object type travel as JSON text.
        try:
            defaults = json.loads(defaults)
        except ValueError:
            defaults = {}
    labels = {**(defaults if isinstance(defaults, Mapping) else {}), **(own if isinstance(own, Mapping) else {})}
    out = [f"{field_name} lacks {key!r} (required: {', '.join(REQUIRED_LABELS)})"
           for key in REQUIRED_LABELS if key not in labels]
    for key, value in labels.items():
        if value == UNKNOWN:
            continue
        # GCP rejects these at apply time; on a Dataflow job the service rewrites them, a perma-diff.
        if not _LABEL_KEY.match(str(key)) or not _LABEL_VALUE.match(str(value)):
            out.append(f"label {key}={value} is not a valid GCP label (lowercase letters, digits, _ and -)")
        # goog- labels belong to Google: Dataflow sets goog-dataflow-provided-* itself, and the provider ignores
        # them only when the config does not set them, so setting one diffs on every preview.
        elif str(key).startswith("goog-"):
            out.append(f"label {key} is reserved for Google (goog- prefix)")
    return out


def _port_set(allow: Mapping[str, Any]) -> Any:
    ports = allow.get("ports")
    return UNKNOWN if ports == UNKNOWN else [str(p) for p in _as_list(ports)]


def firewall_only_mqtt_and_health_checks(r: Resource, ctx: StackContext) -> list[str]:
    if r.type != "gcp:compute/firewall:Firewall":
        return []
    p = r.props
    if str(p.get("direction") or "INGRESS") != "INGRESS" or _truthy(p.get("disabled", False)):
        return []
    allows = _as_list(p.get("allows"))
    if not allows:
        return []  # a deny rule
    sources = p.get("sourceRanges")
    source_nets = []
    for s in _as_list(sources):
        try:
            source_nets.append(ipaddress.ip_network(str(s), strict=False))
        except ValueError:
            if s != UNKNOWN:
                return [f"sourceRanges entry {s!r} is not a CIDR"]
    # Traffic among a workload's own VMs (source tags or accounts that are also the targets, no ranges), such as
    # Dataflow's worker-to-worker shuffle ports, opens nothing to anyone else.
    source_tags = {str(s) for s in _as_list(p.get("sourceTags"))}
    target_tags = {str(s) for s in _as_list(p.get("targetTags"))}
    source_sas = {str(s) for s in _as_list(p.get("sourceServiceAccounts"))}
    target_sas = {str(s) for s in _as_list(p.get("targetServiceAccounts"))}
    if not _as_list(sources) and (source_tags or source_sas) and source_tags <= target_tags \
            and source_sas <= target_sas and UNKNOWN not in source_tags | source_sas:
        return []
    health_check_only = (bool(source_nets) and not _as_list(p.get("sourceTags"))
                         and not _as_list(p.get("sourceServiceAccounts"))
                         and all(any(n.version == h.version and n.subnet_of(h)  # type: ignore[arg-type]
                                     for h in HEALTH_CHECK_RANGES) for n in source_nets))
    out = []
    for allow in allows:
        if not isinstance(allow, Mapping) or allow == UNKNOWN:
            continue
        protocol, ports = str(allow.get("protocol")), _port_set(allow)
        if ports == UNKNOWN:
            continue
        if protocol == "tcp" and ports and set(ports) <= DEVICE_PORTS:
            continue
        if health_check_only and protocol == "tcp":
            continue
        shown = f"{protocol}:{','.join(ports) or 'all ports'}"
        out.append(f"ingress allows {shown} from {[str(s) for s in _as_list(sources)] or 'tags/accounts'}: only "
                   f"tcp:{MQTT_TLS_PORT} (MQTT) and tcp:{HTTP_BRIDGE_PORT} (HTTP bridge) may be open, anything else "
                   "only to Google's health-check ranges")
    return out


# Inputs that carry secret material by design; pulumi-gcp and pulumi-tls mark them secret themselves.
SCHEMA_SECRETS: dict[str, frozenset[str]] = {
    "gcp:secretmanager/secretVersion:SecretVersion": frozenset({"secretData"}),
    "gcp:secretmanager/regionalSecretVersion:RegionalSecretVersion": frozenset({"secretData"}),
    "gcp:monitoring/notificationChannel:NotificationChannel": frozenset({"sensitiveLabels"}),
    "tls:index/selfSignedCert:SelfSignedCert": frozenset({"privateKeyPem"}),
    "tls:index/certRequest:CertRequest": frozenset({"privateKeyPem"}),
    "tls:index/locallySignedCert:LocallySignedCert": frozenset({"caPrivateKeyPem"}),
}
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_SECRET_NAME = re.compile(r"(?i)(password|passwd|private_?key|api_?key|client_?secret|auth_?token|access_?token)$")


def _leaves(value: Any, path: str) -> Iterable[tuple[str, str, Any]]:
    """(path, last key, value) for every scalar under value."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, path.rsplit(".", 1)[-1], value


def secrets_are_pulumi_secrets(r: Resource, ctx: StackContext) -> list[str]:
    allowed = SCHEMA_SECRETS.get(r.type, frozenset())
    out = []
    for path, key, value in _leaves(r.props, ""):
        if not isinstance(value, str) or value in ("", UNKNOWN):
            continue
        if path.split(".")[0].split("[")[0] in allowed or any(
                path == s or path.startswith(s + ".") or path.startswith(s + "[") for s in r.secret_paths):
            continue
        if _PRIVATE_KEY.search(value):
            out.append(f"{path} holds a private key in plain text: store it as a Pulumi secret "
                       "(pulumi.Output.secret / config --secret) in Secret Manager")
        elif _SECRET_NAME.search(key):
            out.append(f"{path} looks like a credential in plain text: make it a Pulumi secret")
    return out


def secret_config_is_encrypted(config: Mapping[str, Any], secret_keys: Iterable[str] | None = None) -> list[str]:
    """Config keys that name a credential must be ``pulumi config set --secret`` values.

    ``config`` is a stack file's ``config:`` section (secure values appear as ``{"secure": ...}``); or the
    engine's config with ``secret_keys`` the keys it reports as secret.
    """
    secret = set(secret_keys or ())
    out = []
    for key, value in config.items():
        name = key.split(":", 1)[-1]
        if not _SECRET_NAME.search(name) and not name.lower().endswith(("token", "secret")):
            continue
        if (isinstance(value, Mapping) and "secure" in value) or key in secret:
            continue
        out.append(f"config {key} holds a credential in plain text: `pulumi config set --secret {name} ...`")
    return out


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    check: ResourceRule


@dataclass(frozen=True)
class StackPolicy:
    name: str
    description: str
    check: StackRule


POLICIES: tuple[Policy, ...] = (
    Policy("bucket-uniform-access-no-public", "Buckets use uniform access and enforce public access prevention.",
           bucket_access),
    Policy("iam-nothing-public", "Nothing is granted to allUsers or allAuthenticatedUsers.", no_public_access),
    Policy("iam-no-basic-roles", "No owner/editor/viewer grants; predefined roles only.", no_basic_roles),
    Policy("iam-no-service-account-keys", "No user-managed service-account keys.", no_service_account_keys),
    Policy("workload-dedicated-service-account",
           "Every workload names its own service account, never a default one.", dedicated_service_accounts),
    Policy("dataflow-private-workers", "Dataflow workers run without public IPs.", dataflow_private_workers),
    Policy("function-internal-only", "Cloud Functions and Cloud Run services take internal traffic only and have "
           "no public invoker, except the admin API, which verifies every caller itself.", function_internal_only),
    Policy("deletion-protection-follows-stack",
           "BigQuery, Bigtable, buckets, Firestore, Cloud Run and Dataflow teardown knobs follow deletionProtection.",
           deletion_protection_follows_stack),
    Policy("cmek-when-asked", "With kmsKeyName set, topics, dataset, Bigtable, buckets and Dataflow use that key.",
           cmek_when_asked),
    Policy("labels-everywhere", "Every labelable resource carries the app and stack labels, all valid.",
           labels_everywhere),
    Policy("firewall-mqtt-and-health-checks-only",
           "Ingress rules open only tcp:8883 and tcp:8443 (devices); anything else only to Google's health-check "
           "ranges or among a "
           "workload's own VMs.",
           firewall_only_mqtt_and_health_checks),
    Policy("secrets-are-pulumi-secrets", "No private key or credential in a plain (non-secret) input.",
           secrets_are_pulumi_secrets),
)

STACK_POLICIES: tuple[StackPolicy, ...] = (
    StackPolicy("pubsub-dead-letter",
                "Every subscription but the dead-letter audit has a dead-letter policy; one a Dataflow job reads "
                "has neither a dead-letter nor a retry policy.", subscription_dead_letter),
    StackPolicy("workload-service-accounts-not-shared", "No two workload kinds share one service account.",
                service_accounts_not_shared),
    StackPolicy("public-cloud-run-authenticates",
                "A Cloud Run service is open to allUsers only when it is this stack's admin API, which verifies every "
                "caller's token itself.", public_cloud_run_authenticates),
    StackPolicy("production-groups-autoscaled",
                "In a protected (production) stack every managed instance group has an autoscaler.",
                groups_autoscaled_in_production),
)


def evaluate(resources: Sequence[Resource], ctx: StackContext) -> dict[str, list[str]]:
    """Every policy over every resource: policy name -> ["<type> <name>: <message>", ...]."""
    found: dict[str, list[str]] = {p.name: [] for p in (*POLICIES, *STACK_POLICIES)}
    for r in resources:
        for p in POLICIES:
            found[p.name].extend(f"{r.type} {r.name}: {m}" for m in p.check(r, ctx))
    for sp in STACK_POLICIES:
        found[sp.name].extend(sp.check(resources, ctx))
    return found

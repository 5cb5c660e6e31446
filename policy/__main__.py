"""CrossGuard policy pack of gcp-iot-bridge: ``pulumi preview --policy-pack policy`` (from the repository root).

Each rule lives in ``rules.py`` as a plain function; this file only adapts the engine's view of a resource
(a proxy that raises on values unknown during preview) and the stack's config to those functions.
The stack's config reaches the pack through the engine (PULUMI_CONFIG), read with ``pulumi.runtime.get_config``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pulumi.runtime  # noqa: E402
from pulumi_policy import (  # noqa: E402
    EnforcementLevel,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import (  # noqa: E402
    UNKNOWN_ARCHIVE_VALUE,
    UNKNOWN_ARRAY_VALUE,
    UNKNOWN_ASSET_VALUE,
    UNKNOWN_BOOLEAN_VALUE,
    UNKNOWN_NUMBER_VALUE,
    UNKNOWN_OBJECT_VALUE,
    UNKNOWN_STRING_VALUE,
    UnknownValueError,
)

import rules  # noqa: E402

_UNKNOWNS = frozenset({UNKNOWN_ARCHIVE_VALUE, UNKNOWN_ARRAY_VALUE, UNKNOWN_ASSET_VALUE, UNKNOWN_BOOLEAN_VALUE,
                       UNKNOWN_NUMBER_VALUE, UNKNOWN_OBJECT_VALUE, UNKNOWN_STRING_VALUE})


def plain(value: Any) -> Any:
    """The proxy as plain dicts and lists, values unknown during preview replaced by ``rules.UNKNOWN``."""
    if isinstance(value, str):
        return rules.UNKNOWN if value in _UNKNOWNS else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in value:
            try:
                out[str(key)] = plain(value[key])
            except UnknownValueError:
                out[str(key)] = rules.UNKNOWN
        return out
    if isinstance(value, Sequence):
        items: list[Any] = []
        for i in range(len(value)):
            try:
                items.append(plain(value[i]))
            except UnknownValueError:
                items.append(rules.UNKNOWN)
        return items
    return value


def _provider_props(provider: Any) -> dict[str, Any]:
    if provider is None:
        return {}
    return plain(provider.props)


def stack_context() -> rules.StackContext:
    project = os.environ.get("PULUMI_PROJECT", rules.PROJECT)
    config = {f"{rules.PROJECT}:{key}": pulumi.runtime.get_config(f"{project}:{key}")
              for key in ("deletionProtection", "kmsKeyName")}
    return rules.StackContext.from_config(config, os.environ.get("PULUMI_STACK", ""))


def resource_policy(policy: rules.Policy) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        resource = rules.Resource.from_inputs(args.resource_type, args.name, plain(args.props),
                                              _provider_props(args.provider))
        for message in policy.check(resource, stack_context()):
            report_violation(message, args.urn)

    return ResourceValidationPolicy(name=policy.name, description=policy.description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY)


def stack_policy(policy: rules.StackPolicy) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        resources = [rules.Resource.from_inputs(r.resource_type, r.name, plain(r.props)) for r in args.resources]
        for message in policy.check(resources, stack_context()):
            report_violation(message, None)

    return StackValidationPolicy(name=policy.name, description=policy.description, validate=validate,
                                 enforcement_level=EnforcementLevel.MANDATORY)


def secret_config_policy() -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        # Without the engine's list of secret keys the pack cannot tell a `--secret` value from a plain one;
        # tests/policy/test_policies_on_stacks.py checks the stack files themselves (secure: values).
        if "PULUMI_CONFIG_SECRET_KEYS" not in os.environ:
            return
        config = pulumi.runtime.get_config_env()
        secret_keys = json.loads(os.environ["PULUMI_CONFIG_SECRET_KEYS"] or "[]")
        for message in rules.secret_config_is_encrypted(config, secret_keys):
            report_violation(message, None)

    return StackValidationPolicy(name="config-secrets-encrypted",
                                 description="Config keys that name a credential are Pulumi secrets.",
                                 validate=validate, enforcement_level=EnforcementLevel.MANDATORY)


def policies() -> list[ResourceValidationPolicy | StackValidationPolicy]:
    return [*(resource_policy(p) for p in rules.POLICIES),
            *(stack_policy(p) for p in rules.STACK_POLICIES),
            secret_config_policy()]


if __name__ == "__main__":
    PolicyPack(name="gcp-iot-bridge-guardrails", enforcement_level=EnforcementLevel.MANDATORY,
               policies=policies())  # type: ignore[arg-type]

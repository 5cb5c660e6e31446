"""Every policy over the components the program does not wire yet, each built by its own mock test's builder.

Only the component's own resources are judged (the builders add stand-ins for what the component takes in).
A destroyable and a protected variant of each: the teardown policy must hold both ways.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import pytest

import rules
from tests.infra import harness

LABELS = {"app": "gcp-iot-bridge", "stack": "dev", "managed-by": "pulumi"}

# Violations accepted in a component, with the reason; anything else fails. None at present.
KNOWN: dict[tuple[str, str], re.Pattern[str]] = {}


def _component_resources(run: harness.StackRun, component_type: str) -> list[rules.Resource]:
    roots = {r.urn for r in run.resources if r.type == component_type}
    assert roots, f"no {component_type} in the run"
    mine = []
    for r in run.resources:
        parent = r.parent
        while parent:
            if parent in roots:
                mine.append(rules.Resource.from_inputs(r.type, r.name, r.inputs))
                break
            up = run.by_urn.get(parent)
            parent = up.parent if up else ""
    return mine


def _pipeline(protect: bool) -> harness.StackRun:
    return importlib.import_module("tests.infra.test_pipeline").run(deletion_protection=protect, labels=LABELS)


def _config_push(protect: bool) -> harness.StackRun:
    return importlib.import_module("tests.infra.test_config_push").build(deletion_protection=protect, labels=LABELS)


def _broker(protect: bool) -> harness.StackRun:
    return importlib.import_module("tests.infra.test_broker").build(deletion_protection=protect, labels=LABELS)


def _registry_database(protect: bool) -> harness.StackRun:
    # A Firestore database takes no labels.
    return importlib.import_module("tests.infra.test_registry_database").build(deletion_protection=protect)


BUILDERS: dict[str, Callable[[bool], harness.StackRun]] = {
    "Pipeline": _pipeline,
    "ConfigPush": _config_push,
    "Broker": _broker,
    "RegistryDatabase": _registry_database,
}


@pytest.mark.parametrize("protect", [False, True], ids=["destroyable", "protected"])
@pytest.mark.parametrize("component", sorted(BUILDERS))
def test_every_policy_passes_on_the_component(component: str, protect: bool) -> None:
    run = BUILDERS[component](protect)
    resources = _component_resources(run, f"gcp-iot-bridge:index:{component}")
    assert len(resources) >= (2 if component == "RegistryDatabase" else 5)  # the database and its TTL policy
    ctx = rules.StackContext(stack="dev", protect=protect)
    unexpected: dict[str, list[str]] = {}
    for policy, messages in rules.evaluate(resources, ctx).items():
        known = KNOWN.get((component, policy))
        left = [m for m in messages if not (known and known.search(m))]
        if left:
            unexpected[policy] = left
    assert unexpected == {}, "\n".join(f"[{p}] {m}" for p, ms in unexpected.items() for m in ms)


@pytest.mark.parametrize("component", sorted(BUILDERS))
def test_teardown_policy_notices_the_wrong_switch(component: str) -> None:
    """The destroyable build judged as a protected stack must fail: the component's knobs really follow the switch."""
    run = BUILDERS[component](False)
    resources = _component_resources(run, f"gcp-iot-bridge:index:{component}")
    found: dict[str, Any] = rules.evaluate(resources, rules.StackContext(stack="prod", protect=True))
    assert found["deletion-protection-follows-stack"], component

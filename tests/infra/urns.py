"""Which deployed resources a program would keep: every resource's URN under the mocks, and the URNs its aliases
(its own and those it inherits from its parents) hand over to it, computed the way the Pulumi engine does.

A resource of a deployed stack survives a code change only if the new program declares a resource with the same
URN, or one whose aliases name that URN; otherwise ``pulumi up`` deletes it and creates a new one (for the
registry's Firestore database: every device, credential and config gone). ``tests/fixtures/urns-<stack>.json``
holds the URNs of the dev, prod and demo stacks as they were before the components were split up; the test in
``test_urns.py`` holds today's program to them.

    .venv/bin/python -m tests.infra.urns           # print today's URNs of every stack, as the fixtures hold them
    .venv/bin/python -m tests.infra.urns --write   # rewrite the fixtures (only from code whose URNs are the baseline)

A change that removes a resource on purpose (a deployed stack loses it on the next ``up``) adds it to ``RETIRED``
below, with the reason, rather than rewriting the fixtures: the baseline keeps saying what was deployed, and the
list says what a deployed stack loses and why. A change that moves or renames one gives the new resource an alias
instead.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.infra import harness

FIXTURES = harness.ROOT / "tests" / "fixtures"
ROOT_STACK_TYPE = "pulumi:pulumi:Stack"


def fixture(stack: str) -> Path:
    return FIXTURES / f"urns-{stack}.json"


@dataclass(frozen=True)
class Retired:
    """Resources of the baseline that ``pulumi up`` deletes on purpose: of ``type_``, directly under a parent of
    ``parent_type``, named by ``name`` (a whole-name pattern), in every stack."""

    type_: str
    parent_type: str
    name: str
    reason: str

    def covers(self, urn: str) -> bool:
        _, _, qualified, name = _split(urn)
        parent_types, _, own = qualified.rpartition("$")
        return (own == self.type_ and parent_types.rpartition("$")[2] == self.parent_type
                and re.fullmatch(self.name, name) is not None)


_SLOTS = ("the broker's fan-out slots: one unfiltered device-commands subscription per host the group could run, "
          "each host leasing one, so every config and command reached every host (up to 2000 subscriptions). Each "
          "host now creates its own subscription, filtered on its host id, and deletes it at a clean stop "
          "(docs/broker-scaling.md); the hosts that read the slots are replaced by the same update")
RETIRED: tuple[Retired, ...] = (
    Retired("gcp:pubsub/subscription:Subscription", "gcp-iot-bridge:index:Broker", r"broker-fanout-\d+", _SLOTS),
    Retired("gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember", "gcp-iot-bridge:index:Broker",
            r"broker-fanout-\d+-(subscriber|agent)",
            "the bridge's and the Pub/Sub agent's (dead-lettering) subscriber grants on those slots: " + _SLOTS),
)


def retired(urn: str) -> Retired | None:
    """The entry of ``RETIRED`` that covers ``urn``, or None."""
    return next((r for r in RETIRED if r.covers(urn)), None)


def _split(urn: str) -> tuple[str, str, str, str]:
    """``urn:pulumi:<stack>::<project>::<qualified type>::<name>`` -> (stack, project, qualified type, name)."""
    head, _, rest = urn.partition("::")
    stack = head.removeprefix("urn:pulumi:")
    project, _, rest = rest.partition("::")
    qualified, _, name = rest.partition("::")
    return stack, project, qualified, name


def create_urn(name: str, type_: str, parent: str, project: str, stack: str) -> str:
    """The URN the engine gives a resource: its type qualified by its parent's, unless the parent is the stack."""
    qualified = type_
    if parent:
        parent_type = _split(parent)[2]
        if parent_type != ROOT_STACK_TYPE:
            qualified = f"{parent_type}${type_}"
    return f"urn:pulumi:{stack}::{project}::{qualified}::{name}"


def engine_urns(run: harness.StackRun) -> dict[str, str]:
    """Mock URN -> the URN the engine gives the same resource.

    The mock monitor qualifies a resource's type with its parent's last type only, and a top-level resource's with
    the stack's: ``Stack$IotBridge`` and ``Broker$Database`` where the engine writes ``IotBridge`` and
    ``IotBridge$Broker$Database``. Deployed stacks hold the engine's, so those are compared."""
    out: dict[str, str] = {}
    for r in run.resources:  # registration order: a parent comes before its children
        stack, project, _, _ = _split(r.urn)
        out[r.urn] = create_urn(r.name, r.type, out.get(r.parent, ""), project, stack)
    return out


def _translate(urn: str, engine: dict[str, str]) -> str:
    """A URN the program computed under the mocks (an alias's parent, from ``pulumi.create_urn`` or a resource) as
    the engine's. Such a URN is its parent's mock type, ``$``, its own type: the parent's type is rewritten to the
    engine's of the resources that have it (a URN names its parent's type chain, never the parent's name)."""
    if urn in engine:
        return engine[urn]
    stack, project, qualified, name = _split(urn)
    parent_type, _, type_ = qualified.rpartition("$")
    if parent_type in ("", ROOT_STACK_TYPE):  # top level: the mocks and the engine agree
        return create_urn(name, type_, "", project, stack)
    found = {_split(engine[mock])[2] for mock in engine if _split(mock)[2] == parent_type}
    if len(found) != 1:
        raise ValueError(f"cannot tell the engine's URN of {urn}: {len(found)} parents of type {parent_type}")
    return f"urn:pulumi:{stack}::{project}::{found.pop()}${type_}::{name}"


def _collapse(r: harness.Resource, alias: dict[str, Any], parent: str, engine: dict[str, str]) -> str:
    """One alias of a resource as a URN: what it does not say is the resource's own (name, type, parent...)."""
    if "urn" in alias:
        return _translate(alias["urn"], engine)
    spec = alias.get("spec", {})
    stack, project, _, _ = _split(engine[r.urn])
    if spec.get("noParent"):
        parent = ""
    elif spec.get("parentUrn"):
        parent = _translate(spec["parentUrn"], engine)
    return create_urn(spec.get("name") or r.name, spec.get("type") or r.type, parent,
                      spec.get("project") or project, spec.get("stack") or stack)


def _inherited(child_name: str, parent_name: str, child_type: str, parent_alias: str) -> str:
    """A child's alias under one alias of its parent; a name that starts with the parent's follows its rename."""
    stack, project, _, alias_name = _split(parent_alias)
    name = alias_name + child_name[len(parent_name):] if child_name.startswith(parent_name) else child_name
    return create_urn(name, child_type, parent_alias, project, stack)


def alias_urns(run: harness.StackRun) -> dict[str, set[str]]:
    """Engine URN -> the former URNs its aliases cover, own and inherited from its parents' (as the engine does)."""
    engine = engine_urns(run)
    out: dict[str, set[str]] = {}
    for r in run.resources:
        parent = engine.get(r.parent, "")
        own = [_collapse(r, a, parent, engine) for a in r.aliases]
        found = set(own)
        if parent in out:
            parent_name = _split(parent)[3]
            for parent_alias in out[parent]:
                found.add(_inherited(r.name, parent_name, r.type, parent_alias))
                for child_alias in own:
                    _, _, qualified, name = _split(child_alias)
                    found.add(_inherited(name, parent_name, qualified.rpartition("$")[2], parent_alias))
        out[engine[r.urn]] = found
    return out


def urns(run: harness.StackRun) -> list[str]:
    """The engine's URN of every resource the program declared."""
    return sorted(engine_urns(run).values())


def main(argv: list[str]) -> None:
    for stack in harness.STACKS:
        found = urns(harness.run_program(stack))
        if "--write" in argv:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            fixture(stack).write_text(json.dumps(found, indent=1) + "\n")
            print(f"{fixture(stack).relative_to(harness.ROOT)}: {len(found)} URNs")
        else:
            print(json.dumps({stack: found}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

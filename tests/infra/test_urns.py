"""A deployed stack keeps every resource through a code change: each URN the dev, prod and demo stacks had before
the components were split up (tests/fixtures/urns-<stack>.json, generated from that code) is still declared, or
named by an alias of a resource that is, or retired on purpose with its reason (``urns.RETIRED``). A URN none of
these would be a delete and a create on the next ``pulumi up``: for the registry's Firestore database, every
device gone."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from gcp_iot_bridge.infra import registry_database
from tests.infra import harness, urns


def lost_and_doubly_claimed(run: harness.StackRun) -> tuple[list[str], list[str]]:
    """(former URNs no resource keeps and none retired, former URNs two resources claim) of ``run`` against its
    stack's fixture."""
    before = set(json.loads(urns.fixture(run.stack).read_text()))
    now = urns.urns(run)
    aliases = urns.alias_urns(run)
    claims = Counter([*now, *(urn for found in aliases.values() for urn in found if urn in before)])
    lost = sorted(urn for urn in before - set(claims) if urns.retired(urn) is None)
    doubly = sorted(urn for urn, n in claims.items() if urn in before and n > 1)
    return lost, doubly


@pytest.mark.parametrize("stack", harness.STACKS)
def test_every_resource_of_a_deployed_stack_keeps_its_urn(stack):
    lost, doubly = lost_and_doubly_claimed(harness.stack_run(stack))
    assert not lost, f"pulumi up would replace these resources of a deployed {stack} stack: {lost}"
    # Two resources answering to one former URN: the engine would refuse the plan.
    assert not doubly, doubly


def test_the_registry_database_is_the_one_it_was_under_the_broker():
    run = harness.stack_run("dev")
    aliases = urns.alias_urns(run)
    (database,) = [urn for urn in aliases if urn.endswith("gcp:firestore/database:Database::registry-firestore")]
    prefix = "urn:pulumi:dev::gcp-iot-bridge::"
    assert aliases[database] >= {
        # Under the Broker, under IotBridge (the baseline) ...
        f"{prefix}gcp-iot-bridge:index:IotBridge$gcp-iot-bridge:index:Broker$gcp:firestore/database:Database"
        "::broker-firestore",
        # ... and under the Broker at the stack's top, before IotBridge existed.
        f"{prefix}gcp-iot-bridge:index:Broker$gcp:firestore/database:Database::broker-firestore",
    }


def test_without_its_aliases_the_registry_database_would_be_replaced(monkeypatch):
    """The check can fail: with the move's aliases left out, it names exactly the two moved resources."""
    monkeypatch.setattr(registry_database, "_former", lambda brokers, key: [])
    lost, _ = lost_and_doubly_claimed(harness.run_program("prod"))
    assert [urn.rpartition("::")[2] for urn in lost] == ["broker-firestore", "broker-requests-ttl"]


def test_engine_urns_qualify_a_type_with_every_parent():
    """The mocks' own URNs drop all but the nearest parent's type; the engine's (in deployed state) keep them all."""
    run = harness.stack_run("dev")
    engine = urns.engine_urns(run)
    version = run.one("gcp:secretmanager/secretVersion:SecretVersion", "broker-tls-key-v")
    assert engine[version.urn] == (
        "urn:pulumi:dev::gcp-iot-bridge::gcp-iot-bridge:index:IotBridge$gcp-iot-bridge:index:Broker"
        "$gcp:secretmanager/secret:Secret$gcp:secretmanager/secretVersion:SecretVersion::broker-tls-key-v")
    (bridge,) = run.of_type("gcp-iot-bridge:index:IotBridge")
    assert engine[bridge.urn] == "urn:pulumi:dev::gcp-iot-bridge::gcp-iot-bridge:index:IotBridge::gcp-iot-bridge"


@pytest.mark.parametrize("stack", harness.STACKS)
def test_what_is_retired_was_deployed_and_is_gone(stack):
    """Each retired entry names resources the baseline has (no stale entry that could hide a future loss), and the
    program declares none of them any more (a retired resource that came back would be deleted and created)."""
    before = json.loads(urns.fixture(stack).read_text())
    for entry in urns.RETIRED:
        assert any(entry.covers(urn) for urn in before), f"{entry.name}: nothing of the {stack} baseline"
    assert [urn for urn in urns.urns(harness.stack_run(stack)) if urns.retired(urn)] == []
    # What is retired: the slot subscriptions and their grants, four slots in every baseline, and nothing else.
    gone = sorted(urn.rpartition("::")[2] for urn in before if urns.retired(urn))
    assert gone == sorted([*(f"broker-fanout-{i}" for i in range(4)), *(f"broker-fanout-{i}-agent" for i in range(4)),
                           *(f"broker-fanout-{i}-subscriber" for i in range(4))])


def test_only_the_named_resources_are_retired():
    """The same names under another parent or of another type, or a name the pattern does not cover, stay guarded."""
    broker = ("urn:pulumi:dev::gcp-iot-bridge::gcp-iot-bridge:index:IotBridge$gcp-iot-bridge:index:Broker"
              "$gcp:pubsub/subscription:Subscription::")
    assert urns.retired(broker + "broker-fanout-12") is not None
    for urn in (broker + "broker-fanout-x", broker + "broker-fanout-1-extra", broker + "broker-fanouts-1",
                broker.replace("index:Broker$", "index:Messaging$") + "broker-fanout-1",
                broker.replace("subscription:Subscription", "topic:Topic") + "broker-fanout-1"):
        assert urns.retired(urn) is None, urn


def test_a_lost_resource_that_is_not_retired_still_fails(monkeypatch):
    """With the slots retired, dropping any other resource (the broker's load balancer here) is still reported."""
    from gcp_iot_bridge.infra import broker

    monkeypatch.setattr(broker.Broker, "_load_balancer", lambda self: None)
    lost, _ = lost_and_doubly_claimed(harness.run_program("dev"))
    assert [urn.rpartition("::")[2] for urn in lost] == ["broker-mqtt", "broker-backend"]

"""IotBridge: the whole architecture as one component, over the pieces the program used to declare itself."""

from __future__ import annotations

from tests.infra import harness

BRIDGE = "gcp-iot-bridge:index:IotBridge"


def test_every_piece_is_a_child_of_the_bridge_that_keeps_its_former_urn():
    run = harness.stack_run("dev")
    (bridge,) = run.of_type(BRIDGE)
    pieces = [r for r in run.resources if r.parent == bridge.urn]
    assert {r.type.rpartition(":")[2] for r in pieces} == {
        "Foundation", "Network", "Warehouse", "TimeSeries", "Messaging", "RegistryDatabase", "Broker", "Pipeline",
        "ConfigPush", "AdminApi", "EdgeMl", "Monitoring"}
    for piece in pieces:
        if piece.type in ("gcp-iot-bridge:index:RegistryDatabase", "gcp-iot-bridge:index:AdminApi"):
            # Newer than IotBridge: never a child of the stack. The registry's database and TTL policy carry
            # aliases of their own, to where they were under the Broker (tests/infra/test_urns.py).
            assert piece.aliases == (), piece.name
            continue
        # Before IotBridge, each piece was the stack's child, with the URN
        # urn:pulumi:<stack>::<project>::<type>::<name>.
        # An alias without a parent (and the same name and type) names exactly that URN, so a deployed stack moves
        # its pieces, and with them every resource under them, without replacing one.
        assert piece.aliases == ({"spec": {"noParent": True}},), piece.name


def test_the_program_exports_what_the_bridge_outputs():
    run = harness.stack_run("dev")
    assert run.outputs["telemetry_topic"] == run.one("gcp:pubsub/topic:Topic", "messaging-telemetry").get("name")
    assert run.outputs["bigquery_dataset"] == run.one("gcp:bigquery/dataset:Dataset", "warehouse-dataset").get(
        "datasetId")


def test_the_stacks_broker_device_auth_reaches_the_hosts():
    """``brokerDeviceAuth`` is what the hosts' startup script and the broker's ports follow."""
    run = harness.run_program("dev", {"brokerDeviceAuth": "mosquitto"})
    script = run.one("gcp:compute/instanceTemplate:InstanceTemplate", "broker-template").get("metadataStartupScript")
    assert '"device_auth": "mosquitto"' in script and "systemctl enable --now iotbridge-authd " in script
    rules = [r.get("portRange") for r in run.of_type("gcp:compute/forwardingRule:ForwardingRule")]
    assert rules == ["8883"] and run.outputs["http_bridge_url"] == ""
    # The autoscaler keeps what one e2-standard-2 carries in this mode beside its daemon's map of what the group of
    # at most 10 hosts (Pulumi.yaml's brokerMaxHosts) keeps: 95,740 (worked out in tests/test_planning.py).
    (autoscaler,) = run.of_type("gcp:compute/regionAutoscaler:RegionAutoscaler")
    assert autoscaler.get("autoscalingPolicy")["metrics"][0]["target"] == 95_740

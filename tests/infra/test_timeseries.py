"""TimeSeries under mocks: Bigtable instance with autoscaling clusters, the telemetry table with GC policies."""

from __future__ import annotations

import pytest

from iotbridge import spec
from tests.infra import harness

INSTANCE = "gcp:bigtable/instance:Instance"


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def test_instance_has_one_autoscaling_cluster_per_configured_zone(run: harness.StackRun) -> None:
    (instance,) = run.of_type(INSTANCE)
    prefix = run.config["gcp-iot-bridge:prefix"]
    assert instance.get("name") == f"{prefix}-tsdb" == run.outputs["bigtable_instance"]
    zones = [c["zone"] for c in instance.get("clusters")]
    assert zones == harness.yaml.safe_load(run.config["gcp-iot-bridge:bigtableZones"])
    for cluster in instance.get("clusters"):
        assert cluster["storageType"] == run.config["gcp-iot-bridge:bigtableStorageType"]
        assert 6 <= len(cluster["clusterId"]) <= 30
        assert cluster["autoscalingConfig"] == {
            "minNodes": int(run.config["gcp-iot-bridge:bigtableMinNodes"]),
            "maxNodes": int(run.config["gcp-iot-bridge:bigtableMaxNodes"]),
            "cpuTarget": int(run.config["gcp-iot-bridge:bigtableCpuTarget"]),
        }
        assert "numNodes" not in cluster, "num_nodes is ignored once autoscaling is set; set one of them"


def test_telemetry_table_with_a_gc_policy_on_every_family(run: harness.StackRun) -> None:
    (table,) = run.of_type("gcp:bigtable/table:Table")
    assert table.get("name") == spec.BIGTABLE.table == run.outputs["bigtable_table"] == "telemetry"
    families = [f["family"] for f in table.get("columnFamilies")]
    assert families == list(spec.BIGTABLE.column_families)
    days = int(run.config["gcp-iot-bridge:bigtableGcMaxAgeDays"])
    policies = {p.get("columnFamily"): p for p in run.of_type("gcp:bigtable/gCPolicy:GCPolicy")}
    assert set(policies) == set(families)
    for policy in policies.values():
        assert policy.get("maxAge") == {"duration": f"{days * 24}h"}
        assert policy.get("table") == "telemetry"
        assert run.depends_on(policy, table)


def test_no_app_profile_that_nothing_uses(run: harness.StackRun) -> None:
    # The pipeline's Bigtable writer cannot name an app profile: its writes use the instance's default profile.
    # Should Beam's WriteToBigTable gain the option, declare the profile again and pass it to the pipeline.
    import inspect

    from apache_beam.io.gcp.bigtableio import WriteToBigTable

    assert not [p for p in inspect.signature(WriteToBigTable).parameters if "profile" in p]
    assert run.of_type("gcp:bigtable/appProfile:AppProfile") == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"zones": ()}, "at least one zone"),
    ({"cpu_target": 90}, "cpu_target must be 10..80"),
    ({"min_nodes": 1, "max_nodes": 20}, "max_nodes <= 10 x min_nodes"),
])
def test_component_refuses_settings_bigtable_rejects(kwargs: dict, message: str) -> None:
    from gcp_iot_bridge.infra.timeseries import TimeSeries, TimeSeriesArgs

    args = {"project": "p-123456", "prefix": "iot-t", "zones": ("us-central1-b",), "deletion_protection": False}
    args.update(kwargs)

    def program() -> None:
        TimeSeries("ts", TimeSeriesArgs(**args))

    with pytest.raises(harness.ProgramFailed, match=message):
        harness.run_program("dev", program=program)


@pytest.mark.parametrize("prefix", ["abc", "a" * 16])
def test_shortest_and_longest_prefix_give_valid_bigtable_ids(prefix: str) -> None:
    # Instance ids are 6..33 characters, cluster ids 6..30; config.py bounds the prefix to 3..16.
    run = harness.run_program("dev", {"prefix": prefix})
    (instance,) = run.of_type(INSTANCE)
    assert 6 <= len(instance.get("name")) <= 33
    for cluster in instance.get("clusters"):
        assert 6 <= len(cluster["clusterId"]) <= 30
    for account in run.of_type("gcp:serviceaccount/account:Account"):
        assert 6 <= len(account.get("accountId")) <= 30

"""Network: the stack's own VPC and a subnet with Private Google Access, used by every private workload."""

from __future__ import annotations

import pytest

from tests.infra import harness

NET = "gcp:compute/network:Network"
SUBNET = "gcp:compute/subnetwork:Subnetwork"


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def test_custom_mode_vpc_and_a_private_google_access_subnet_in_the_region(run: harness.StackRun) -> None:
    prefix, region = run.config["gcp-iot-bridge:prefix"], run.config["gcp:region"]
    (vpc,) = run.of_type(NET)
    (subnet,) = run.of_type(SUBNET)
    assert (vpc.get("name"), vpc.get("autoCreateSubnetworks")) == (f"{prefix}-vpc", False)
    assert (subnet.get("name"), subnet.get("region")) == (f"{prefix}-{region}", region)
    assert subnet.get("privateIpGoogleAccess") is True
    assert run.depends_on(subnet, vpc)


def test_private_workloads_run_in_the_stack_subnet(run: harness.StackRun) -> None:
    (subnet,) = run.of_type(SUBNET)
    (job,) = run.of_type("gcp:dataflow/flexTemplateJob:FlexTemplateJob")
    (template,) = run.of_type("gcp:compute/instanceTemplate:InstanceTemplate")
    assert run.depends_on(job, subnet) and run.depends_on(template, subnet)
    assert job.get("ipConfiguration") == "WORKER_IP_PRIVATE"


def test_workbench_joins_the_stack_subnet_when_enabled() -> None:
    run = harness.run_program("dev", {"gcp-iot-bridge:workbenchEnabled": "true",
                                      "gcp-iot-bridge:workbenchZone": "us-central1-a"})
    (subnet,) = run.of_type(SUBNET)
    (inst,) = run.of_type("gcp:workbench/instance:Instance")
    assert run.depends_on(inst, subnet)
    assert inst.get("gceSetup")["disablePublicIp"] is True
    assert "workbench_proxy_uri" in run.outputs
    assert harness.stack_run("dev").of_type("gcp:workbench/instance:Instance") == []  # off by default


@pytest.mark.parametrize(("overrides", "message"), [
    ({"gcp-iot-bridge:workbenchEnabled": "true"}, "workbenchZone.*required when workbenchEnabled"),
    ({"gcp-iot-bridge:workbenchEnabled": "true", "gcp-iot-bridge:workbenchZone": "europe-west1-b"},
     "workbenchZone=europe-west1-b: not in gcp:region"),
    ({"gcp-iot-bridge:pipelineThresholdRules": '{"temperature": {"above": 80}}'}, "needs above and/or below and a"),
    ({"gcp-iot-bridge:brokerDeviceSourceRanges": '["10.0.0.0/33"]'}, "not a CIDR range"),
    ({"gcp-iot-bridge:brokerHosts": "0"}, "brokerHosts=0"),
    ({"gcp-iot-bridge:brokerMaxHosts": "1"}, "brokerMaxHosts=1: less than brokerMinHosts=2"),
])
def test_bad_new_keys_fail_naming_the_key(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(harness.ProgramFailed, match=message):
        harness.run_program("dev", overrides)

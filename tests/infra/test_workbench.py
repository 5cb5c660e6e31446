"""Workbench under Pulumi mocks: declared only when enabled, private, self-stopping, least privilege, destroyable.

Each test runs a small program through ``harness.run_program`` (mocks set with preview=False, every registration
and output awaited before the assertions), building the component directly with a VPC subnet as the stack would
pass it in.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pulumi
import pulumi_gcp as gcp
import pytest

from gcp_iot_bridge.infra.workbench import Workbench, WorkbenchArgs, declare_workbench
from tests.infra.harness import ProgramFailed, StackRun, run_program

INSTANCE = "gcp:workbench/instance:Instance"
SA = "gcp:serviceaccount/account:Account"
DATASET_IAM = "gcp:bigquery/datasetIamMember:DatasetIamMember"
PROJECT_IAM = "gcp:projects/iAMMember:IAMMember"
SA_IAM = "gcp:serviceaccount/iAMMember:IAMMember"
PROJECT = "my-iot-dev-project"


def _program(enabled: bool = True, *, private_google_access: bool = True, subnet_region: str = "us-central1",
             **overrides) -> StackRun:
    def program() -> None:
        network = gcp.compute.Network("vpc", project=PROJECT, name="iot-dev-vpc", auto_create_subnetworks=False)
        subnet = gcp.compute.Subnetwork(
            "subnet", project=PROJECT, name="iot-dev-subnet", region=subnet_region, network=network.id,
            ip_cidr_range="10.10.0.0/24", private_ip_google_access=private_google_access)
        args = WorkbenchArgs(
            project=PROJECT, prefix="iot-dev", zone="us-central1-a", subnetwork=subnet, dataset_id="iot",
            deletion_protection=False, labels={"app": "gcp-iot-bridge", "stack": "dev"})
        args = dataclasses.replace(args, **overrides)
        wb = declare_workbench("workbench", enabled, args)
        if wb is not None:
            pulumi.export("workbench_sa", wb.service_account.email)

    return run_program("dev", program=program)


def test_nothing_is_declared_when_disabled() -> None:
    run = _program(enabled=False)
    assert run.of_type(INSTANCE) == []
    assert [r for r in run.of_type(SA) if "workbench" in str(r.get("accountId"))] == []
    assert run.of_type(DATASET_IAM) == [] and run.of_type(PROJECT_IAM) == []
    assert run.of_type("gcp-iot-bridge:index:Workbench") == []
    assert len(run.of_type("gcp:compute/subnetwork:Subnetwork")) == 1  # the program itself did run


def test_enabled_instance_is_private_shielded_self_stopping_and_destroyable() -> None:
    run = _program()
    (inst,) = run.of_type(INSTANCE)
    subnet = run.one("gcp:compute/subnetwork:Subnetwork", "subnet")
    network = run.one("gcp:compute/network:Network", "vpc")
    gce = inst.get("gceSetup")

    assert inst.get("name") == "iot-dev-workbench"
    assert inst.get("location") == "us-central1-a"
    assert gce["disablePublicIp"] is True
    assert [(n["network"], n["subnet"]) for n in gce["networkInterfaces"]] == [
        ("projects/my-iot-dev-project/global/networks/iot-dev-vpc",
         "projects/my-iot-dev-project/regions/us-central1/subnetworks/iot-dev-subnet")]
    assert run.depends_on(inst, subnet) and run.depends_on(inst, network)
    assert not any(n.get("accessConfigs") for n in gce["networkInterfaces"])  # no NAT IP either
    assert inst.get("disableProxyAccess") is False  # the proxy is the only way in
    assert gce["shieldedInstanceConfig"] == {"enableSecureBoot": True, "enableVtpm": True,
                                             "enableIntegrityMonitoring": True}
    assert gce["metadata"]["idle-timeout-seconds"] == "3600"
    assert gce["metadata"]["notebook-disable-root"] == "true"
    assert inst.get("labels") == {"app": "gcp-iot-bridge", "stack": "dev"}
    assert inst.get("enableDeletionProtection") is False
    assert inst.get("deletionPolicy") == "DELETE"


def test_own_service_account_reads_our_dataset_and_runs_jobs_nothing_more() -> None:
    run = _program()
    (inst,) = run.of_type(INSTANCE)
    (sa,) = [r for r in run.of_type(SA) if r.get("accountId") == "iot-dev-workbench"]
    email = run.outputs["workbench_sa"]
    assert email == f"iot-dev-workbench@{PROJECT}.iam.gserviceaccount.com"
    assert [a["email"] for a in inst.get("gceSetup")["serviceAccounts"]] == [email]

    member = f"serviceAccount:{email}"
    dataset_grants = [(g.get("datasetId"), g.get("role")) for g in run.of_type(DATASET_IAM)
                      if g.get("member") == member]
    project_grants = [g.get("role") for g in run.of_type(PROJECT_IAM) if g.get("member") == member]
    assert dataset_grants == [("iot", "roles/bigquery.dataViewer")]
    assert project_grants == ["roles/bigquery.jobUser"]
    # The VM starts only after its grants exist.
    for grant in [*run.of_type(DATASET_IAM), *run.of_type(PROJECT_IAM)]:
        assert run.depends_on(inst, grant)
    assert run.depends_on(inst, sa)


def test_users_get_service_account_user_on_this_account_only() -> None:
    run = _program(users=("group:analysts@example.com",))
    (grant,) = run.of_type(SA_IAM)
    assert grant.get("role") == "roles/iam.serviceAccountUser"
    assert grant.get("member") == "group:analysts@example.com"
    email = f"iot-dev-workbench@{PROJECT}.iam.gserviceaccount.com"
    assert grant.get("serviceAccountId") == f"projects/{PROJECT}/serviceAccounts/{email}"


def test_deletion_protection_protects_the_instance() -> None:
    run = _program(deletion_protection=True, idle_timeout_seconds=7200)
    (inst,) = run.of_type(INSTANCE)
    assert inst.get("enableDeletionProtection") is True
    assert inst.get("deletionPolicy") == "PREVENT"
    assert inst.get("gceSetup")["metadata"]["idle-timeout-seconds"] == "7200"


def test_subnet_without_private_google_access_fails_the_program() -> None:
    with pytest.raises(ProgramFailed, match="no Private Google Access"):
        _program(private_google_access=False)


def test_zone_outside_the_subnet_region_fails_the_program() -> None:
    with pytest.raises(ProgramFailed, match="not in the subnet's region europe-west1"):
        _program(subnet_region="europe-west1")


@pytest.mark.parametrize("overrides, message", [
    ({"zone": "us-central1"}, "is not a zone"),
    ({"idle_timeout_seconds": 60}, "Workbench allows 600..86400"),
    ({"idle_timeout_seconds": 100000}, "Workbench allows 600..86400"),
    ({"users": ("alice@example.com",)}, "is not an IAM member"),
])
def test_bad_args_are_refused_before_anything_is_declared(overrides: dict, message: str) -> None:
    base = dict(project=PROJECT, prefix="iot-dev", zone="us-central1-a", subnetwork=None, dataset_id="iot",
                deletion_protection=False)
    with pytest.raises(ValueError, match=message):
        WorkbenchArgs(**{**base, **overrides})  # type: ignore[arg-type]


def test_component_type_token() -> None:
    run = _program()
    (component,) = run.of_type("gcp-iot-bridge:index:Workbench")
    assert all(r.parent == component.urn for r in run.of_type(INSTANCE))
    assert Workbench.__name__ == "Workbench"


def test_workbench_passes_the_policy_pack() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "policy" / "rules.py"
    spec = importlib.util.spec_from_file_location("workbench_policy_rules", path)
    assert spec is not None and spec.loader is not None
    rules = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rules  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(rules)

    run = _program(users=("group:analysts@example.com",))
    resources = [rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in run.resources]
    found = rules.evaluate(resources, rules.StackContext.from_config(run.config, run.stack))
    assert {name: msgs for name, msgs in found.items() if msgs} == {}
    assert any(r.type == INSTANCE for r in resources)  # the instance was among what the rules saw

    unlabelled = _program(labels={})
    found = rules.evaluate([rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in unlabelled.resources],
                           rules.StackContext.from_config(unlabelled.config, unlabelled.stack))
    assert any(INSTANCE in msg for msg in found["labels-everywhere"])  # the rules do look at the instance

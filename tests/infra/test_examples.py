"""examples/: a user's own Pulumi program composing the library's components, evaluated under the mocks.

The in-process test runs the example against this checkout; the installed-package test builds a fresh virtualenv,
installs the project into it the way a user would (``pip install .``) and runs the example there, where only the
installed ``gcp_iot_bridge`` can be imported.
"""

from __future__ import annotations

import runpy

import pytest

from tests.infra import harness

EXAMPLES = harness.ROOT / "examples"
BYO = EXAMPLES / "byo_network_and_dataset" / "__main__.py"


def run_byo() -> harness.StackRun:
    return harness.run_program("dev", program=lambda: runpy.run_path(str(BYO), run_name="__main__"))


def test_the_bridge_and_pipeline_use_the_users_network_and_dataset():
    run = run_byo()
    # The user's own network, subnet and dataset are the only ones: no component declared another.
    assert [r.name for r in run.of_type("gcp:compute/network:Network")] == ["acme-vpc"]
    assert [r.name for r in run.of_type("gcp:compute/subnetwork:Subnetwork")] == ["acme-subnet"]
    assert [r.name for r in run.of_type("gcp:bigquery/dataset:Dataset")] == ["acme-dataset"]
    vpc = run.one("gcp:compute/network:Network", "acme-vpc")
    subnet = run.one("gcp:compute/subnetwork:Subnetwork", "acme-subnet")
    dataset = run.one("gcp:bigquery/dataset:Dataset", "acme-dataset")
    project = run.config["gcp:project"]
    subnet_id = f"projects/{project}/regions/{run.config['gcp:region']}/subnetworks/acme-iot-subnet"

    # Broker hosts: the instance template's interface is in the user's subnet; the firewall rules are on their VPC.
    (template,) = run.of_type("gcp:compute/instanceTemplate:InstanceTemplate")
    (interface,) = template.get("networkInterfaces")
    assert interface["subnetwork"] == subnet_id
    assert run.depends_on(template, subnet)
    firewalls = run.of_type("gcp:compute/firewall:Firewall")
    assert firewalls and {f.get("network") for f in firewalls} == {f"projects/{project}/global/networks/acme-vpc"}
    assert all(run.depends_on(f, vpc) for f in firewalls)

    # Pipeline: the workers run in the user's subnet and write tables in the user's dataset.
    job = run.one("gcp:dataflow/flexTemplateJob:FlexTemplateJob", "iot-pipeline-job")
    assert job.get("subnetwork") == f"https://www.googleapis.com/compute/v1/{subnet_id}"
    assert job.get("parameters")["bigquery_dataset"] == f"{project}.acme_telemetry"
    tables = run.of_type("gcp:bigquery/table:Table")
    assert tables and {t.get("datasetId") for t in tables} == {"acme_telemetry"}
    assert all(run.depends_on(t, dataset) for t in tables)
    assert run.outputs["bigquery_dataset"] == "acme_telemetry"
    assert run.outputs["mqtt_endpoint"] == "203.0.113.7:8883"


def test_a_users_dataset_keeps_its_own_key():
    import pulumi_gcp as gcp

    from gcp_iot_bridge.infra.warehouse import WarehouseArgs

    def program() -> None:
        theirs = gcp.bigquery.Dataset("theirs", project="p", dataset_id="theirs", location="US")
        WarehouseArgs(project="p", dataset_id="theirs", location="US", deletion_protection=True, dataset=theirs,
                      kms_key_name="projects/p/locations/us/keyRings/r/cryptoKeys/k")

    with pytest.raises(harness.ProgramFailed, match="with your own dataset"):
        harness.run_program("dev", program=program)

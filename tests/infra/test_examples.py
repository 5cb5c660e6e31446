"""examples/: a user's own Pulumi program composing the library's components, evaluated under the mocks.

The in-process test runs the example against this checkout; the installed-package test builds a fresh virtualenv,
installs the project into it the way a user would (``pip install .``) and runs the example there, where only the
installed ``gcp_iot_bridge`` can be imported.
"""

from __future__ import annotations

import runpy
from pathlib import Path

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


# The child: in the fresh virtualenv, with the repository off sys.path, run the example under the harness's mocks
# (the harness file is loaded by path; it reads the stack files, never the project's code).
_CHILD = r"""
import importlib.util, json, runpy, sys
spec = importlib.util.spec_from_file_location("harness", sys.argv[1])
harness = sys.modules["harness"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
run = harness.run_program("dev", program=lambda: runpy.run_path(sys.argv[2], run_name="__main__"))
import gcp_iot_bridge, iotbridge
from gcp_iot_bridge.infra import packaging, sources
print(json.dumps({
    "hashes": {d.name: d.package().hash for d in (packaging.BROKER, packaging.CONFIG_PUSH, packaging.PIPELINE)},
    "gcp_iot_bridge": gcp_iot_bridge.__file__, "iotbridge": iotbridge.__file__,
    "source_root": str(sources.SOURCE_ROOT),
    "modules": sorted(str(getattr(m, "__file__", None)) for m in list(sys.modules.values())
                      if getattr(m, "__file__", None)),
    "resources": len(run.resources), "outputs": sorted(run.outputs),
    "jobs": [r.name for r in run.of_type("gcp:dataflow/flexTemplateJob:FlexTemplateJob")],
}))
"""


@pytest.mark.installed
def test_the_example_runs_on_the_installed_package_alone(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    # A clean copy of the project to install from: a build/ left in the checkout could carry stale files.
    src = tmp_path / "src"
    shutil.copytree(harness.ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", ".build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".local-stack",
        "tests", "notebooks", "policy"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    # What a user runs, at the versions the tests ran with. With pip's cache warm it takes about 45 s here;
    # --no-compile leaves byte-compiling to the first import (compiling pulumi-gcp's files alone would double it).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                    str(src), "-c", str(harness.ROOT / "requirements" / "lock.txt")],
                   check=True, timeout=300, cwd=tmp_path, capture_output=True)
    shutil.rmtree(src)  # nothing may be read from the build tree either

    done = subprocess.run([str(python), "-c", _CHILD, str(harness.ROOT / "tests" / "infra" / "harness.py"), str(BYO)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    venv_dir = str(venv.resolve())
    assert result["gcp_iot_bridge"].startswith(venv_dir), result["gcp_iot_bridge"]
    assert result["iotbridge"].startswith(venv_dir), result["iotbridge"]
    # The broker archive, the function's zip and the image's build inputs came from the package data.
    assert result["source_root"] == str(Path(result["gcp_iot_bridge"]).parent / "_sources")
    # ... and are the ones this checkout makes: the package data holds every module a deployable may reach.
    from gcp_iot_bridge.infra import packaging

    assert result["hashes"] == {d.name: d.package().hash
                                for d in (packaging.BROKER, packaging.CONFIG_PUSH, packaging.PIPELINE)}
    from_checkout = [f for f in result["modules"] if f.startswith(str(harness.ROOT) + "/")
                     and f not in (str(harness.ROOT / "tests" / "infra" / "harness.py"), str(BYO))]
    assert not from_checkout, f"imported from the checkout, not the installed package: {from_checkout[:10]}"
    assert result["jobs"] == ["iot-pipeline-job"] and "mqtt_endpoint" in result["outputs"]

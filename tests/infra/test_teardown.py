"""The teardown switch: deletionProtection false (dev, demo) lets one `pulumi destroy` remove everything;
true (prod) protects the data. One value drives every knob."""

from __future__ import annotations

from typing import Any

import pytest

from tests.infra import harness

DESTROYABLE = ("dev", "demo")


def knobs(run: harness.StackRun) -> list[tuple[str, str, Any]]:
    """Every teardown-relevant input of every resource: (type, name, value as protected?)."""
    found = []
    for r in run.resources:
        if "deletionProtection" in r.inputs:
            value = r.get("deletionProtection")
            found.append((r.type, r.name, value in (True, "PROTECTED")))
        if "deleteContentsOnDestroy" in r.inputs:
            found.append((r.type, r.name, r.get("deleteContentsOnDestroy") is False))
        if "forceDestroy" in r.inputs:
            found.append((r.type, r.name, r.get("forceDestroy") is False))
    return found


@pytest.mark.parametrize("stack", DESTROYABLE)
def test_nothing_blocks_destroy_in_dev_and_demo(stack: str) -> None:
    run = harness.stack_run(stack)
    found = knobs(run)
    assert len(found) >= 10, "expected tables, views, dataset, Bigtable instance and table"
    assert [k for k in found if k[2]] == [], "protected resources in a destroyable stack"
    (dataset,) = run.of_type("gcp:bigquery/dataset:Dataset")
    assert dataset.get("deleteContentsOnDestroy") is True
    # pulumi-gcp defaults a table's deletion_protection to true: it must be set explicitly, on views too.
    tables = run.of_type("gcp:bigquery/table:Table")
    assert tables and all(t.get("deletionProtection") is False for t in tables)
    (instance,) = run.of_type("gcp:bigtable/instance:Instance")
    assert instance.get("deletionProtection") is False
    (table,) = run.of_type("gcp:bigtable/table:Table")
    assert table.get("deletionProtection") == "UNPROTECTED"


@pytest.mark.parametrize("stack", harness.STACKS)
def test_no_resource_can_refuse_or_skip_its_deletion_by_policy(stack: str) -> None:
    run = harness.stack_run(stack)
    for r in run.resources:
        policy = r.get("deletionPolicy")
        if r.type == "gcp:bigtable/gCPolicy:GCPolicy":
            # Removed with its table; deleting it alone fails on a replicated instance.
            assert policy == "ABANDON"
        else:
            assert policy in (None, "DELETE"), f"{r.type} {r.name}: deletionPolicy={policy}"


def test_prod_protects_every_store_of_data() -> None:
    run = harness.stack_run("prod")
    found = knobs(run)
    assert len(found) >= 10
    assert [k for k in found if not k[2]] == [], "unprotected data in prod"
    tables = run.of_type("gcp:bigquery/table:Table")
    assert tables and all(t.get("deletionProtection") is True for t in tables)
    (dataset,) = run.of_type("gcp:bigquery/dataset:Dataset")
    assert dataset.get("deleteContentsOnDestroy") is False
    (instance,) = run.of_type("gcp:bigtable/instance:Instance")
    assert instance.get("deletionProtection") is True
    (table,) = run.of_type("gcp:bigtable/table:Table")
    assert table.get("deletionProtection") == "PROTECTED"


def test_one_switch_drives_every_knob() -> None:
    # Flipping only deletionProtection on the dev stack flips every knob, and nothing else about the stack.
    dev = harness.stack_run("dev")
    flipped = harness.run_program("dev", {"deletionProtection": True})
    before, after = sorted(knobs(dev)), sorted(knobs(flipped))
    assert [(t, n) for t, n, _ in before] == [(t, n) for t, n, _ in after]
    assert all(not p for _, _, p in before) and all(p for _, _, p in after)
    assert sorted((r.type, r.name) for r in dev.resources) == sorted((r.type, r.name) for r in flipped.resources)


@pytest.mark.parametrize("stack", harness.STACKS)
def test_destroy_leaves_project_apis_on(stack: str) -> None:
    for service in harness.stack_run(stack).of_type("gcp:projects/service:Service"):
        assert service.get("disableOnDestroy") is False


@pytest.mark.parametrize("stack", DESTROYABLE)
def test_destroy_stops_the_dataflow_job_before_removing_what_it_runs_on(stack: str) -> None:
    """One `pulumi destroy` converges: the job is cancelled and waited for, and Pulumi deletes a resource only after
    everything that depends on it, so the job has stopped before its network, bucket and data go. Its name, fixed,
    is then free for the next `pulumi up`."""
    run = harness.stack_run(stack)
    (job,) = run.of_type("gcp:dataflow/flexTemplateJob:FlexTemplateJob")
    assert (job.get("onDelete"), job.get("skipWaitOnJobTermination")) == ("cancel", False)
    prefix = run.config["gcp-iot-bridge:prefix"]
    used = {
        "subnetwork": run.of_type("gcp:compute/subnetwork:Subnetwork"),
        "network": run.of_type("gcp:compute/network:Network"),
        "worker firewall": [run.one("gcp:compute/firewall:Firewall", "pipeline-workers")],
        "bucket (template, temp, staging)": [run.one("gcp:storage/bucket:Bucket", "pipeline-bucket")],
        "input subscription": [s for s in run.of_type("gcp:pubsub/subscription:Subscription")
                               if s.get("name") == f"{prefix}-telemetry-pipeline"],
        "config-requests topic": [t for t in run.of_type("gcp:pubsub/topic:Topic")
                                  if t.get("name") == f"{prefix}-config-requests"],
        "tables": [t for t in run.of_type("gcp:bigquery/table:Table")
                   if t.get("tableId") in ("telemetry_raw", "telemetry_1m", "telemetry_errors")],
        "Bigtable": run.of_type("gcp:bigtable/instance:Instance") + run.of_type("gcp:bigtable/table:Table"),
        "worker account": [run.one("gcp:serviceaccount/account:Account", "foundation-sa-dataflow")],
    }
    assert [k for k, found in used.items() if not found] == []
    assert len(used["tables"]) == 3
    late = [f"{what}: {r.name}" for what, found in used.items() for r in found if not run.depends_on(job, r)]
    assert late == [], "destroy could delete these while the job still runs"

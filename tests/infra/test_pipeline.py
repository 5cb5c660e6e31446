"""Pipeline under Pulumi mocks: image, template spec and bucket, the Flex Template job, the worker's grants.

Each test builds Foundation (for the worker service account and its project roles) and the Pipeline component
directly, with the resources it reads passed in as the program would. Mocks are set with preview=False; the
program runs to completion (every registration and pending output awaited, an exception inside an ``apply``
fails the run) and the exported outputs are awaited before any assertion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pytest
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from dataflow_jobs.telemetry_pipeline import parse_args
from gcp_iot_bridge.infra.foundation import Foundation, FoundationArgs
from gcp_iot_bridge.infra.pipeline import (
    BUILD_DIR,
    SOURCE_ROOT,
    WRITTEN_TABLES,
    Pipeline,
    PipelineArgs,
    build_context,
    metadata,
    source_hash,
)
from iotbridge import spec
from tests.infra import harness

PROJECT = "my-iot-dev-project"
REGION = "europe-west1"
JOB = "gcp:dataflow/flexTemplateJob:FlexTemplateJob"
IMAGE = "docker-build:index:Image"
TOKEN = harness.MOCK_ACCESS_TOKEN  # what the harness answers getClientConfig with


def run(**overrides: Any) -> harness.StackRun:
    """Build Foundation + Pipeline under mocks with ``PipelineArgs`` overrides; await everything."""
    mocks = harness._Mocks(project=PROJECT)
    monitor = harness._RecordingMonitor(mocks)
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_all_config({"gcp:project": PROJECT})
    pulumi.runtime.set_mocks(mocks, project="gcp-iot-bridge", stack="dev", preview=False, monitor=monitor)
    pulumi_settings.SETTINGS.outputs.clear()

    def program() -> None:
        foundation = Foundation("foundation", FoundationArgs(project=PROJECT, prefix="iot-dev"))
        network = gcp.compute.Network("vpc", project=PROJECT, name="iot-dev-vpc", auto_create_subnetworks=False)
        subnet = gcp.compute.Subnetwork("subnet", project=PROJECT, name="iot-dev-subnet", region=REGION,
                                        network=network.id, ip_cidr_range="10.10.0.0/24",
                                        private_ip_google_access=overrides.pop("_pga", True))
        telemetry = gcp.pubsub.Topic("telemetry", project=PROJECT, name="iot-dev-telemetry")
        requests = gcp.pubsub.Topic("requests", project=PROJECT, name="iot-dev-config-requests")
        sub = gcp.pubsub.Subscription("sub", project=PROJECT, name="iot-dev-telemetry-pipeline",
                                      topic=telemetry.id)
        tables = {t: gcp.bigquery.Table(f"table-{t}", project=PROJECT, dataset_id="iot", table_id=t,
                                        deletion_protection=False)
                  for t in (*WRITTEN_TABLES, "device_logs")}
        args = PipelineArgs(
            project=PROJECT, region=REGION, prefix="iot-dev",
            worker_service_account=foundation.service_accounts["dataflow"], subnetwork=subnet,
            input_subscription=sub, config_requests_topic=requests, dataset_id="iot", tables=tables,
            bigtable_instance="iot-dev-tsdb", bigtable_table="telemetry", deletion_protection=False,
            threshold_rules='{"temperature": {"above": 80, "config": {"fan": "max"}}}',
            max_workers=4, labels={"app": "gcp-iot-bridge", "stack": "dev"},
            depends_on=foundation.needs("dataflow.googleapis.com", "artifactregistry.googleapis.com"))
        pipeline = Pipeline("pipeline", dataclasses.replace(args, **overrides))
        pulumi.export("dataflow_job_name", pipeline.job.name)
        pulumi.export("template_path", pipeline.template_path)
        pulumi.export("image", pipeline.image_ref)
        pulumi.export("worker", foundation.service_accounts["dataflow"].member)

    try:
        _sync_await(run_pulumi_func(program))
        outputs = _sync_await(harness._resolve_outputs())
    except Exception as exc:
        raise harness.ProgramFailed(f"{type(exc).__name__}: {exc}", list(monitor.registrations)) from exc
    return harness.StackRun(stack="dev", config={}, resources=list(monitor.registrations), outputs=outputs)


@pytest.fixture(scope="module")
def dev() -> harness.StackRun:
    return run()


@pytest.fixture(scope="module")
def prod() -> harness.StackRun:
    return run(deletion_protection=True)


def test_job_is_private_streaming_engine_with_the_worker_account(dev: harness.StackRun) -> None:
    (job,) = dev.of_type(JOB)
    assert job.get("name") == "iot-dev-telemetry" == dev.outputs["dataflow_job_name"]
    assert job.get("region") == REGION
    assert job.get("ipConfiguration") == "WORKER_IP_PRIVATE"
    assert job.get("enableStreamingEngine") is True
    assert job.get("maxWorkers") == 4 and job.get("numWorkers") == 1
    # Streaming Engine autoscales by default; the launch API has no THROUGHPUT_BASED (test_api_schema holds any
    # value sent to its enum).
    assert "autoscalingAlgorithm" not in job.inputs
    assert job.get("serviceAccountEmail") == f"iot-dev-dataflow@{PROJECT}.iam.gserviceaccount.com"
    assert job.get("subnetwork").endswith(f"/regions/{REGION}/subnetworks/iot-dev-subnet")
    assert job.get("labels") == {"app": "gcp-iot-bridge", "stack": "dev"}
    assert job.get("containerSpecGcsPath") == dev.outputs["template_path"]
    assert job.get("sdkContainerImage") == dev.outputs["image"]  # workers run the launcher's image
    assert job.get("tempLocation") == f"gs://{PROJECT}-iot-dev-dataflow/tmp"
    assert "create_or_update_job" in job.get("additionalExperiments")


def test_teardown_follows_the_switch_and_always_waits_for_the_job_to_stop(dev: harness.StackRun,
                                                                        prod: harness.StackRun) -> None:
    (dev_job,) = dev.of_type(JOB)
    (prod_job,) = prod.of_type(JOB)
    # Skipping the wait would let destroy remove the subnetwork and bucket under a cancelling job, and make the
    # next launch under the same name fail while the old job is still active.
    assert (dev_job.get("onDelete"), dev_job.get("skipWaitOnJobTermination")) == ("cancel", False)
    assert (prod_job.get("onDelete"), prod_job.get("skipWaitOnJobTermination")) == ("drain", False)
    dev_bucket = dev.one("gcp:storage/bucket:Bucket", "pipeline-bucket")
    prod_bucket = prod.one("gcp:storage/bucket:Bucket", "pipeline-bucket")
    assert dev_bucket.get("forceDestroy") is True and prod_bucket.get("forceDestroy") is False


def test_parameters_are_the_templates_own_and_pass_its_regexes(dev: harness.StackRun) -> None:
    (job,) = dev.of_type(JOB)
    params = job.get("parameters")
    assert params == {
        "input_subscription": f"projects/{PROJECT}/subscriptions/iot-dev-telemetry-pipeline",
        "bigquery_dataset": f"{PROJECT}.iot",
        "bigtable_instance": f"projects/{PROJECT}/instances/iot-dev-tsdb",
        "bigtable_table": "telemetry",
        "config_requests_topic": f"projects/{PROJECT}/topics/iot-dev-config-requests",
        "threshold_rules": '{"temperature":{"above":80,"config":{"fan":"max"}}}',
        "rule_min_interval_seconds": "300",
        "allowed_lateness_seconds": "900",
        "dedupe_seconds": "600",
        "payload_profiles": '{"default":["telemetry-v1","json"]}',
    }
    specs = {p["name"]: p for p in metadata()["parameters"]}
    for name, value in params.items():
        assert all(re.match(r, value) for r in specs[name]["regexes"]), name


def test_payload_profiles_reach_the_job_as_the_pipelines_flag() -> None:
    text = '{"registries": {"plant": [{"profile": "json", "time_field": "meta.at"}]}, "default": ["json"]}'
    (job,) = run(payload_profiles=text).of_type(JOB)
    value = job.get("parameters")["payload_profiles"]
    assert value == '{"default":["json"],"registries":{"plant":[{"profile":"json","time_field":"meta.at"}]}}'
    settings, _ = parse_args([f"--{k}={v}" for k, v in job.get("parameters").items()])
    assert settings.profiles.for_message("plant", None) == (spec.Profile("json", "meta.at"),)
    with pytest.raises(harness.ProgramFailed, match=r"payload_profiles: default\[0\]: profile 'csv'"):
        run(payload_profiles='{"default": ["csv"]}')


def test_the_stack_config_key_reaches_the_job() -> None:
    text = '{"subfolders": {"iot-dev-registry/blobs": ["raw"]}}'
    (job,) = harness.run_program("dev", {"gcp-iot-bridge:pipelinePayloadProfiles": text}).of_type(JOB)
    assert json.loads(job.get("parameters")["payload_profiles"])["subfolders"] == {"iot-dev-registry/blobs": ["raw"]}


def test_bad_parameter_fails_the_deploy_naming_it() -> None:
    with pytest.raises(harness.ProgramFailed, match=r"rule_min_interval_seconds=.0. does not match"):
        run(rule_min_interval_seconds=0)


def test_subnet_without_private_google_access_fails_the_deploy() -> None:
    with pytest.raises(harness.ProgramFailed, match="no Private Google Access"):
        run(_pga=False)


def test_image_built_and_pushed_to_our_repository_and_pinned_by_digest(dev: harness.StackRun) -> None:
    repo = dev.one("gcp:artifactregistry/repository:Repository", "pipeline-images")
    assert (repo.get("repositoryId"), repo.get("format"), repo.get("location")) == (
        "iot-dev-dataflow", "DOCKER", REGION)
    (image,) = dev.of_type(IMAGE)
    assert image.get("push") is True and image.get("buildOnPreview") is False
    assert image.get("tags") == [
        f"{REGION}-docker.pkg.dev/{PROJECT}/iot-dev-dataflow/telemetry-pipeline:{source_hash()}"]
    # Relative paths (from where pulumi runs): no diff between checkouts.
    assert image.get("dockerfile")["location"] == os.path.relpath(SOURCE_ROOT / "dataflow_jobs" / "Dockerfile")
    # The context is the staged build context, holding exactly what build_context() says.
    assert image.get("context")["location"] == os.path.relpath(BUILD_DIR)
    staged = {str(f.relative_to(BUILD_DIR)) for f in BUILD_DIR.rglob("*") if f.is_file()}
    assert staged == set(build_context())
    assert not os.path.isabs(image.get("context")["location"])
    assert image.get("platforms") == ["linux/amd64"]
    # The access token makes the registry credentials a secret: encrypted in the state, masked in diffs.
    registries = image.get("registries")
    assert registries[rpc._special_sig_key] == rpc._special_secret_sig
    (registry,) = registries["value"]
    assert registry == {"address": f"{REGION}-docker.pkg.dev", "username": "oauth2accesstoken", "password": TOKEN}
    assert re.fullmatch(rf"{re.escape(image.get('tags')[0])}@sha256:[0-9a-f]{{64}}", dev.outputs["image"])
    assert dev.depends_on(image, repo)


def test_template_spec_names_the_image_and_carries_the_metadata(dev: harness.StackRun) -> None:
    bucket = dev.one("gcp:storage/bucket:Bucket", "pipeline-bucket")
    assert bucket.get("name") == f"{PROJECT}-iot-dev-dataflow"
    assert bucket.get("uniformBucketLevelAccess") is True
    assert bucket.get("publicAccessPrevention") == "enforced"
    obj = dev.one("gcp:storage/bucketObject:BucketObject", "pipeline-template")
    content = obj.get("content")  # pulumi-gcp marks object content secret
    spec = json.loads(content["value"] if isinstance(content, dict) else content)
    assert spec == {"image": dev.outputs["image"], "sdkInfo": {"language": "PYTHON"}, "metadata": metadata()}
    digest_name = hashlib.sha256(dev.outputs["image"].encode()).hexdigest()[:16]
    assert obj.get("name") == f"templates/telemetry-pipeline-{digest_name}.json"
    assert dev.outputs["template_path"] == f"gs://{bucket.get('name')}/{obj.get('name')}"


def test_a_new_image_is_a_new_template_path() -> None:
    """What makes the provider update the running job: the job's container_spec_gcs_path changes with the image."""
    a = run(prebuilt_image=f"{REGION}-docker.pkg.dev/{PROJECT}/r/telemetry-pipeline@sha256:" + "a" * 64)
    b = run(prebuilt_image=f"{REGION}-docker.pkg.dev/{PROJECT}/r/telemetry-pipeline@sha256:" + "b" * 64)
    (job_a,), (job_b,) = a.of_type(JOB), b.of_type(JOB)
    assert job_a.get("name") == job_b.get("name")  # same job, updated in place
    assert job_a.get("containerSpecGcsPath") != job_b.get("containerSpecGcsPath")
    assert job_b.get("sdkContainerImage").endswith("b" * 64)
    # A prebuilt image needs no repository or build.
    assert a.of_type(IMAGE) == [] and a.of_type("gcp:artifactregistry/repository:Repository") == []


def test_worker_account_has_dataflow_worker_and_only_the_data_roles_it_needs(dev: harness.StackRun) -> None:
    worker = dev.outputs["worker"]
    grants = sorted(
        (r.type.split(":")[1], r.get("role"),
         r.get("subscription") or r.get("topic") or r.get("tableId") or r.get("table") or r.get("bucket")
         or r.get("repository") or r.get("project"))
        for r in dev.resources if r.get("member") == worker)
    assert grants == sorted([
        ("projects/iAMMember", "roles/dataflow.worker", PROJECT),
        ("projects/iAMMember", "roles/logging.logWriter", PROJECT),
        ("projects/iAMMember", "roles/monitoring.metricWriter", PROJECT),
        ("pubsub/subscriptionIAMMember", "roles/pubsub.subscriber", "iot-dev-telemetry-pipeline"),
        ("pubsub/subscriptionIAMMember", "roles/pubsub.viewer", "iot-dev-telemetry-pipeline"),
        ("pubsub/topicIAMMember", "roles/pubsub.publisher", "iot-dev-config-requests"),
        ("bigquery/iamMember", "roles/bigquery.dataEditor", "telemetry_raw"),
        ("bigquery/iamMember", "roles/bigquery.dataEditor", "telemetry_1m"),
        ("bigquery/iamMember", "roles/bigquery.dataEditor", "telemetry_errors"),
        ("bigtable/tableIamMember", "roles/bigtable.user", "telemetry"),
        ("storage/bucketIAMMember", "roles/storage.objectAdmin", f"{PROJECT}-iot-dev-dataflow"),
        ("artifactregistry/repositoryIamMember", "roles/artifactregistry.reader", "iot-dev-dataflow"),
    ])


def test_job_waits_for_grants_firewall_and_apis(dev: harness.StackRun) -> None:
    (job,) = dev.of_type(JOB)
    for r in dev.resources:
        if r.get("member") == dev.outputs["worker"] and r.type != "gcp:projects/iAMMember:IAMMember":
            assert dev.depends_on(job, r), r.name
    fw = dev.one("gcp:compute/firewall:Firewall", "pipeline-workers")
    assert fw.get("allows") == [{"protocol": "tcp", "ports": ["12345-12346"]}]
    assert fw.get("sourceTags") == fw.get("targetTags") == ["dataflow"]
    assert fw.get("network") == f"projects/{PROJECT}/global/networks/iot-dev-vpc"
    assert dev.depends_on(job, fw)
    api = dev.one("gcp:projects/service:Service", "foundation-dataflow")
    assert dev.depends_on(job, api)


def test_component_type_and_parenting(dev: harness.StackRun) -> None:
    (component,) = dev.of_type("gcp-iot-bridge:index:Pipeline")
    (job,) = dev.of_type(JOB)
    assert job.parent == component.urn


def test_args_refuse_bad_worker_bounds() -> None:
    with pytest.raises(harness.ProgramFailed, match="num_workers <= max_workers"):
        run(num_workers=5, max_workers=2)

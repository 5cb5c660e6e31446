"""EdgeMl under Pulumi mocks: a private versioned models bucket, the signer identity and its grants, and the
BigQuery ML train / export / SavedModel jobs with deterministic ids (built directly, via harness.run_program,
which awaits every registration and output before the assertions)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pulumi
import pytest

from gcp_iot_bridge.infra.edge_ml import EdgeMl, EdgeMlArgs, job_id
from tests.infra.harness import StackRun, run_program

BUCKET = "gcp:storage/bucket:Bucket"
BUCKET_IAM = "gcp:storage/bucketIAMMember:BucketIAMMember"
SA = "gcp:serviceaccount/account:Account"
SA_IAM = "gcp:serviceaccount/iAMMember:IAMMember"
JOB = "gcp:bigquery/job:Job"
PROJECT = "my-iot-dev-project"
OPERATORS = "group:iot-operators@example.com"


def base_args(**overrides) -> EdgeMlArgs:
    args = EdgeMlArgs(project=PROJECT, prefix="iot-dev", location="EU", dataset_id="iot", deletion_protection=False,
                      metrics=("temperature", "rpm"), model_version="v3", train=True,
                      signer_members=(OPERATORS,), labels={"app": "gcp-iot-bridge", "stack": "dev"})
    return dataclasses.replace(args, **overrides)


def build(stack: str = "dev", **overrides) -> StackRun:
    def program() -> None:
        ml = EdgeMl("edge-ml", base_args(**overrides))
        pulumi.export("models_bucket", ml.bucket.name)
        pulumi.export("models_signer", ml.signer.email)
        pulumi.export("artifact_uri", ml.artifact_uri or "")

    return run_program(stack, program=program)


def jobs(run: StackRun) -> dict[str, dict]:
    return {r.name.removeprefix("edge-ml-"): r for r in run.of_type(JOB)}


def test_bucket_is_private_versioned_co_located_and_destroyable_in_dev():
    run = build()
    (b,) = run.of_type(BUCKET)
    assert b.get("name") == f"{PROJECT}-iot-dev-models"
    assert b.get("location") == "EU"  # the dataset's: BigQuery exports only to a co-located bucket
    assert b.get("uniformBucketLevelAccess") is True
    assert b.get("publicAccessPrevention") == "enforced"
    assert b.get("versioning") == {"enabled": True}
    assert b.get("forceDestroy") is True
    (rule,) = b.get("lifecycleRules")
    assert rule["action"]["type"] == "Delete" and rule["condition"]["withState"] == "ARCHIVED"
    assert run.outputs["models_bucket"] == f"{PROJECT}-iot-dev-models"


def test_prod_bucket_is_not_force_destroyed():
    (b,) = build(deletion_protection=True).of_type(BUCKET)
    assert b.get("forceDestroy") is False


def test_iam_signer_reads_operators_sign_nobody_public():
    run = build(readers=("serviceAccount:serving@p.iam.gserviceaccount.com",))
    (signer,) = run.of_type(SA)
    assert signer.get("accountId") == "iot-dev-models-signer"
    email = f"iot-dev-models-signer@{PROJECT}.iam.gserviceaccount.com"
    grants = {(g.get("role"), g.get("member")) for g in run.of_type(BUCKET_IAM)}
    assert grants == {("roles/storage.objectViewer", f"serviceAccount:{email}"),
                      ("roles/storage.objectViewer", "serviceAccount:serving@p.iam.gserviceaccount.com")}
    assert all(g.get("bucket") == f"{PROJECT}-iot-dev-models" for g in run.of_type(BUCKET_IAM))
    (tc,) = run.of_type(SA_IAM)
    assert (tc.get("role"), tc.get("member")) == ("roles/iam.serviceAccountTokenCreator", OPERATORS)
    assert tc.get("serviceAccountId") == f"projects/{PROJECT}/serviceAccounts/{email}"  # on the signer only
    everything = [r for r in run.resources if "member" in r.inputs]
    assert not [r for r in everything if r.get("member") in ("allUsers", "allAuthenticatedUsers")]
    assert not run.of_type("gcp:projects/iAMMember:IAMMember")  # nothing project-wide
    assert run.outputs["models_signer"] == email


@pytest.mark.parametrize("member", ["allUsers", "allAuthenticatedUsers", "someone@example.com"])
def test_public_or_malformed_members_refused(member):
    with pytest.raises(ValueError, match="never public"):
        base_args(readers=(member,))
    with pytest.raises(ValueError, match="never public"):
        base_args(signer_members=(member,))


def test_no_jobs_until_training_is_enabled():
    run = build(train=False)
    assert run.of_type(JOB) == []
    assert len(run.of_type(BUCKET)) == 1 and run.outputs["artifact_uri"] == ""


def test_train_job_is_a_ddl_query_job_in_the_dataset_location():
    j = jobs(build())["train"]
    q = j.get("query")
    assert q["query"].startswith("CREATE OR REPLACE MODEL `my-iot-dev-project.iot.edge_anomaly`")
    assert "model_type = 'KMEANS'" in q["query"] and "num_clusters = 4" in q["query"]
    assert "FROM `my-iot-dev-project.iot.telemetry_raw`" in q["query"]
    assert q["useLegacySql"] is False  # the jobs API defaults to legacy SQL
    assert q["createDisposition"] == "" and q["writeDisposition"] == ""  # not the provider's defaults
    assert j.get("location") == "EU" and j.get("project") == PROJECT
    assert j.get("labels")["model-version"] == "v3" and j.get("labels")["step"] == "train"


def test_export_writes_the_artifact_to_the_bucket_after_training():
    run = build()
    js = jobs(run)
    q = js["export"].get("query")
    assert q["query"].startswith("EXPORT DATA OPTIONS (uri = "
                                 f"'gs://{PROJECT}-iot-dev-models/edge/v3/model-*.json', format = 'JSON', "
                                 "overwrite = false)")
    assert "ML.CENTROIDS(MODEL `my-iot-dev-project.iot.edge_anomaly`)" in q["query"]
    assert "ML.FEATURE_INFO(MODEL `my-iot-dev-project.iot.edge_anomaly`)" in q["query"]
    assert q["createDisposition"] == "" and q["writeDisposition"] == "" and q["useLegacySql"] is False
    (bucket,) = run.of_type(BUCKET)
    assert run.depends_on(js["export"], js["train"]) and run.depends_on(js["export"], bucket)
    assert run.outputs["artifact_uri"] == f"gs://{PROJECT}-iot-dev-models/edge/v3/model-000000000000.json"


def test_savedmodel_extract_job():
    run = build()
    js = jobs(run)
    ex = js["savedmodel"].get("extract")
    assert ex["destinationFormat"] == "ML_TF_SAVED_MODEL"
    assert ex["destinationUris"] == [f"gs://{PROJECT}-iot-dev-models/edge/v3/savedmodel"]
    assert ex["sourceModel"] == {"projectId": PROJECT, "datasetId": "iot", "modelId": "edge_anomaly"}
    assert run.depends_on(js["savedmodel"], js["train"])


def test_job_ids_deterministic_valid_and_new_per_change():
    first = {k: v.get("jobId") for k, v in jobs(build()).items()}
    assert first == {k: v.get("jobId") for k, v in jobs(build()).items()}  # previews settle
    for jid in first.values():
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,1024}", jid), jid
        assert jid.startswith("iot-dev_edge_ml_")
    assert len(set(first.values())) == 3
    retrained = {k: v.get("jobId") for k, v in jobs(build(num_clusters=6)).items()}
    assert all(retrained[k] != first[k] for k in first)  # new model → new train, export and SavedModel jobs
    bumped = {k: v.get("jobId") for k, v in jobs(build(model_version="v4")).items()}
    assert all(bumped[k] != first[k] for k in first)


def test_job_id_carries_the_bucket_incarnation():
    a = job_id("iot-dev", "train", "v1.2", "SELECT 1", "20261127140000")
    b = job_id("iot-dev", "train", "v1.2", "SELECT 1", "20261201090000")
    assert a != b and a.endswith("_20261127140000") and "v1_2" in a


@pytest.mark.parametrize("bad, message", [
    ({"metrics": ()}, "at least one metric"),
    ({"metrics": ("bad-name",)}, "cannot be a model feature"),
    ({"num_clusters": 1}, "num_clusters"),
    ({"contamination": 0.6}, "contamination"),
    ({"model_version": "v 1"}, "model_version"),
])
def test_invalid_args_fail_before_any_resource(bad, message):
    with pytest.raises(ValueError, match=message):
        base_args(**bad)


def _policy_rules():
    path = Path(__file__).resolve().parents[2] / "policy" / "rules.py"
    spec = importlib.util.spec_from_file_location("edge_ml_policy_rules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stack, protect", [("dev", False), ("prod", True)])
def test_the_policy_pack_passes_on_the_component(stack, protect):
    rules = _policy_rules()
    run = build(stack, deletion_protection=protect, readers=("serviceAccount:serving@p.iam.gserviceaccount.com",))
    resources = [rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in run.resources]
    ctx = rules.StackContext.from_config(run.config, run.stack)
    assert ctx.protect is protect
    failing = {k: v for k, v in rules.evaluate(resources, ctx).items() if v}
    assert failing == {}
    # ... and it does look at what it guards here: the bucket's teardown knob flipped is caught.
    flipped = build(stack, deletion_protection=not protect)
    flipped_resources = [rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in flipped.resources]
    assert any(v for v in rules.evaluate(flipped_resources, ctx).values())

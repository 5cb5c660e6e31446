"""Foundation under mocks: every API enabled (and left on at destroy), every resource waits for its API,
one service account per workload with narrow roles."""

from __future__ import annotations

import pytest

from gcp_iot_bridge.infra import foundation as fnd
from tests.infra import harness

SERVICE = "gcp:projects/service:Service"

# Which API each resource type calls. A type missing here fails the test below: a new component must say which
# API it needs (and depend on it) rather than race its enablement.
API_OF_TYPE_PREFIX = {
    "gcp:pubsub/": "pubsub.googleapis.com",
    "gcp:bigquery/": "bigquery.googleapis.com",
    "gcp:bigtable/": "bigtableadmin.googleapis.com",
    "gcp:serviceaccount/": "iam.googleapis.com",
    "gcp:projects/iAMMember": "cloudresourcemanager.googleapis.com",
    "gcp:projects/iAMCustomRole": "iam.googleapis.com",  # projects.roles.create is an IAM API call
    "gcp:compute/": "compute.googleapis.com",
    "gcp:storage/": "storage.googleapis.com",
    "gcp:cloudfunctionsv2/": "cloudfunctions.googleapis.com",
    "gcp:cloudrunv2/": "run.googleapis.com",
    "gcp:secretmanager/": "secretmanager.googleapis.com",
    "gcp:firestore/": "firestore.googleapis.com",
    "gcp:artifactregistry/": "artifactregistry.googleapis.com",
    "gcp:dataflow/": "dataflow.googleapis.com",
    "gcp:monitoring/": "monitoring.googleapis.com",
    "gcp:eventarc/": "eventarc.googleapis.com",
    "gcp:workbench/": "notebooks.googleapis.com",
    "gcp:kms/": "cloudkms.googleapis.com",
}


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def test_every_api_the_stack_uses_is_enabled_and_left_on_at_destroy(run: harness.StackRun) -> None:
    services = {s.get("service"): s for s in run.of_type(SERVICE)}
    assert set(services) == set(fnd.APIS)
    for needed in ("pubsub", "bigquery", "bigtableadmin", "bigtable", "dataflow", "cloudfunctions", "run", "eventarc",
                   "cloudbuild", "artifactregistry", "firestore", "secretmanager", "compute", "monitoring",
                   "iam", "storage", "logging", "aiplatform", "cloudresourcemanager"):
        assert f"{needed}.googleapis.com" in services, needed
    for api, s in services.items():
        assert s.get("disableOnDestroy") is False, f"{api}: destroy would switch the API off for the project"
        assert s.get("disableDependentServices") is False, api
        assert s.get("project") == run.config["gcp:project"]


def test_every_cloud_resource_waits_for_the_api_it_calls(run: harness.StackRun) -> None:
    apis = {s.get("service"): s for s in run.of_type(SERVICE)}
    checked = 0
    for res in run.resources:
        if not res.type.startswith("gcp:") or res.type in (SERVICE, "gcp:projects/serviceIdentity:ServiceIdentity"):
            continue
        api = next((a for p, a in API_OF_TYPE_PREFIX.items() if res.type.startswith(p)), None)
        assert api is not None, f"{res.type}: which API does it need? add it to API_OF_TYPE_PREFIX"
        assert run.depends_on(res, apis[api]), f"{res.type} {res.name} does not wait for {api}"
        checked += 1
    assert checked > 30


# Data APIs a resource's workload calls once it runs, beyond the API that creates the resource: the Dataflow
# workers read Pub/Sub and write BigQuery and Bigtable (the Bigtable data API is bigtable.googleapis.com;
# bigtableadmin only creates instances and tables).
RUNTIME_APIS_OF_TYPE = {
    "gcp:dataflow/flexTemplateJob:FlexTemplateJob": (
        "pubsub.googleapis.com", "bigquery.googleapis.com", "bigtable.googleapis.com"),
}


def test_workloads_wait_for_the_data_apis_they_call(run: harness.StackRun) -> None:
    apis = {s.get("service"): s for s in run.of_type(SERVICE)}
    for rtype, needed in RUNTIME_APIS_OF_TYPE.items():
        (resource,) = run.of_type(rtype)
        for api in needed:
            assert api in apis, f"{api} is not enabled"
            assert run.depends_on(resource, apis[api]), f"{rtype} does not wait for {api}"


def test_service_agent_identities_are_generated_after_their_api(run: harness.StackRun) -> None:
    apis = {s.get("service"): s for s in run.of_type(SERVICE)}
    identities = {i.get("service"): i for i in run.of_type("gcp:projects/serviceIdentity:ServiceIdentity")}
    assert "pubsub.googleapis.com" in identities
    for api, identity in identities.items():
        assert run.depends_on(identity, apis[api])


def test_agent_grants_wait_for_the_agent_to_exist(run: harness.StackRun) -> None:
    agent = run.one("gcp:projects/serviceIdentity:ServiceIdentity", "foundation-pubsub-agent")
    member = f"serviceAccount:service-{harness.PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
    grants = [r for r in run.resources if r.get("member") == member]
    assert len(grants) >= 4
    for grant in grants:
        assert run.depends_on(grant, agent), f"{grant.type} {grant.name} may run before the agent exists"


def test_one_service_account_per_workload_named_from_the_prefix(run: harness.StackRun) -> None:
    prefix = run.config["gcp-iot-bridge:prefix"]
    accounts = {a.name: a.get("accountId") for a in run.of_type("gcp:serviceaccount/account:Account")}
    assert accounts == {
        "foundation-sa-bridge": f"{prefix}-bridge",
        "foundation-sa-dataflow": f"{prefix}-dataflow",
        "foundation-sa-config-push": f"{prefix}-cfgpush",
        "foundation-sa-admin-api": f"{prefix}-adminapi",
        # Identities the components own: the function's build and Eventarc trigger, the host registrar's runtime and
        # build, the model-URL signer.
        "config-push-build-sa": f"{prefix}-cfgbuild",
        "config-push-trigger-sa": f"{prefix}-cfgtrig",
        "broker-registrar-sa": f"{prefix}-hostreg",
        "broker-registrar-build-sa": f"{prefix}-regbuild",
        "edge-ml-signer": f"{prefix}-models-signer",
    }
    for account_id in accounts.values():
        assert 6 <= len(account_id) <= 30


def test_workload_roles_are_narrow(run: harness.StackRun) -> None:
    project = run.config["gcp:project"]
    grants = {(g.get("member"), g.get("role")) for g in run.of_type("gcp:projects/iAMMember:IAMMember")}
    sa = f"{run.config['gcp-iot-bridge:prefix']}-dataflow@{project}.iam.gserviceaccount.com"
    assert (f"serviceAccount:{sa}", "roles/dataflow.worker") in grants
    prefix = run.config["gcp-iot-bridge:prefix"]

    def account(suffix: str) -> str:
        return f"serviceAccount:{prefix}-{suffix}@{project}.iam.gserviceaccount.com"

    observability = {"roles/logging.logWriter", "roles/monitoring.metricWriter"}
    # Every project-level role, by who holds it. Data roles are granted on single resources, not here.
    allowed = {
        account("dataflow"): observability | {"roles/dataflow.worker"},
        # datastore.user conditioned on the registry database; no Pub/Sub role: the host registrar makes each host's
        # subscription and grants the hosts subscriber on it alone.
        account("bridge"): observability | {"roles/datastore.user"},
        # The host registrar: create, get, setIamPolicy and delete a subscription named after a VM not yet made
        # (Pub/Sub takes no IAM condition; test_broker.py holds the role to exactly these), and its build account.
        account("hostreg"): {f"projects/{project}/roles/{prefix.replace('-', '_')}_host_registrar"},
        account("regbuild"): {"roles/cloudbuild.builds.builder"},
        account("cfgpush"): observability | {"roles/datastore.user"},  # conditioned on the registry database
        account("adminapi"): observability | {"roles/datastore.user"},  # conditioned on the registry database
        account("cfgbuild"): {"roles/cloudbuild.builds.builder"},
        "serviceAccount:service-123456789012@gcp-sa-eventarc.iam.gserviceaccount.com": {"roles/eventarc.serviceAgent"},
    }
    for member, role in grants:
        assert role in allowed.get(member, set()), f"{member} holds {role} on the whole project"
    for g in run.of_type("gcp:projects/iAMMember:IAMMember"):
        if g.get("role") == "roles/datastore.user":
            assert g.get("condition"), f"{g.name}: datastore.user must be conditioned on the registry database"


def test_longest_prefix_still_gives_valid_account_ids() -> None:
    prefix = "a" * 16  # the longest prefix config.py allows
    for workload in fnd.WORKLOADS.values():
        assert len(f"{prefix}-{workload.account_suffix}") <= 30
        assert len(f"abc-{workload.account_suffix}") >= 6


def test_needs_refuses_an_api_foundation_does_not_enable() -> None:
    def program() -> None:
        f = fnd.Foundation("f", fnd.FoundationArgs(project="p-123456", prefix="iot-t",
                                                   apis=("cloudresourcemanager.googleapis.com",
                                                         "iam.googleapis.com")))
        f.needs("pubsub.googleapis.com")

    with pytest.raises(harness.ProgramFailed, match="not enabled by Foundation"):
        harness.run_program("dev", program=program)

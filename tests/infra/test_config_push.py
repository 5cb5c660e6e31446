"""ConfigPush under mocks, built directly (not through the stack program): the function, its source archive
named by content hash, identities, grants to the service agents, the Eventarc trigger, egress and secrets."""

from __future__ import annotations

import re

import pytest

from gcp_iot_bridge.infra import config_push as cpc
from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.registry_database import RegistryDatabase, RegistryDatabaseArgs
from tests.infra import harness

PROJECT = "proj-test-123"
PREFIX = "iot-dev"
FUNCTION = "gcp:cloudfunctionsv2/function:Function"
OBJECT = "gcp:storage/bucketObject:BucketObject"
BUCKET = "gcp:storage/bucket:Bucket"
ACCOUNT = "gcp:serviceaccount/account:Account"
PROJECT_IAM = "gcp:projects/iAMMember:IAMMember"
SA_IAM = "gcp:serviceaccount/iAMMember:IAMMember"
SECRET_IAM = "gcp:secretmanager/secretIamMember:SecretIamMember"
TOPIC_IAM = "gcp:pubsub/topicIAMMember:TopicIAMMember"
RUN_IAM = "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
RUNTIME_EMAIL = f"{PREFIX}-cfgpush@{PROJECT}.iam.gserviceaccount.com"
PUBSUB_AGENT = f"serviceAccount:service-{harness.PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
EVENTARC_AGENT = f"serviceAccount:service-{harness.PROJECT_NUMBER}@gcp-sa-eventarc.iam.gserviceaccount.com"
REQUESTS = f"projects/{PROJECT}/topics/{PREFIX}-config-requests"
DEAD_LETTER = f"projects/{PROJECT}/topics/{PREFIX}-dead-letter"


def build(**overrides) -> harness.StackRun:
    fields = dict(
        project=PROJECT, region="europe-west1", prefix=PREFIX, registry_id="fleet",
        service_account_email=RUNTIME_EMAIL, requests_topic=REQUESTS, dead_letter_topic=DEAD_LETTER,
        mqtt_host="10.10.0.5", mqtt_password_secret=f"{PREFIX}-mqtt-backend-password",
        pubsub_agent=PUBSUB_AGENT, eventarc_agent=EVENTARC_AGENT, deletion_protection=False,
        network="projects/proj-test-123/global/networks/iot",
        subnetwork="projects/proj-test-123/regions/europe-west1/subnetworks/iot-functions",
        mqtt_ca_cert="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    fields.update(overrides)

    def program() -> None:
        registry = RegistryDatabase("registry", RegistryDatabaseArgs(
            project=PROJECT, location="europe-west1", deletion_protection=bool(fields["deletion_protection"])))
        cpc.ConfigPush("config-push", cpc.ConfigPushArgs(registry=registry, **fields))  # type: ignore[arg-type]

    return harness.run_program("dev", program=program)


@pytest.fixture(scope="module")
def run() -> harness.StackRun:
    return build()


def the(run: harness.StackRun, type_: str) -> harness.Resource:
    found = run.of_type(type_)
    assert len(found) == 1, [r.name for r in found]
    return found[0]


def test_function_runtime_entry_point_and_own_accounts(run: harness.StackRun) -> None:
    fn = the(run, FUNCTION)
    assert fn.get("name") == f"{PREFIX}-config-push" and fn.get("location") == "europe-west1"
    build_cfg, service = fn.get("buildConfig"), fn.get("serviceConfig")
    assert build_cfg["runtime"] == "python312" and build_cfg["entryPoint"] == "handle"
    accounts = {a.get("accountId"): a for a in run.of_type(ACCOUNT)}
    assert set(accounts) == {f"{PREFIX}-cfgbuild", f"{PREFIX}-cfgtrig"}
    assert all(6 <= len(a) <= 30 for a in accounts)
    assert build_cfg["serviceAccount"] == (
        f"projects/{PROJECT}/serviceAccounts/{PREFIX}-cfgbuild@{PROJECT}.iam.gserviceaccount.com")
    assert service["serviceAccountEmail"] == RUNTIME_EMAIL
    assert service["ingressSettings"] == "ALLOW_INTERNAL_ONLY"
    assert service["maxInstanceRequestConcurrency"] == 1 and service["maxInstanceCount"] == 10
    assert service["timeoutSeconds"] == 60


def test_eventarc_trigger_on_the_requests_topic_with_retry_and_its_own_identity(run: harness.StackRun) -> None:
    trigger = the(run, FUNCTION).get("eventTrigger")
    assert trigger == {
        "eventType": "google.cloud.pubsub.topic.v1.messagePublished",
        "pubsubTopic": REQUESTS,
        "retryPolicy": "RETRY_POLICY_RETRY",
        "serviceAccountEmail": f"{PREFIX}-cfgtrig@{PROJECT}.iam.gserviceaccount.com",
        "triggerRegion": "europe-west1",
    }
    invoker = the(run, RUN_IAM)
    assert invoker.get("role") == "roles/run.invoker"
    assert invoker.get("name") == f"{PREFIX}-config-push" and invoker.get("location") == "europe-west1"
    assert invoker.get("member") == f"serviceAccount:{PREFIX}-cfgtrig@{PROJECT}.iam.gserviceaccount.com"


def test_service_agent_roles(run: harness.StackRun) -> None:
    project_roles = {(r.get("role"), r.get("member")) for r in run.of_type(PROJECT_IAM)}
    assert ("roles/eventarc.serviceAgent", EVENTARC_AGENT) in project_roles
    token = the(run, SA_IAM)
    assert token.get("role") == "roles/iam.serviceAccountTokenCreator" and token.get("member") == PUBSUB_AGENT
    assert token.get("serviceAccountId") == (
        f"projects/{PROJECT}/serviceAccounts/{PREFIX}-cfgtrig@{PROJECT}.iam.gserviceaccount.com")


def test_runtime_grants_are_narrow_and_exist_before_the_function(run: harness.StackRun) -> None:
    member = f"serviceAccount:{RUNTIME_EMAIL}"
    secret = the(run, SECRET_IAM)
    assert (secret.get("secretId"), secret.get("role"), secret.get("member")) == (
        f"{PREFIX}-mqtt-backend-password", "roles/secretmanager.secretAccessor", member)
    dlq = the(run, TOPIC_IAM)  # mqtt delivery: the dead-letter topic is the only topic it writes
    assert (dlq.get("topic"), dlq.get("role"), dlq.get("member")) == (DEAD_LETTER, "roles/pubsub.publisher", member)
    firestore = [r for r in run.of_type(PROJECT_IAM) if r.get("member") == member]
    assert [r.get("role") for r in firestore] == ["roles/datastore.user"]
    assert f'"projects/{PROJECT}/databases/(default)"' in firestore[0].get("condition")["expression"]
    # No broad role for any identity of this component.
    for r in run.of_type(PROJECT_IAM):
        assert r.get("role") not in {"roles/owner", "roles/editor", "roles/viewer"}
    # A revision that cannot read its secret or the database fails to start: grants first.
    fn = the(run, FUNCTION)
    for grant in (secret, dlq, firestore[0], the(run, SA_IAM)):
        assert run.depends_on(fn, grant), grant.name


def test_secret_env_and_no_secret_in_plain_config(run: harness.StackRun) -> None:
    service = the(run, FUNCTION).get("serviceConfig")
    assert service["secretEnvironmentVariables"] == [{
        "key": "MQTT_PASSWORD", "projectId": PROJECT, "secret": f"{PREFIX}-mqtt-backend-password",
        "version": "latest"}]
    env = service["environmentVariables"]
    assert "MQTT_PASSWORD" not in env
    assert env["CONFIG_DELIVERY"] == "mqtt"
    assert env["MQTT_HOST"] == "10.10.0.5" and env["MQTT_PORT"] == "8883" and env["MQTT_TLS"] == "true"
    assert env["PROJECT_ID"] == PROJECT and env["REGISTRY_ID"] == "fleet" and env["DEAD_LETTER_TOPIC"] == DEAD_LETTER
    assert env["MQTT_CA_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    for r in run.resources:
        assert "PRIVATE KEY" not in repr(r.inputs), r.name


def test_egress_reaches_private_ranges_through_the_vpc(run: harness.StackRun) -> None:
    service = the(run, FUNCTION).get("serviceConfig")
    assert service["directVpcEgress"] == "VPC_EGRESS_PRIVATE_RANGES_ONLY"
    assert service["directVpcNetworkInterfaces"] == [{
        "network": "projects/proj-test-123/global/networks/iot",
        "subnetwork": "projects/proj-test-123/regions/europe-west1/subnetworks/iot-functions"}]
    assert "vpcConnector" not in service

    with_connector = build(network=None, subnetwork=None,
                           vpc_connector="projects/proj-test-123/locations/europe-west1/connectors/iot")
    service = the(with_connector, FUNCTION).get("serviceConfig")
    assert service["vpcConnector"].endswith("/connectors/iot")
    assert service["vpcConnectorEgressSettings"] == "PRIVATE_RANGES_ONLY"
    assert "directVpcNetworkInterfaces" not in service


@pytest.mark.parametrize(("bad", "message"), [
    ({"network": None, "subnetwork": None}, "egress"),
    ({"vpc_connector": "projects/p/locations/r/connectors/c"}, "egress"),
    ({"subnetwork": None}, "egress"),
    ({"mqtt_password_secret": None}, "mqtt_host and mqtt_password_secret"),
    ({"delivery": "fanout"}, "fanout_topic"),
    ({"delivery": "carrier-pigeon"}, "mqtt or fanout"),
    ({"timeout_seconds": 900}, "1..540"),
])
def test_invalid_args_fail_before_any_resource(bad: dict, message: str) -> None:
    with pytest.raises(harness.ProgramFailed, match=message) as err:
        build(**bad)
    # The registry's database is the test program's own, declared before the function.
    assert [r.name for r in err.value.resources if r.type.startswith("gcp:")] == [
        "registry-firestore", "registry-requests-ttl", "registry-changes-ttl"]


def test_fanout_delivery_publishes_to_the_bridge_topic_without_secret_or_vpc() -> None:
    fanout = f"projects/{PROJECT}/topics/{PREFIX}-device-commands"
    run = build(delivery="fanout", fanout_topic=fanout, mqtt_host=None, mqtt_password_secret=None,
                network=None, subnetwork=None)
    service = the(run, FUNCTION).get("serviceConfig")
    env = service["environmentVariables"]
    assert env["CONFIG_DELIVERY"] == "fanout" and env["FANOUT_TOPIC"] == fanout
    assert not any(k.startswith("MQTT_") for k in env)
    for key in ("secretEnvironmentVariables", "directVpcNetworkInterfaces", "vpcConnector"):
        assert key not in service, key
    assert run.of_type(SECRET_IAM) == []
    grants = {(g.get("topic"), g.get("role")) for g in run.of_type(TOPIC_IAM)
              if g.get("member") == f"serviceAccount:{RUNTIME_EMAIL}"}
    assert grants == {(fanout, "roles/pubsub.publisher"), (DEAD_LETTER, "roles/pubsub.publisher")}


def test_source_archive_named_by_content_hash(run: harness.StackRun) -> None:
    obj, bucket = the(run, OBJECT), the(run, BUCKET)
    contents = cpc.archive_contents()
    digest = cpc.content_hash(contents)
    assert obj.get("name") == f"config-push/{digest}.zip"
    assert re.fullmatch(r"[0-9a-f]{24}", digest)
    source = the(run, FUNCTION).get("buildConfig")["source"]["storageSource"]
    assert source == {"bucket": bucket.get("name"), "object": obj.get("name")}
    # The same sources give the same name (previews settle); any changed byte gives a new one (a redeploy).
    assert build().of_type(OBJECT)[0].get("name") == obj.get("name")
    edited = dict(contents)
    edited["main.py"] = contents["main.py"] + b"\n# changed\n"
    assert build(sources=edited).of_type(OBJECT)[0].get("name") != obj.get("name")
    edited = dict(contents)
    edited["iotbridge/registry.py"] = contents["iotbridge/registry.py"] + b"\n"
    assert build(sources=edited).of_type(OBJECT)[0].get("name") != obj.get("name")


def test_archive_holds_the_function_and_the_registry_it_imports() -> None:
    contents = cpc.archive_contents()
    assert set(contents) == {"main.py", "requirements.txt", "iotbridge/__init__.py", "iotbridge/registry.py",
                             "iotbridge/spec.py"}
    assert b"def handle(" in contents["main.py"]
    assert contents["iotbridge/registry.py"] == (packaging.SOURCE_ROOT / "iotbridge" / "registry.py").read_bytes()
    # The config request's format, shared with every producer (iotbridge.spec).
    assert contents["iotbridge/spec.py"] == (packaging.SOURCE_ROOT / "iotbridge" / "spec.py").read_bytes()


def test_function_requirements_are_what_it_imports_at_the_locks_versions() -> None:
    lock = packaging.lock_pins()
    pins = cpc.archive_contents()["requirements.txt"].decode().splitlines()
    assert {packaging.canonical_name(p.partition("==")[0]) for p in pins} == {
        "functions-framework", "paho-mqtt", "google-cloud-pubsub", "google-cloud-firestore", "google-api-core",
        "cryptography"}
    for pin in pins:
        assert lock[packaging.canonical_name(pin.partition("==")[0])] == pin, f"{pin} differs from the lock"


@pytest.mark.parametrize("protect", [False, True])
def test_deletion_protection_drives_the_source_bucket(protect: bool) -> None:
    bucket = the(build(deletion_protection=protect), BUCKET)
    assert bucket.get("forceDestroy") is (not protect)
    assert bucket.get("uniformBucketLevelAccess") is True
    assert bucket.get("publicAccessPrevention") == "enforced"
    assert bucket.get("name") == f"{PROJECT}-{PREFIX}-fn-source"


def test_component_outputs_and_type_token(run: harness.StackRun) -> None:
    comp = the(run, "gcp-iot-bridge:index:ConfigPush")
    children = [r for r in run.resources if r.parent == comp.urn]
    assert {r.type for r in children} >= {FUNCTION, OBJECT, BUCKET, ACCOUNT, RUN_IAM}


# Which API each resource type of this component calls (the same rule as tests/infra/test_foundation.py).
API_OF_TYPE_PREFIX = {
    "gcp:storage/": "storage.googleapis.com",
    "gcp:cloudfunctionsv2/": "cloudfunctions.googleapis.com",
    "gcp:cloudrunv2/": "run.googleapis.com",
    "gcp:secretmanager/": "secretmanager.googleapis.com",
    "gcp:pubsub/": "pubsub.googleapis.com",
    "gcp:serviceaccount/": "iam.googleapis.com",
    "gcp:projects/iAMMember": "cloudresourcemanager.googleapis.com",
}


@pytest.mark.parametrize("delivery", ["mqtt", "fanout"])
def test_wired_to_the_foundation_every_resource_waits_for_its_api(delivery: str) -> None:
    from gcp_iot_bridge.infra.foundation import Foundation, FoundationArgs

    def program() -> None:
        foundation = Foundation("foundation", FoundationArgs(project=PROJECT, prefix=PREFIX))
        mode = ({"delivery": "fanout", "fanout_topic": f"projects/{PROJECT}/topics/{PREFIX}-device-commands"}
                if delivery == "fanout" else
                {"mqtt_host": "10.0.0.2", "mqtt_password_secret": "pw", "vpc_connector": "projects/p/l/c"})
        cpc.ConfigPush("config-push", cpc.ConfigPushArgs(
            project=PROJECT, region="europe-west1", prefix=PREFIX, registry_id="fleet",
            service_account_email=foundation.service_accounts["config-push"].email,
            requests_topic=REQUESTS, dead_letter_topic=DEAD_LETTER,
            pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
            eventarc_agent=foundation.service_agent("eventarc.googleapis.com"),
            deletion_protection=True, depends_on=foundation.needs(*cpc.APIS), **mode,
            registry=RegistryDatabase("registry", RegistryDatabaseArgs(
                project=PROJECT, location="europe-west1", deletion_protection=True,
                depends_on=foundation.needs("firestore.googleapis.com")))))

    run = harness.run_program("dev", program=program)
    apis = {s.get("service"): s for s in run.of_type("gcp:projects/service:Service")}
    assert set(cpc.APIS) <= set(apis)
    comp = the(run, "gcp-iot-bridge:index:ConfigPush")
    mine = [r for r in run.resources if r.parent == comp.urn]
    assert len(mine) >= 12
    for res in mine:
        if not res.type.startswith("gcp:"):
            continue  # the propagation waits (time:index/sleep:Sleep) call no API
        api = next((a for prefix, a in API_OF_TYPE_PREFIX.items() if res.type.startswith(prefix)), None)
        assert api is not None, f"{res.type}: which API does it call?"
        assert run.depends_on(res, apis[api]), f"{res.type} {res.name} does not wait for {api}"
    fn = the(run, FUNCTION)
    for api in ("run.googleapis.com", "eventarc.googleapis.com", "cloudbuild.googleapis.com",
                "artifactregistry.googleapis.com", "firestore.googleapis.com"):
        assert run.depends_on(fn, apis[api]), api
    assert fn.get("serviceConfig")["serviceAccountEmail"] == RUNTIME_EMAIL
    assert fn.get("eventTrigger")["serviceAccountEmail"] != RUNTIME_EMAIL

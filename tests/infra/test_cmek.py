"""CMEK (`kmsKeyName`): the whole program under mocks, with and without a customer-managed key.

With a key, every store of data carries it (Pub/Sub topics, the BigQuery dataset, every Bigtable cluster, every
bucket, the Dataflow job), each Google service agent that encrypts with it holds Encrypter/Decrypter on the key,
and each store waits for its agent's grant (creating a CMEK resource before its agent may use the key fails).
Without a key, nothing carries one and no Cloud KMS resource or API is declared. The policy pack passes on the
CMEK run. A malformed key, or one in a location the stores cannot use, fails config in one line.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

from gcp_iot_bridge.infra import config
from gcp_iot_bridge.infra import foundation as fnd
from iotbridge import spec
from tests.infra import harness
from tests.infra.test_foundation import API_OF_TYPE_PREFIX

N = harness.PROJECT_NUMBER
ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
SERVICE = "gcp:projects/service:Service"
GRANT = "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember"
TOPIC = "gcp:pubsub/topic:Topic"
DATASET = "gcp:bigquery/dataset:Dataset"
BIGTABLE = "gcp:bigtable/instance:Instance"
BUCKET = "gcp:storage/bucket:Bucket"
JOB = "gcp:dataflow/flexTemplateJob:FlexTemplateJob"

# The Google service agents that encrypt this stack's data.
AGENTS = {
    "pubsub.googleapis.com": f"serviceAccount:service-{N}@gcp-sa-pubsub.iam.gserviceaccount.com",
    "bigquery.googleapis.com": f"serviceAccount:bq-{N}@bigquery-encryption.iam.gserviceaccount.com",
    "bigtableadmin.googleapis.com": f"serviceAccount:service-{N}@gcp-sa-bigtable.iam.gserviceaccount.com",
    "storage.googleapis.com": f"serviceAccount:service-{N}@gs-project-accounts.iam.gserviceaccount.com",
    "dataflow.googleapis.com": f"serviceAccount:service-{N}@dataflow-service-producer-prod.iam.gserviceaccount.com",
    "compute.googleapis.com": f"serviceAccount:service-{N}@compute-system.iam.gserviceaccount.com",
}
# Which agents' grants each kind of store must wait for.
STORE_AGENTS = {
    TOPIC: ("pubsub.googleapis.com",),
    DATASET: ("bigquery.googleapis.com",),
    BIGTABLE: ("bigtableadmin.googleapis.com",),
    BUCKET: ("storage.googleapis.com",),
    JOB: ("dataflow.googleapis.com", "compute.googleapis.com"),
}

# A key per stack, in the stack's region; the warehouse moves to that region too (a key serves one location).
STACK_KEYS = {
    "dev": ("projects/iot-keys-123/locations/us-central1/keyRings/iot/cryptoKeys/data", "us-central1"),
    "prod": ("projects/iot-keys-123/locations/europe-west1/keyRings/iot/cryptoKeys/data", "europe-west1"),
}

_asked: list[str] = []


def _bq_agent(args: dict) -> dict:
    _asked.append("bigquery")
    email = f"bq-{N}@bigquery-encryption.iam.gserviceaccount.com"
    return {"email": email, "member": f"serviceAccount:{email}", "id": email, "project": args.get("project")}


def _gcs_agent(args: dict) -> dict:
    _asked.append("storage")
    email = f"service-{N}@gs-project-accounts.iam.gserviceaccount.com"
    return {"emailAddress": email, "member": f"serviceAccount:{email}", "id": email, "project": args.get("project")}


INVOKES = {
    "gcp:bigquery/getDefaultServiceAccount:getDefaultServiceAccount": _bq_agent,
    "gcp:storage/getProjectServiceAccount:getProjectServiceAccount": _gcs_agent,
}


def cmek_run(stack: str) -> harness.StackRun:
    key, region = STACK_KEYS[stack]
    return harness.run_program(stack, {"kmsKeyName": key, "bigqueryLocation": region}, invokes=INVOKES)


@pytest.fixture(scope="module", params=sorted(STACK_KEYS))
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    _asked.clear()
    result = cmek_run(request.param)
    # The BigQuery and Cloud Storage agents exist only once asked for: the program must have asked.
    assert sorted(set(_asked)) == ["bigquery", "storage"]
    return result


def key_of(run: harness.StackRun) -> str:
    return run.config["gcp-iot-bridge:kmsKeyName"]


def grants_by_api(run: harness.StackRun) -> dict[str, harness.Resource]:
    by_member = {g.get("member"): g for g in run.of_type(GRANT)}
    return {api: by_member[member] for api, member in AGENTS.items() if member in by_member}


def _cmek_values(r: harness.Resource) -> list[Any]:
    if r.type == DATASET:
        return [(r.get("defaultEncryptionConfiguration") or {}).get("kmsKeyName")]
    if r.type == BIGTABLE:
        return [c.get("kmsKeyName") for c in r.get("clusters")]
    if r.type == BUCKET:
        return [(r.get("encryption") or {}).get("defaultKmsKeyName")]
    return [r.get("kmsKeyName")]


# ------------------------------------------------------------------------------------------- with a key


def test_every_store_of_data_carries_the_key(run: harness.StackRun) -> None:
    key = key_of(run)
    topics = run.of_type(TOPIC)
    assert len(topics) == len(spec.TOPICS)
    clusters = run.one(BIGTABLE, "timeseries-instance").get("clusters")
    assert len(clusters) == len(config.parse(run.config, run.stack).bigtable_zones)
    buckets = {b.name for b in run.of_type(BUCKET)}
    assert buckets == {"pipeline-bucket", "config-push-source", "broker-code", "edge-ml-models"}
    assert len(run.of_type(DATASET)) == 1 and len(run.of_type(JOB)) == 1
    for type_ in STORE_AGENTS:
        for r in run.of_type(type_):
            assert _cmek_values(r) and all(v == key for v in _cmek_values(r)), f"{r.type} {r.name}: {_cmek_values(r)}"


def test_each_agent_may_use_the_key_and_nothing_else_is_granted_on_it(run: harness.StackRun) -> None:
    grants = run.of_type(GRANT)
    assert {(g.get("cryptoKeyId"), g.get("role"), g.get("member")) for g in grants} == {
        (key_of(run), ROLE, member) for member in AGENTS.values()}
    assert len(grants) == len(AGENTS)


def test_each_store_waits_for_its_agents_key_grant(run: harness.StackRun) -> None:
    grants = grants_by_api(run)
    checked = 0
    for type_, apis in STORE_AGENTS.items():
        for r in run.of_type(type_):
            for api in apis:
                assert run.depends_on(r, grants[api]), f"{r.type} {r.name} may be created before {api}'s key grant"
                checked += 1
    assert checked >= len(spec.TOPICS) + 1 + 1 + 4 + 2


def test_key_grants_wait_for_cloud_kms_and_for_their_agent(run: harness.StackRun) -> None:
    apis = {s.get("service"): s for s in run.of_type(SERVICE)}
    assert set(apis) == set(fnd.APIS) | {"cloudkms.googleapis.com"}
    identities = {i.get("service"): i for i in run.of_type("gcp:projects/serviceIdentity:ServiceIdentity")}
    for api, grant in grants_by_api(run).items():
        assert run.depends_on(grant, apis["cloudkms.googleapis.com"]), api
        assert run.depends_on(grant, apis[api]), api
    # The Bigtable agent is generated before its grant; the Pub/Sub one already was.
    for api in ("bigtableadmin.googleapis.com", "pubsub.googleapis.com"):
        assert run.depends_on(grants_by_api(run)[api], identities[api]), api


def test_every_resource_still_waits_for_its_api(run: harness.StackRun) -> None:
    apis = {s.get("service"): s for s in run.of_type(SERVICE)}
    for res in run.resources:
        if not res.type.startswith("gcp:") or res.type in (SERVICE, "gcp:projects/serviceIdentity:ServiceIdentity"):
            continue
        api = next((a for p, a in API_OF_TYPE_PREFIX.items() if res.type.startswith(p)), None)
        assert api is not None, res.type
        assert run.depends_on(res, apis[api]), f"{res.type} {res.name} does not wait for {api}"


# ----------------------------------------------------------------------------------------- the policy pack


def _rules() -> Any:
    if "rules" in sys.modules:
        return sys.modules["rules"]
    path = harness.ROOT / "policy" / "rules.py"
    module_spec = importlib.util.spec_from_file_location("rules", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["rules"] = module
    module_spec.loader.exec_module(module)
    return module


def test_every_policy_passes_on_the_cmek_stack(run: harness.StackRun) -> None:
    rules = _rules()
    ctx = rules.StackContext.from_config(run.config, run.stack)
    assert ctx.kms_key_name == key_of(run)
    resources = [rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in run.resources]
    found = rules.evaluate(resources, ctx)
    failing = {name: msgs for name, msgs in found.items() if msgs}
    assert failing == {}, "\n".join(f"[{n}] {m}" for n, msgs in failing.items() for m in msgs)


def test_cmek_policy_fails_the_same_stack_without_the_key() -> None:
    """The pass above means something: the program's keyless resources, judged as a CMEK stack, fail."""
    rules = _rules()
    plain = harness.stack_run("dev")
    ctx = rules.StackContext(stack="dev", protect=False, kms_key_name=STACK_KEYS["dev"][0])
    found = rules.evaluate([rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in plain.resources], ctx)
    flagged = found["cmek-when-asked"]
    assert len(flagged) >= len(spec.TOPICS) + 1 + 1 + 4 + 1, flagged


# ------------------------------------------------------------------------------------------ without a key


@pytest.mark.parametrize("stack", harness.STACKS)
def test_without_a_key_nothing_carries_one_and_no_kms_resource_exists(stack: str) -> None:
    plain = harness.stack_run(stack)
    assert config.parse(plain.config, stack).kms_key_name == ""
    assert not [r for r in plain.resources if r.type.startswith("gcp:kms/")]
    assert "cloudkms.googleapis.com" not in {s.get("service") for s in plain.of_type(SERVICE)}
    for type_ in STORE_AGENTS:
        resources = plain.of_type(type_)
        assert resources, type_
        for r in resources:
            assert all(v is None for v in _cmek_values(r)), f"{r.type} {r.name}: {_cmek_values(r)}"
    assert not [r for r in plain.resources if "defaultKmsKeyName" in str(r.inputs)]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("bad", [
    "data",
    "projects/iot-keys-123/locations/us-central1/keyRings/iot",
    "projects/iot-keys-123/locations/us-central1/keyRings/iot/cryptoKeys/data/cryptoKeyVersions/1",
    "projects/IOT/locations/us-central1/keyRings/iot/cryptoKeys/data",
    "//cloudkms.googleapis.com/projects/iot-keys-123/locations/us-central1/keyRings/iot/cryptoKeys/data",
])
def test_malformed_key_fails_config_in_one_line(bad: str) -> None:
    with pytest.raises(harness.ProgramFailed) as err:
        harness.run_program("dev", {"kmsKeyName": bad, "bigqueryLocation": "us-central1"})
    cause = err.value.__cause__
    assert isinstance(cause, config.ConfigError)
    assert err.value.resources == [], "resources were declared before config was validated"
    message = str(cause)
    assert "\n" not in message
    assert message.startswith(f"config gcp-iot-bridge:kmsKeyName={bad}: not a Cloud KMS CryptoKey name; allowed: ")


@pytest.mark.parametrize("overrides, why", [
    ({"kmsKeyName": "projects/iot-keys-123/locations/us-east1/keyRings/iot/cryptoKeys/data",
      "bigqueryLocation": "us-central1"}, "key location us-east1 is not gcp:region=us-central1"),
    ({"kmsKeyName": "projects/iot-keys-123/locations/global/keyRings/iot/cryptoKeys/data",
      "bigqueryLocation": "us-central1"}, "key location global is not gcp:region=us-central1"),
    ({"kmsKeyName": STACK_KEYS["dev"][0]}, "bigqueryLocation=US is not gcp:region=us-central1"),
])
def test_key_the_stores_cannot_use_fails_config_naming_the_key(overrides: dict, why: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(harness.stack_config("dev", overrides), "dev")
    assert str(err.value).startswith("config gcp-iot-bridge:kmsKeyName=")
    assert why in str(err.value) and "\n" not in str(err.value)


def test_key_is_parsed_with_its_location() -> None:
    key, region = STACK_KEYS["prod"]
    cfg = config.parse(harness.stack_config("prod", {"kmsKeyName": key, "bigqueryLocation": region}), "prod")
    assert (cfg.kms_key_name, cfg.kms_key_location) == (key, "europe-west1")
    assert config.parse(harness.stack_config("prod"), "prod").kms_key_location is None


def test_key_grants_are_empty_without_a_key_and_refuse_an_agent_that_holds_none() -> None:
    seen: dict[str, Any] = {}

    def program() -> None:
        plain = fnd.Foundation("plain", fnd.FoundationArgs(project="p-123456", prefix="iot-t"))
        seen["plain"] = plain.key_grants("pubsub.googleapis.com", "storage.googleapis.com")
        keyed = fnd.Foundation("keyed", fnd.FoundationArgs(project="p-123456", prefix="iot-k",
                                                           kms_key_name=STACK_KEYS["dev"][0]))
        seen["keyed"] = keyed.key_grants("storage.googleapis.com")
        keyed.key_grants("firestore.googleapis.com")

    with pytest.raises(harness.ProgramFailed, match="no key grant for .'firestore.googleapis.com'."):
        harness.run_program("dev", program=program, invokes=INVOKES)
    assert seen["plain"] == []
    assert len(seen["keyed"]) == 2  # the Cloud Storage agent's grant, and the wait for it to propagate

"""Every policy fails on its own deliberately bad fixture and passes the corrected one.

The fixtures are resources as the engine hands them to the pack: type token, name, camelCase inputs.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

import rules
from rules import UNKNOWN, Resource, StackContext

DEV = StackContext(stack="dev", protect=False)
PROD = StackContext(stack="prod", protect=True)
KEY = "projects/p/locations/us-central1/keyRings/iot/cryptoKeys/data"
CMEK = StackContext(stack="prod", protect=True, kms_key_name=KEY)
LABELS = {"app": "gcp-iot-bridge", "stack": "dev", "managed-by": "pulumi"}
SA = "iot-dev-pipeline@p.iam.gserviceaccount.com"


def R(type_: str, name: str = "r", **props: object) -> Resource:  # noqa: N802 - short, for the fixture tables
    return Resource.from_inputs(type_, name, props)


def P(type_: str, **props: object) -> Resource:  # noqa: N802 - as R, for resources whose inputs hold a name
    return Resource.from_inputs(type_, "r", props)


BUCKET_OK = dict(uniformBucketLevelAccess=True, publicAccessPrevention="enforced", labels=LABELS, forceDestroy=True)
DATAFLOW_OK = dict(ipConfiguration="WORKER_IP_PRIVATE", serviceAccountEmail=SA, labels=LABELS, onDelete="cancel",
                   skipWaitOnJobTermination=False)
SECRET = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270",
          "value": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n"}

# The admin API as the program declares it, and the same service without its own authentication.
RUN = "gcp:cloudrunv2/service:Service"
RUN_INVOKER = "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
AUTHENTICATES = {"name": "ADMIN_AUTH", "value": "google"}
ADMIN_API = dict(name="iot-dev-admin-api", ingress="INGRESS_TRAFFIC_ALL", labels=LABELS, deletionProtection=False,
                 template={"serviceAccount": SA, "containers": [{"image": "i", "envs": [AUTHENTICATES]}]})
UNAUTHENTICATED = {**ADMIN_API, "template": {"serviceAccount": SA, "containers": [{"image": "i", "envs": [
    {"name": "ADMIN_AUTH", "value": "none"}]}]}}

# policy name -> (context, resources that pass, resources that each must fail)
FIXTURES: dict[str, tuple[StackContext, list[Resource], list[Resource]]] = {
    "bucket-uniform-access-no-public": (DEV, [R("gcp:storage/bucket:Bucket", **BUCKET_OK)], [
        R("gcp:storage/bucket:Bucket", **{**BUCKET_OK, "uniformBucketLevelAccess": False}),
        R("gcp:storage/bucket:Bucket", **{**BUCKET_OK, "publicAccessPrevention": "inherited"}),
        R("gcp:storage/bucket:Bucket", labels=LABELS),
    ]),
    "iam-nothing-public": (DEV, [
        R("gcp:storage/bucketIAMMember:BucketIAMMember", bucket="b", role="roles/storage.objectViewer",
          member=f"serviceAccount:{SA}"),
    ], [
        R("gcp:storage/bucketIAMMember:BucketIAMMember", bucket="b", role="roles/storage.objectViewer",
          member="allUsers"),
        R("gcp:pubsub/topicIAMBinding:TopicIAMBinding", topic="t", role="roles/pubsub.publisher",
          members=[f"serviceAccount:{SA}", "allAuthenticatedUsers"]),
        R("gcp:projects/iAMPolicy:IAMPolicy", project="p",
          policyData='{"bindings":[{"role":"roles/pubsub.viewer","members":["allUsers"]}]}'),
        R("gcp:bigquery/dataset:Dataset", datasetId="iot", labels=LABELS,
          accesses=[{"role": "READER", "specialGroup": "allAuthenticatedUsers"}]),
        P(RUN_INVOKER, name="iot-dev-config-push", role="roles/run.invoker", member="allUsers"),
        P(RUN_INVOKER, name="iot-dev-admin-api", role="roles/run.admin", member="allUsers"),
    ]),
    "iam-no-basic-roles": (DEV, [
        R("gcp:projects/iAMMember:IAMMember", project="p", role="roles/dataflow.worker", member=f"serviceAccount:{SA}"),
    ], [
        R("gcp:projects/iAMMember:IAMMember", project="p", role="roles/editor", member=f"serviceAccount:{SA}"),
        R("gcp:projects/iAMBinding:IAMBinding", project="p", role="roles/owner", members=["user:a@example.com"]),
    ]),
    "iam-no-service-account-keys": (DEV, [R("gcp:serviceaccount/account:Account", accountId="iot-dev-pipeline")], [
        R("gcp:serviceaccount/key:Key", serviceAccountId="projects/p/serviceAccounts/x"),
    ]),
    "workload-dedicated-service-account": (DEV, [
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **DATAFLOW_OK),
        R("gcp:cloudfunctionsv2/function:Function",
          serviceConfig={"serviceAccountEmail": "iot-dev-cfgpush@p.iam.gserviceaccount.com"},
          buildConfig={"serviceAccount": "projects/p/serviceAccounts/iot-dev-build@p.iam.gserviceaccount.com"}),
        # An email that is an output of a service account not created yet is unknown during preview.
        R("gcp:compute/instanceTemplate:InstanceTemplate", serviceAccount={"email": UNKNOWN, "scopes": []}),
    ], [
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **{**DATAFLOW_OK, "serviceAccountEmail": None}),
        R("gcp:dataflow/job:Job", serviceAccountEmail="123456789-compute@developer.gserviceaccount.com"),
        R("gcp:cloudfunctionsv2/function:Function", serviceConfig={"availableMemory": "256M"}),
        R("gcp:cloudfunctionsv2/function:Function",
          serviceConfig={"serviceAccountEmail": "iot-dev-cfgpush@p.iam.gserviceaccount.com"},
          buildConfig={"serviceAccount": "projects/p/serviceAccounts/42-compute@developer.gserviceaccount.com"}),
        R("gcp:compute/instanceTemplate:InstanceTemplate", machineType="e2-small"),
        R("gcp:eventarc/trigger:Trigger", location="us-central1"),
    ]),
    "dataflow-private-workers": (DEV, [R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **DATAFLOW_OK)], [
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **{**DATAFLOW_OK, "ipConfiguration": None}),
        R("gcp:dataflow/job:Job", **{**DATAFLOW_OK, "ipConfiguration": "WORKER_IP_PUBLIC"}),
    ]),
    "function-internal-only": (DEV, [
        R("gcp:cloudfunctionsv2/function:Function", serviceConfig={"ingressSettings": "ALLOW_INTERNAL_ONLY"}),
        R("gcp:cloudfunctionsv2/functionIamMember:FunctionIamMember", role="roles/cloudfunctions.invoker",
          member=f"serviceAccount:{SA}"),
        P(RUN, **ADMIN_API),
        P(RUN, **{**ADMIN_API, "invokerIamDisabled": True}),
        P(RUN_INVOKER, name="iot-dev-admin-api", role="roles/run.invoker", member="allUsers"),
    ], [
        R("gcp:cloudfunctionsv2/function:Function", serviceConfig={"ingressSettings": "ALLOW_ALL"}),
        R("gcp:cloudfunctionsv2/function:Function", serviceConfig={}),
        P(RUN_INVOKER, role="roles/run.invoker", member="allUsers"),
        P(RUN_INVOKER, name="iot-dev-config-push", role="roles/run.invoker", member="allUsers"),
        P(RUN, **UNAUTHENTICATED),
        P(RUN, **{**ADMIN_API, "name": "iot-dev-dashboard"}),
        P(RUN, **{**ADMIN_API, "name": "iot-dev-dashboard", "ingress": "INGRESS_TRAFFIC_INTERNAL_ONLY",
                  "invokerIamDisabled": True}),
    ]),
    "deletion-protection-follows-stack": (DEV, [
        R("gcp:bigquery/table:Table", deletionProtection=False),
        R("gcp:bigquery/dataset:Dataset", deleteContentsOnDestroy=True),
        R("gcp:bigtable/instance:Instance", deletionProtection=False),
        R("gcp:bigtable/table:Table", deletionProtection="UNPROTECTED"),
        R("gcp:storage/bucket:Bucket", forceDestroy=True),
        R("gcp:firestore/database:Database", deletionPolicy="DELETE",
          deleteProtectionState="DELETE_PROTECTION_DISABLED"),
        P(RUN, **ADMIN_API),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="cancel", skipWaitOnJobTermination=False),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="cancel"),  # the provider's default: wait
    ], [
        # Provider defaults (deletion protection on) make `pulumi destroy` of a dev stack fail.
        R("gcp:bigquery/table:Table"),
        R("gcp:bigquery/dataset:Dataset"),
        R("gcp:bigtable/instance:Instance"),
        R("gcp:bigtable/table:Table", deletionProtection="PROTECTED"),
        R("gcp:storage/bucket:Bucket"),
        R("gcp:firestore/database:Database"),
        P(RUN, name="iot-dev-admin-api"),  # the provider protects a Cloud Run service unless told not to
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="drain", skipWaitOnJobTermination=False),
        # Not waiting: destroy removes the subnetwork and bucket under the cancelling job, and the next launch
        # under its name fails while it is still active.
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="cancel", skipWaitOnJobTermination=True),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", skipWaitOnJobTermination=False),
    ]),
    "cmek-when-asked": (CMEK, [
        R("gcp:pubsub/topic:Topic", kmsKeyName=KEY),
        R("gcp:bigquery/dataset:Dataset", defaultEncryptionConfiguration={"kmsKeyName": KEY}),
        R("gcp:bigtable/instance:Instance", clusters=[{"clusterId": "a", "kmsKeyName": KEY}]),
        R("gcp:storage/bucket:Bucket", encryption={"defaultKmsKeyName": KEY}),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", kmsKeyName=KEY),
    ], [
        R("gcp:pubsub/topic:Topic"),
        R("gcp:bigquery/dataset:Dataset", defaultEncryptionConfiguration={"kmsKeyName": KEY + "-old"}),
        R("gcp:bigtable/instance:Instance", clusters=[{"clusterId": "a", "kmsKeyName": KEY}, {"clusterId": "b"}]),
        R("gcp:storage/bucket:Bucket"),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob"),
        R("gcp:dataflow/job:Job"),
    ]),
    "labels-everywhere": (DEV, [
        R("gcp:pubsub/topic:Topic", labels=LABELS),
        R("gcp:monitoring/alertPolicy:AlertPolicy", userLabels=LABELS),
        Resource.from_inputs("gcp:storage/bucket:Bucket", "r", {}, provider_props={"defaultLabels": LABELS}),
        R("gcp:bigtable/table:Table"),  # takes no labels
    ], [
        R("gcp:pubsub/topic:Topic"),
        R("gcp:pubsub/topic:Topic", labels={"app": "gcp-iot-bridge"}),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", labels={**LABELS, "Owner": "Data Team"}),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob",
          labels={**LABELS, "goog-dataflow-provided-template-type": "flex"}),
        # A notification channel's `labels` are its settings; its resource labels are userLabels.
        R("gcp:monitoring/notificationChannel:NotificationChannel", labels=LABELS),
    ]),
    "firewall-mqtt-and-health-checks-only": (DEV, [
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"], allows=[{"protocol": "tcp", "ports": ["8883"]}]),
        # The device ports: MQTT and the HTTP device bridge.
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"],
          allows=[{"protocol": "tcp", "ports": ["8883", "8443"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["35.191.0.0/16", "130.211.0.0/22"],
          allows=[{"protocol": "tcp", "ports": ["8080"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"], denies=[{"protocol": "all"}]),
        # Dataflow workers talking to each other: same tag on both ends, no source range.
        R("gcp:compute/firewall:Firewall", sourceTags=["dataflow"], targetTags=["dataflow"],
          allows=[{"protocol": "tcp", "ports": ["12345-12346"]}]),
    ], [
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"], allows=[{"protocol": "tcp", "ports": ["22"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"], allows=[{"protocol": "tcp", "ports": ["1883"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["0.0.0.0/0"],
          allows=[{"protocol": "tcp", "ports": ["8883", "1883"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["35.191.0.0/16", "10.0.0.0/8"],
          allows=[{"protocol": "tcp", "ports": ["8080"]}]),
        R("gcp:compute/firewall:Firewall", sourceRanges=["35.191.0.0/16"], allows=[{"protocol": "all"}]),
        # A tag other VMs can carry reaching this workload's VMs is not internal to it.
        R("gcp:compute/firewall:Firewall", sourceTags=["bastion"], targetTags=["dataflow"],
          allows=[{"protocol": "tcp", "ports": ["22"]}]),
        R("gcp:compute/firewall:Firewall", sourceTags=["dataflow"], targetTags=["dataflow"],
          sourceRanges=["0.0.0.0/0"], allows=[{"protocol": "tcp", "ports": ["12345-12346"]}]),
    ]),
    "secrets-are-pulumi-secrets": (DEV, [
        R("gcp:secretmanager/secretVersion:SecretVersion", secretData=SECRET),
        # The pack sees secrets unwrapped: a schema-secret field passes on its own.
        R("gcp:secretmanager/secretVersion:SecretVersion", secretData=SECRET["value"]),
        R("gcp:compute/instanceTemplate:InstanceTemplate", metadata={"broker-key": SECRET}),
        R("gcp:cloudfunctionsv2/function:Function",
          serviceConfig={"environmentVariables": {"SECRET_ID": "iot-dev-broker-key"},
                         "secretEnvironmentVariables": [{"key": "DB_PASSWORD", "secret": "db-password"}]}),
    ], [
        R("gcp:compute/instanceTemplate:InstanceTemplate",
          metadata={"startup-script": "echo '" + SECRET["value"] + "'"}),
        R("gcp:cloudfunctionsv2/function:Function",
          serviceConfig={"environmentVariables": {"MQTT_PASSWORD": "hunter2"}}),
        R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", parameters={"api_key": "AIzaSyD-not-a-real-key"}),
    ]),
}


def test_every_policy_has_a_fixture():
    assert set(FIXTURES) == {p.name for p in rules.POLICIES}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_policy_passes_good_and_fails_each_bad_fixture(name: str):
    policy = next(p for p in rules.POLICIES if p.name == name)
    ctx, good, bad = FIXTURES[name]
    for r in good:
        assert policy.check(r, ctx) == [], (r.type, dict(r.props))
    assert bad
    for r in bad:
        violations = policy.check(r, ctx)
        assert violations, f"{name} let a bad {r.type} through: {dict(r.props)}"
        assert all(isinstance(v, str) and v for v in violations)


def test_deletion_protection_in_prod_wants_the_opposite():
    policy = rules.deletion_protection_follows_stack
    assert policy(R("gcp:bigquery/table:Table"), PROD) == []  # provider default: protected
    assert policy(R("gcp:bigtable/instance:Instance"), PROD) == []
    assert policy(R("gcp:bigquery/table:Table", deletionProtection=False), PROD)
    assert policy(R("gcp:bigquery/dataset:Dataset", deleteContentsOnDestroy=True), PROD)
    assert policy(R("gcp:bigtable/instance:Instance", deletionProtection=False), PROD)
    assert policy(R("gcp:bigtable/table:Table"), PROD)
    assert policy(R("gcp:storage/bucket:Bucket", forceDestroy=True), PROD)
    assert policy(P(RUN, name="iot-prod-admin-api"), PROD) == []
    assert policy(P(RUN, name="iot-prod-admin-api", deletionProtection=False), PROD)
    assert policy(R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="cancel",
                    skipWaitOnJobTermination=True), PROD)
    assert policy(R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="drain"), PROD) == []
    assert policy(R("gcp:dataflow/flexTemplateJob:FlexTemplateJob"), PROD)  # onDelete left to a default
    # Not waiting for the drain in prod would let the subscription and tables go while the job still writes.
    assert policy(R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", onDelete="drain",
                    skipWaitOnJobTermination=True), PROD)


def test_cmek_not_required_without_kms_key():
    assert rules.cmek_when_asked(R("gcp:pubsub/topic:Topic"), DEV) == []


def test_unknown_values_never_fail_a_preview():
    unknown_everything = {k: UNKNOWN for k in (
        "uniformBucketLevelAccess", "publicAccessPrevention", "labels", "forceDestroy", "ipConfiguration",
        "serviceAccountEmail", "onDelete", "skipWaitOnJobTermination", "kmsKeyName", "deadLetterPolicy",
        "deletionProtection", "deleteContentsOnDestroy", "encryption", "defaultEncryptionConfiguration")}
    for type_ in ("gcp:storage/bucket:Bucket", "gcp:dataflow/flexTemplateJob:FlexTemplateJob",
                  "gcp:pubsub/subscription:Subscription", "gcp:bigquery/table:Table", "gcp:bigquery/dataset:Dataset",
                  "gcp:pubsub/topic:Topic"):
        r = Resource.from_inputs(type_, "r", unknown_everything)
        for ctx in (DEV, PROD, CMEK):
            found = {p.name: p.check(r, ctx) for p in rules.POLICIES}
            assert not any(found.values()), (type_, found)


def test_a_public_invoker_needs_a_service_of_the_stack_that_verifies_callers():
    invoker = P(RUN_INVOKER, name="iot-dev-admin-api", role="roles/run.invoker", member="allUsers")
    assert rules.public_cloud_run_authenticates([P(RUN, **ADMIN_API), invoker], DEV) == []
    assert rules.public_cloud_run_authenticates([P(RUN, **UNAUTHENTICATED), invoker], DEV)
    assert rules.public_cloud_run_authenticates([invoker], DEV), "opens a service the stack does not declare"
    preview = P(RUN_INVOKER, name=UNKNOWN, role="roles/run.invoker", member="allUsers")
    assert rules.public_cloud_run_authenticates([preview], DEV) == []
    private = P(RUN_INVOKER, name="iot-dev-config-push", role="roles/run.invoker", member=f"serviceAccount:{SA}")
    assert rules.public_cloud_run_authenticates([private], DEV) == []


def test_shared_service_account_fails_the_stack_rule():
    job = R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", serviceAccountEmail=SA)
    fn = R("gcp:cloudfunctionsv2/function:Function", serviceConfig={"serviceAccountEmail": SA})
    other = R("gcp:cloudfunctionsv2/function:Function",
              serviceConfig={"serviceAccountEmail": "iot-dev-cfgpush@p.iam.gserviceaccount.com"})
    assert rules.service_accounts_not_shared([job, fn], DEV)
    assert rules.service_accounts_not_shared([job, other], DEV) == []


def test_a_production_group_without_an_autoscaler_fails_the_stack_rule():
    group = Resource.from_inputs("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager", "broker-mig",
                                 {"name": "iot-prod-broker"})
    scaler = R("gcp:compute/regionAutoscaler:RegionAutoscaler", "broker-autoscaler",
               target="projects/p/regions/europe-west1/instanceGroupManagers/iot-prod-broker")
    elsewhere = R("gcp:compute/regionAutoscaler:RegionAutoscaler", "other",
                  target="projects/p/regions/europe-west1/instanceGroupManagers/another-group")
    assert rules.groups_autoscaled_in_production([group, scaler], PROD) == []
    (message,) = rules.groups_autoscaled_in_production([group], PROD)
    assert "broker-mig: no autoscaler targets it" in message
    assert rules.groups_autoscaled_in_production([group, elsewhere], PROD)
    # During preview the target is unknown: it counts for one group.
    unknown = R("gcp:compute/regionAutoscaler:RegionAutoscaler", "broker-autoscaler", target=UNKNOWN)
    assert rules.groups_autoscaled_in_production([group, unknown], PROD) == []
    # Development stacks may run a fixed group.
    assert rules.groups_autoscaled_in_production([group], DEV) == []


DLQ = {"deadLetterTopic": "projects/p/topics/iot-dev-dead-letter", "maxDeliveryAttempts": 5}
RETRY = {"minimumBackoff": "10s", "maximumBackoff": "600s"}


def _job_reading(subscription: object) -> Resource:
    return R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **DATAFLOW_OK,
             parameters={"input_subscription": subscription, "bigquery_dataset": "p.iot"})


def _sub(name: str, **props: object) -> Resource:
    return R("gcp:pubsub/subscription:Subscription", name=name, labels=LABELS, **props)


def test_dead_letter_rule_wants_a_dead_letter_topic_except_on_the_audit_subscription():
    rule = rules.subscription_dead_letter
    assert rule([_sub("iot-dev-device-logs-bigquery", deadLetterPolicy=DLQ),
                 _sub("iot-dev-dead-letter-audit", retryPolicy=RETRY)], DEV) == []
    assert rule([_sub("iot-dev-device-logs-bigquery")], DEV)
    assert rule([_sub("iot-dev-fanout", deadLetterPolicy={**DLQ, "maxDeliveryAttempts": 3})], DEV)
    # A job that reads another subscription exempts nothing else.
    assert rule([_sub("iot-dev-fanout"), _job_reading("projects/p/subscriptions/iot-dev-telemetry-pipeline")], DEV)


def test_dead_letter_rule_exempts_what_dataflow_reads_and_refuses_its_policies_there():
    """Pub/Sub does not support dead-letter topics or exponential backoff on a subscription Dataflow reads."""
    rule = rules.subscription_dead_letter
    job = _job_reading("projects/p/subscriptions/iot-dev-telemetry-pipeline")
    assert rule([_sub("iot-dev-telemetry-pipeline"), job], DEV) == []
    with_dlq = rule([_sub("iot-dev-telemetry-pipeline", deadLetterPolicy=DLQ), job], DEV)
    assert len(with_dlq) == 1 and "deadLetterPolicy" in with_dlq[0] and "Dataflow" in with_dlq[0]
    with_retry = rule([_sub("iot-dev-telemetry-pipeline", retryPolicy=RETRY), job], DEV)
    assert len(with_retry) == 1 and "retryPolicy" in with_retry[0]
    # The classic Dataflow job type reads its parameters the same way.
    classic = R("gcp:dataflow/job:Job", parameters={"inputSubscription": "projects/p/subscriptions/iot-dev-in"})
    assert rule([_sub("iot-dev-in"), classic], DEV) == []
    assert rule([_sub("iot-dev-in", deadLetterPolicy=DLQ, retryPolicy=RETRY), classic], DEV)


def test_dead_letter_rule_never_fails_on_a_dataflow_input_unknown_during_preview():
    rule = rules.subscription_dead_letter
    assert rule([_sub("iot-dev-telemetry-pipeline"), _job_reading(UNKNOWN)], DEV) == []
    assert rule([_sub("iot-dev-telemetry-pipeline"),
                 R("gcp:dataflow/flexTemplateJob:FlexTemplateJob", **DATAFLOW_OK, parameters=UNKNOWN)], DEV) == []
    assert rule([_sub("iot-dev-x", deadLetterPolicy=UNKNOWN)], DEV) == []
    # What is known to be wrong still fails.
    assert rule([_sub("iot-dev-x", deadLetterPolicy={**DLQ, "maxDeliveryAttempts": 200}), _job_reading(UNKNOWN)], DEV)


def test_plain_secret_config_fails():
    stack_file = {"gcp-iot-bridge:prefix": "iot-dev", "gcp-iot-bridge:mqttPassword": "hunter2",
                  "gcp-iot-bridge:apiToken": {"secure": "v1:abc"}}
    found = rules.secret_config_is_encrypted(stack_file)
    assert len(found) == 1 and "mqttPassword" in found[0]
    assert rules.secret_config_is_encrypted(stack_file, secret_keys=["gcp-iot-bridge:mqttPassword"]) == []


def test_stack_context_reads_engine_and_stack_file_forms():
    assert StackContext.from_config({"gcp-iot-bridge:deletionProtection": "true"}, "prod").protect is True
    assert StackContext.from_config({"gcp-iot-bridge:deletionProtection": False}, "dev").protect is False
    ctx = StackContext.from_config({"gcp-iot-bridge:deletionProtection": "false", "gcp-iot-bridge:kmsKeyName": KEY},
                                   "dev")
    assert ctx.kms_key_name == KEY
    with pytest.raises(ValueError, match="deletionProtection"):
        StackContext.from_config({}, "dev")


def test_pack_wraps_every_rule_as_a_mandatory_policy():
    path = pathlib.Path(rules.__file__).with_name("__main__.py")
    spec = importlib.util.spec_from_file_location("iot_policy_pack", path)
    assert spec and spec.loader
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)  # __name__ is not "__main__": the gRPC server does not start
    built = pack.policies()
    names = [p.name for p in built]
    assert len(names) == len(set(names))
    assert set(names) >= {p.name for p in rules.POLICIES} | {p.name for p in rules.STACK_POLICIES}
    from pulumi_policy import EnforcementLevel
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in built)


def test_pack_adapter_turns_preview_unknowns_into_the_sentinel():
    from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, unknown_checking_proxy

    path = pathlib.Path(rules.__file__).with_name("__main__.py")
    spec = importlib.util.spec_from_file_location("iot_policy_pack2", path)
    assert spec and spec.loader
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    proxied = unknown_checking_proxy({"serviceAccountEmail": UNKNOWN_STRING_VALUE,
                                      "ipConfiguration": "WORKER_IP_PUBLIC",
                                      "labels": {"app": "x", "stack": UNKNOWN_STRING_VALUE}})
    props = pack.plain(proxied)
    assert props == {"serviceAccountEmail": UNKNOWN, "ipConfiguration": "WORKER_IP_PUBLIC",
                     "labels": {"app": "x", "stack": UNKNOWN}}
    r = Resource.from_inputs("gcp:dataflow/flexTemplateJob:FlexTemplateJob", "job", props)
    assert rules.dataflow_private_workers(r, DEV)
    assert rules.dedicated_service_accounts(r, DEV) == []


def test_pack_validate_reports_through_the_sdk(monkeypatch):
    """The wrapper end to end: SDK args in, report_violation called with the rule's message."""
    from pulumi_policy import PolicyResourceOptions, ResourceValidationArgs
    from pulumi_policy.proxy import unknown_checking_proxy

    path = pathlib.Path(rules.__file__).with_name("__main__.py")
    spec = importlib.util.spec_from_file_location("iot_policy_pack3", path)
    assert spec and spec.loader
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    # The engine hands the stack's config to the pack in PULUMI_CONFIG.
    monkeypatch.setenv("PULUMI_CONFIG", '{"gcp-iot-bridge:deletionProtection": "false"}')
    monkeypatch.setenv("PULUMI_PROJECT", "gcp-iot-bridge")
    # Mock runs of the program in this process leave config in the runtime; the pack process starts with none.
    import pulumi.runtime.config as runtime_config

    token = runtime_config.CONFIG.set({})
    try:
        policy = next(p for p in pack.policies() if p.name == "deletion-protection-follows-stack")
        opts = PolicyResourceOptions(False, [], None, [], None, [])  # type: ignore[arg-type]
        args = ResourceValidationArgs("gcp:bigquery/table:Table", unknown_checking_proxy({"tableId": "t"}),
                                      "urn:pulumi:dev::gcp-iot-bridge::gcp:bigquery/table:Table::t", "t", opts, None)
        reported: list[str] = []
        policy.validate(args, lambda message, urn=None: reported.append(message))
    finally:
        runtime_config.CONFIG.reset(token)
    assert reported and "deletionProtection" in reported[0]

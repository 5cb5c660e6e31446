"""Messaging under mocks: topics and subscriptions from iotbridge.spec, dead-letter paths with the service-agent
grants, the device-logs BigQuery subscription."""

from __future__ import annotations

import pytest

from iotbridge import spec
from tests.infra import harness

TOPIC = "gcp:pubsub/topic:Topic"
SUB = "gcp:pubsub/subscription:Subscription"
SUB_IAM = "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember"
TOPIC_IAM = "gcp:pubsub/topicIAMMember:TopicIAMMember"
DATASET_IAM = "gcp:bigquery/datasetIamMember:DatasetIamMember"
AGENT = f"serviceAccount:service-{harness.PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def prefix(run: harness.StackRun) -> str:
    return run.config["gcp-iot-bridge:prefix"]


def subs_by_name(run: harness.StackRun) -> dict[str, harness.Resource]:
    return {s.get("name"): s for s in run.of_type(SUB)}


def test_the_five_contract_topics_exist_with_names_from_the_prefix(run: harness.StackRun) -> None:
    names = {t.get("name") for t in run.of_type(TOPIC)}
    p = prefix(run)
    for key in ("telemetry", "state", "config-requests", "device-logs", "dead-letter"):
        assert f"{p}-{key}" in names
    assert names == {spec.topic_name(p, key) for key in spec.TOPICS}
    assert run.outputs["telemetry_topic"] == f"{p}-telemetry"
    assert run.outputs["dead_letter_topic"] == f"{p}-dead-letter"


def test_every_pull_subscription_dead_letters_and_retries(run: harness.StackRun) -> None:
    p = prefix(run)
    project = run.config["gcp:project"]
    attempts = int(run.config["gcp-iot-bridge:pubsubMaxDeliveryAttempts"])
    dead_letter_id = f"projects/{project}/topics/{p}-dead-letter"
    subs = subs_by_name(run)
    pull = [s for s in spec.SUBSCRIPTIONS.values() if s.kind == "pull" and s.cloud and not s.dataflow]
    assert pull
    for s in pull:
        res = subs[spec.subscription_name(p, s.key)]
        assert res.get("topic") == f"projects/{project}/topics/{p}-{s.topic}"
        assert res.get("retryPolicy") == {"minimumBackoff": "10s", "maximumBackoff": "600s"}
        if s.key == "dead-letter-audit":
            assert "deadLetterPolicy" not in res.inputs, "the dead-letter audit must not dead-letter into itself"
            continue
        assert res.get("deadLetterPolicy") == {"deadLetterTopic": dead_letter_id, "maxDeliveryAttempts": attempts}


def test_the_subscription_dataflow_reads_has_no_dead_letter_or_retry_policy(run: harness.StackRun) -> None:
    """Pub/Sub documents both as unsupported with Dataflow: its runner holds messages and extends their deadlines,
    so delivery attempts climb and healthy telemetry would be dead-lettered. The pipeline keeps its own dead
    letters (telemetry_errors)."""
    project = run.config["gcp:project"]
    (job,) = run.of_type("gcp:dataflow/flexTemplateJob:FlexTemplateJob")
    read = job.get("parameters")["input_subscription"]
    by_path = {f"projects/{project}/subscriptions/{s.get('name')}": s for s in run.of_type(SUB)}
    sub = by_path[read]
    assert "deadLetterPolicy" not in sub.inputs, f"{sub.get('name')}: Dataflow does not support a dead-letter policy"
    assert "retryPolicy" not in sub.inputs, f"{sub.get('name')}: Dataflow does not support an exponential backoff"
    # Nothing to forward from it, so the Pub/Sub agent gets no subscriber grant on it either.
    agent_subs = {g.get("subscription") for g in run.of_type(SUB_IAM) if g.get("member") == AGENT}
    assert sub.get("name") not in agent_subs
    assert "telemetry_errors" in {t.get("tableId") for t in run.of_type("gcp:bigquery/table:Table")}


def test_spec_refuses_a_dataflow_subscription_that_dead_letters() -> None:
    with pytest.raises(ValueError, match="Dataflow does not support"):
        spec.SubscriptionSpec("x", "telemetry", "x", dataflow=True)


def test_dead_letter_topic_has_a_subscription_so_nothing_dead_lettered_is_lost(run: harness.StackRun) -> None:
    project = run.config["gcp:project"]
    on_dlq = [s for s in run.of_type(SUB) if s.get("topic") == f"projects/{project}/topics/{prefix(run)}-dead-letter"]
    assert on_dlq, "messages published to a topic without subscriptions are dropped"


def test_no_subscription_expires(run: harness.StackRun) -> None:
    # Default expiration deletes a subscription idle for 31 days (the audit subscription, with what it holds).
    for s in run.of_type(SUB):
        assert s.get("expirationPolicy") == {"ttl": ""}, s.name


def test_pubsub_agent_may_forward_to_the_dead_letter_topic(run: harness.StackRun) -> None:
    grants = [g for g in run.of_type(TOPIC_IAM) if g.get("member") == AGENT]
    assert [(g.get("topic"), g.get("role")) for g in grants] == [
        (f"{prefix(run)}-dead-letter", "roles/pubsub.publisher")]


def test_pubsub_agent_may_ack_on_every_dead_lettering_subscription(run: harness.StackRun) -> None:
    dead_lettering = {s.get("name") for s in run.of_type(SUB) if "deadLetterPolicy" in s.inputs}
    granted = {g.get("subscription") for g in run.of_type(SUB_IAM)
               if g.get("member") == AGENT and g.get("role") == "roles/pubsub.subscriber"}
    assert dead_lettering and dead_lettering == granted


def test_device_logs_reach_bigquery_through_a_bigquery_subscription(run: harness.StackRun) -> None:
    project = run.config["gcp:project"]
    dataset = run.config["gcp-iot-bridge:bigqueryDataset"]
    p = prefix(run)
    sub = subs_by_name(run)[f"{p}-device-logs-bigquery"]
    assert sub.get("topic") == f"projects/{project}/topics/{p}-device-logs"
    assert sub.get("bigqueryConfig") == {"table": f"{project}.{dataset}.device_logs", "writeMetadata": True}
    assert "retryPolicy" not in sub.inputs
    assert sub.get("deadLetterPolicy", {}).get("deadLetterTopic", "").endswith(f"/topics/{p}-dead-letter")


def test_bigquery_subscription_waits_for_the_agents_dataset_grants(run: harness.StackRun) -> None:
    dataset = run.config["gcp-iot-bridge:bigqueryDataset"]
    grants = [g for g in run.of_type(DATASET_IAM) if g.get("member") == AGENT]
    assert {g.get("role") for g in grants} == {"roles/bigquery.dataEditor", "roles/bigquery.metadataViewer"}
    assert all(g.get("datasetId") == dataset for g in grants)
    sub = subs_by_name(run)[f"{prefix(run)}-device-logs-bigquery"]
    for grant in grants:
        assert run.depends_on(sub, grant), f"subscription created before {grant.get('role')} is granted"


def test_subscriptions_owned_elsewhere_in_the_cloud_are_not_created(run: harness.StackRun) -> None:
    local_only = [s.key for s in spec.SUBSCRIPTIONS.values() if not s.cloud]
    assert "config-requests-push" in local_only
    names = set(subs_by_name(run))
    for key in local_only:
        assert spec.subscription_name(prefix(run), key) not in names


def test_retention_comes_from_config(run: harness.StackRun) -> None:
    seconds = run.config["gcp-iot-bridge:pubsubMessageRetentionSeconds"]
    subs = [s for s in run.of_type(SUB) if "gcp-iot-bridge:index:Messaging" in s.parent]
    assert len(subs) == len([k for k, v in spec.SUBSCRIPTIONS.items() if v.cloud])
    for s in subs:
        assert s.get("messageRetentionDuration") == f"{seconds}s"


def test_component_refuses_a_delivery_attempt_count_pubsub_rejects() -> None:
    from gcp_iot_bridge.infra.messaging import Messaging, MessagingArgs

    def program() -> None:
        Messaging("m", MessagingArgs(project="p-123456", prefix="iot-t", pubsub_agent=AGENT,
                                     bigquery_dataset="iot", bigquery_tables={"device_logs": "p.iot.device_logs"},
                                     max_delivery_attempts=4))

    with pytest.raises(harness.ProgramFailed, match="max_delivery_attempts must be 5..100"):
        harness.run_program("dev", program=program)


@pytest.mark.parametrize("stack", harness.STACKS)
def test_names_and_deadlines_are_ones_pubsub_accepts(stack: str) -> None:
    import re

    run = harness.stack_run(stack)
    valid = re.compile(r"^[A-Za-z][A-Za-z0-9._~+%-]{2,254}$")
    for res in run.of_type(TOPIC) + run.of_type(SUB):
        name = res.get("name")
        assert valid.match(name) and not name.startswith("goog"), name
    for s in run.of_type(SUB):
        assert 10 <= s.get("ackDeadlineSeconds") <= 600

"""Messaging: the Pub/Sub topics and subscriptions of ``iotbridge.spec``, with their dead-letter paths.

Built from the shared spec, so the cloud and the local stack have the same topology. The subscription the Dataflow
job reads has no dead-letter policy and no retry policy: Pub/Sub documents both as unsupported with Dataflow, whose
runner holds messages and extends their deadlines itself, so delivery attempts climb and healthy messages would be
dead-lettered. The pipeline writes what it cannot accept to ``telemetry_errors`` instead. Every subscription that
dead-letters needs two grants to the Pub/Sub service agent (service-{number}@gcp-sa-pubsub): publisher on the
dead-letter topic and subscriber on the source subscription. Without them dead-lettering silently never happens
and a poison message is redelivered forever; a BigQuery subscription that dead-letters needs them too.

The device-logs BigQuery subscription writes straight into the warehouse's ``device_logs`` table; the agent needs
BigQuery dataEditor (to insert) and metadataViewer (to read the table's schema) before the subscription can be
created, or the create call fails with a permission error. Granted is not yet effective: the create call answers
"403 The caller does not have permission" while the grants propagate, so the
subscription also waits a while after them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp
import pulumiverse_time as time

from iotbridge import spec

# How long the BigQuery subscription waits after its agent's dataset grants: IAM propagates a change typically
# in 2 minutes.
BIGQUERY_GRANTS_WAIT = "120s"


@dataclass(frozen=True)
class MessagingArgs:
    project: str
    prefix: str
    pubsub_agent: pulumi.Input[str]  # "serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    bigquery_dataset: pulumi.Input[str]  # dataset id that BigQuery subscriptions write into
    bigquery_tables: Mapping[str, pulumi.Input[str]]  # spec table name -> "project.dataset.table"
    depends_on: Sequence[pulumi.Resource] = ()  # the Pub/Sub and BigQuery APIs, the agent's identity
    labels: Mapping[str, str] = field(default_factory=dict)
    message_retention_seconds: int = 604800
    max_delivery_attempts: int = 5  # Pub/Sub allows 5..100
    minimum_backoff: str = "10s"
    maximum_backoff: str = "600s"
    kms_key_name: str | None = None  # CMEK for every topic; depends_on must hold the Pub/Sub agent's key grant


class Messaging(pulumi.ComponentResource):
    """Pub/Sub topics for device traffic and their subscriptions, dead-lettering where Pub/Sub supports it."""

    topics: dict[str, gcp.pubsub.Topic]  # spec key -> topic
    subscriptions: dict[str, gcp.pubsub.Subscription]  # spec key -> subscription (those created in the cloud)
    dead_letter_publisher: gcp.pubsub.TopicIAMMember

    def __init__(self, name: str, args: MessagingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Messaging", name, None, opts)
        if not 5 <= args.max_delivery_attempts <= 100:
            raise ValueError(f"max_delivery_attempts must be 5..100, got {args.max_delivery_attempts}")
        deps = list(args.depends_on)
        child = pulumi.ResourceOptions(parent=self, depends_on=deps)

        self.topics = {
            key: gcp.pubsub.Topic(
                f"{name}-{key}",
                project=args.project,
                name=spec.topic_name(args.prefix, key),
                kms_key_name=args.kms_key_name,
                labels=dict(args.labels),
                opts=child,
            )
            for key in spec.TOPICS
        }
        dead_letter = self.topics["dead-letter"]

        # Publisher on the dead-letter topic: granted once, shared by every dead-lettering subscription.
        self.dead_letter_publisher = gcp.pubsub.TopicIAMMember(
            f"{name}-dead-letter-agent-publisher",
            project=args.project,
            topic=dead_letter.name,
            role="roles/pubsub.publisher",
            member=args.pubsub_agent,
            opts=child,
        )

        bq_grants: list[pulumi.Resource] = []
        self.bigquery_grants_wait: time.Sleep | None = None
        if any(s.kind == "bigquery" and s.cloud for s in spec.SUBSCRIPTIONS.values()):
            granted = [
                gcp.bigquery.DatasetIamMember(
                    f"{name}-bq-agent-{role.split('.')[-1].lower()}",
                    project=args.project,
                    dataset_id=args.bigquery_dataset,
                    role=role,
                    member=args.pubsub_agent,
                    opts=child,
                )
                for role in ("roles/bigquery.dataEditor", "roles/bigquery.metadataViewer")
            ]
            # Pub/Sub checks the agent's access to the table when the subscription is created; until the grants
            # have propagated it answers "403 The caller does not have permission".
            self.bigquery_grants_wait = time.Sleep(
                f"{name}-bq-agent-wait",
                create_duration=BIGQUERY_GRANTS_WAIT,
                triggers={f"grant{i}": g.id for i, g in enumerate(granted)},
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, *granted]),
            )
            bq_grants = [*granted, self.bigquery_grants_wait]

        self.subscriptions = {}
        for key, sub in spec.SUBSCRIPTIONS.items():
            if not sub.cloud:
                continue
            dead_letter_policy = None
            if sub.dead_letter:
                dead_letter_policy = gcp.pubsub.SubscriptionDeadLetterPolicyArgs(
                    dead_letter_topic=dead_letter.id,
                    max_delivery_attempts=args.max_delivery_attempts,
                )
            bigquery_config = None
            retry_policy = None
            sub_deps = list(deps)
            if sub.kind == "bigquery":
                if sub.bigquery_table is None or sub.bigquery_table not in args.bigquery_tables:
                    raise ValueError(f"subscription {key}: no BigQuery table {sub.bigquery_table!r} was passed in")
                bigquery_config = gcp.pubsub.SubscriptionBigqueryConfigArgs(
                    table=args.bigquery_tables[sub.bigquery_table],
                    write_metadata=True,
                )
                sub_deps += bq_grants
            elif not sub.dataflow:
                retry_policy = gcp.pubsub.SubscriptionRetryPolicyArgs(
                    minimum_backoff=args.minimum_backoff,
                    maximum_backoff=args.maximum_backoff,
                )
            subscription = gcp.pubsub.Subscription(
                f"{name}-{key}",
                project=args.project,
                name=spec.subscription_name(args.prefix, key),
                topic=self.topics[sub.topic].id,
                ack_deadline_seconds=sub.ack_deadline_seconds,
                message_retention_duration=f"{args.message_retention_seconds}s",
                enable_exactly_once_delivery=sub.exactly_once,
                # The default policy deletes a subscription after 31 days without a subscriber; the dead-letter
                # audit subscription is rarely read and would silently vanish with what it holds. Never expire.
                expiration_policy=gcp.pubsub.SubscriptionExpirationPolicyArgs(ttl=""),
                dead_letter_policy=dead_letter_policy,
                retry_policy=retry_policy,
                bigquery_config=bigquery_config,
                labels=dict(args.labels),
                opts=pulumi.ResourceOptions(parent=self, depends_on=sub_deps),
            )
            self.subscriptions[key] = subscription
            if sub.dead_letter:
                gcp.pubsub.SubscriptionIAMMember(
                    f"{name}-{key}-agent-subscriber",
                    project=args.project,
                    subscription=subscription.name,
                    role="roles/pubsub.subscriber",
                    member=args.pubsub_agent,
                    opts=child,
                )

        self.register_outputs({
            **{f"{key}_topic": topic.name for key, topic in self.topics.items()},
            **{f"{key}_subscription": s.name for key, s in self.subscriptions.items()},
        })

"""Create, on the local services, the topics, subscriptions, tables and views the Pulumi program declares.

Both read :mod:`iotbridge.spec`, so the laptop and the cloud cannot drift apart. Every call is idempotent:
running it twice against the same emulators changes nothing.

One path differs locally and says so: the device-logs BigQuery subscription. The Pub/Sub emulator accepts a
BigQuery subscription's config but cannot write into the local BigQuery, so locally the device-logs topic gets a
pull subscription and :class:`iotbridge.local.forwarder.BigQueryForwarder` writes the same columns the
subscription would (``write_metadata``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials

from iotbridge import spec


@dataclass(frozen=True)
class LocalNames:
    project: str = "local-project"
    region: str = "us-central1"
    prefix: str = "iot-local"
    registry_id: str = "local-registry"
    dataset: str = "iot"
    bigtable_instance: str = "iot-local"
    max_delivery_attempts: int = 5

    def topic(self, key: str) -> str:
        return f"projects/{self.project}/topics/{spec.topic_name(self.prefix, key)}"

    def subscription(self, key: str) -> str:
        return f"projects/{self.project}/subscriptions/{spec.subscription_name(self.prefix, key)}"


# google-cloud-bigquery's methods annotate ``retry`` as a Retry, but the client wraps a call only ``if retry``:
# None is how a caller asks for a single attempt.
NO_RETRY = cast(Retry, None)


def bigquery_client(project: str, endpoint: str):
    from google.cloud import bigquery

    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint))


def provision_pubsub(names: LocalNames, push_endpoints: dict[str, str] | None = None) -> list[str]:
    """Topics and subscriptions of the spec; ``push_endpoints`` maps a subscription key to an HTTP endpoint."""
    from google.cloud import pubsub_v1

    push_endpoints = push_endpoints or {}
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    made: list[str] = []
    for key in spec.TOPICS:
        try:
            publisher.create_topic(name=names.topic(key))
            made.append(names.topic(key))
        except gexc.AlreadyExists:
            pass
    for key, sub in spec.SUBSCRIPTIONS.items():
        request: dict[str, object] = {
            "name": names.subscription(key),
            "topic": names.topic(sub.topic),
            "ack_deadline_seconds": sub.ack_deadline_seconds,
        }
        if sub.dead_letter:
            request["dead_letter_policy"] = {
                "dead_letter_topic": names.topic("dead-letter"),
                "max_delivery_attempts": names.max_delivery_attempts,
            }
            request["retry_policy"] = {"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 60}}
        if key in push_endpoints:
            request["push_config"] = {"push_endpoint": push_endpoints[key]}
        # kind == "bigquery": a pull subscription here, drained by the local forwarder (see module docstring).
        try:
            subscriber.create_subscription(request=request)
            made.append(names.subscription(key))
        except gexc.AlreadyExists:
            pass
    return made


def provision_bigquery(names: LocalNames, endpoint: str) -> list[str]:
    from google.cloud import bigquery

    client = bigquery_client(names.project, endpoint)
    client.create_dataset(f"{names.project}.{names.dataset}", exists_ok=True, retry=NO_RETRY, timeout=30)
    made = []
    for t in spec.TABLES.values():
        table = bigquery.Table(f"{names.project}.{names.dataset}.{t.name}",
                               schema=[bigquery.SchemaField.from_api_repr(c) for c in t.schema()])
        if t.partition_field:
            table.time_partitioning = bigquery.TimePartitioning(field=t.partition_field)
        if t.clustering:
            table.clustering_fields = list(t.clustering)
        table.description = t.description
        client.create_table(table, exists_ok=True, retry=NO_RETRY, timeout=30)
        made.append(t.name)
    for v in spec.VIEWS.values():
        view = bigquery.Table(f"{names.project}.{names.dataset}.{v.name}")
        view.view_query = v.render(names.project, names.dataset)
        try:
            client.create_table(view, exists_ok=True, retry=NO_RETRY, timeout=30)
            made.append(v.name)
        except gexc.GoogleAPICallError:
            # The local engine may not know every BigQuery function a view uses; the tables still work.
            pass
    return made


def provision_bigtable(names: LocalNames) -> str:
    from google.cloud import bigtable
    from google.cloud.bigtable import column_family

    client = bigtable.Client(project=names.project, admin=True)
    table = client.instance(names.bigtable_instance).table(spec.BIGTABLE.table)
    if not table.exists():
        # Keep one version per cell: a replayed message writes the same timestamp, so no new version appears.
        table.create(column_families={f: column_family.MaxVersionsGCRule(1) for f in spec.BIGTABLE.column_families})
    return spec.BIGTABLE.table

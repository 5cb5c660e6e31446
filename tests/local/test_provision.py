"""The local stack gets the same topology as the Pulumi program, from iotbridge.spec."""

from __future__ import annotations

import json

import pytest

from iotbridge import spec
from iotbridge.local import provision
from iotbridge.local.forwarder import BigQueryForwarder
from tests.waiting import wait_for

pytestmark = pytest.mark.emulator


@pytest.fixture
def names() -> provision.LocalNames:
    return provision.LocalNames(prefix="prov-test")


def test_pubsub_topology_matches_spec_and_is_idempotent(pubsub_emulator, emulator_env, names):
    from google.cloud import pubsub_v1

    emulator_env(pubsub_emulator)
    first = provision.provision_pubsub(names)
    assert provision.provision_pubsub(names) == []  # second run creates nothing
    assert len(first) == len(spec.TOPICS) + len(spec.SUBSCRIPTIONS)

    subscriber = pubsub_v1.SubscriberClient()
    for key, sub_spec in spec.SUBSCRIPTIONS.items():
        sub = subscriber.get_subscription(subscription=names.subscription(key))
        assert sub.topic == names.topic(sub_spec.topic)
        if sub_spec.dead_letter:
            assert sub.dead_letter_policy.dead_letter_topic == names.topic("dead-letter")
            assert sub.dead_letter_policy.max_delivery_attempts == names.max_delivery_attempts
        else:
            assert not sub.dead_letter_policy.dead_letter_topic


def test_bigquery_tables_match_spec(bigquery_emulator, names):
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    provision.provision_bigquery(names, endpoint)
    provision.provision_bigquery(names, endpoint)
    client = provision.bigquery_client(names.project, endpoint)
    for t in spec.TABLES.values():
        table = client.get_table(f"{names.project}.{names.dataset}.{t.name}", retry=None, timeout=30)
        assert [f.name for f in table.schema] == t.column_names()


def test_bigtable_table_with_families(bigtable_emulator, emulator_env, names):
    from google.cloud import bigtable

    emulator_env(bigtable_emulator)
    provision.provision_bigtable(names)
    provision.provision_bigtable(names)
    table = bigtable.Client(project=names.project, admin=True).instance(names.bigtable_instance).table(
        spec.BIGTABLE.table)
    assert set(table.list_column_families()) == set(spec.BIGTABLE.column_families)


def test_forwarder_writes_device_logs_rows_like_a_bigquery_subscription(
        pubsub_emulator, bigquery_emulator, emulator_env):
    from google.cloud import pubsub_v1

    names = provision.LocalNames(prefix="fwd-test", dataset="fwd")
    emulator_env(pubsub_emulator)
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    provision.provision_pubsub(names)
    provision.provision_bigquery(names, endpoint)
    fwd = BigQueryForwarder(names, endpoint)
    fwd.start()
    try:
        publisher = pubsub_v1.PublisherClient()
        sent = {}
        for i in range(5):
            data = json.dumps({"model_version": "v1", "score": i / 10}).encode()
            mid = publisher.publish(names.topic("device-logs"), data, deviceId=f"dev-{i:03d}").result(timeout=30)
            sent[mid] = data
        wait_for("the forwarder to write every message (the number written)", lambda: fwd.forwarded,
                 lambda n: n >= len(sent), timeout=60)
    finally:
        fwd.stop()
    client = provision.bigquery_client(names.project, endpoint)
    rows = list(client.query(f"SELECT * FROM `{names.project}.fwd.device_logs`").result(timeout=30))
    assert {r["message_id"]: r["data"].encode() for r in rows} == sent
    for r in rows:
        assert r["subscription_name"] == names.subscription("device-logs-bigquery")
        assert json.loads(r["attributes"])["deviceId"].startswith("dev-")

"""RegistryDatabase: the device registry's Firestore database as a component of its own, which the broker hosts and
the config-push function take as an input (and are granted on, and wait for)."""

from __future__ import annotations

import pulumi
import pytest

from gcp_iot_bridge.infra.registry_database import RegistryDatabase, RegistryDatabaseArgs
from tests.infra import harness

DB = "gcp:firestore/database:Database"
FIELD = "gcp:firestore/field:Field"
PROJECT_IAM = "gcp:projects/iAMMember:IAMMember"


def build(**overrides) -> harness.StackRun:
    fields = {"project": "proj-test-123", "location": "europe-west1", "deletion_protection": False, **overrides}

    def program() -> None:
        registry = RegistryDatabase("registry", RegistryDatabaseArgs(**fields))
        pulumi.export("name", registry.name)
        pulumi.export("resource_name", registry.resource_name)
        pulumi.export("location", registry.location)

    return harness.run_program("dev", program=program)


@pytest.mark.parametrize(("protected", "state"), [(False, "DELETE_PROTECTION_DISABLED"),
                                                   (True, "DELETE_PROTECTION_ENABLED")])
def test_the_database_follows_the_deletion_switch(protected: bool, state: str):
    run = build(deletion_protection=protected)
    (db,) = run.of_type(DB)
    assert (db.get("type"), db.get("locationId"), db.get("name")) == ("FIRESTORE_NATIVE", "europe-west1", "(default)")
    # Never ABANDON: a database left behind makes the next `pulumi up` fail with "already exists".
    assert (db.get("deletionPolicy"), db.get("deleteProtectionState")) == ("DELETE", state)
    assert run.outputs == {"name": "(default)", "resource_name": "projects/proj-test-123/databases/(default)",
                           "location": "europe-west1"}


def test_ttl_policies_remove_the_idempotency_markers_and_the_change_stamps_without_indexes():
    run = build(database="fleet")
    ttls = {f.get("collection"): f for f in run.of_type(FIELD)}
    assert set(ttls) == {"requests", "changes"}
    for collection, ttl in ttls.items():
        assert (ttl.get("database"), ttl.get("field")) == ("fleet", "expire_at"), collection
        # expire_at is never queried: no index. (The hosts' change query is on changes.at, whose automatic
        # single-field index is another field's.)
        assert ttl.get("indexConfig") == {"indexes": []}
        assert ttl.get("ttlConfig") == {}
    # One field operation at a time per database: Firestore answers concurrent ones with 409.
    assert run.depends_on(ttls["changes"], ttls["requests"])
    assert run.outputs["resource_name"] == "projects/proj-test-123/databases/fleet"


def test_broker_config_push_and_admin_api_are_granted_on_the_registry_database_and_wait_for_it():
    run = harness.stack_run("prod")
    (db,) = run.of_type(DB)
    (registry,) = run.of_type("gcp-iot-bridge:index:RegistryDatabase")
    assert db.parent == registry.urn
    grants = {g.name: g for g in run.of_type(PROJECT_IAM) if g.get("role") == "roles/datastore.user"}
    assert set(grants) == {"broker-datastore-user", "config-push-firestore-user", "admin-api-firestore-user"}
    for grant in grants.values():
        assert "projects/my-iot-prod-project/databases/(default)" in grant.get("condition")["expression"]
        assert run.depends_on(grant, db), grant.name
    mig = run.one("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager", "broker-mig")
    function = run.one("gcp:cloudfunctionsv2/function:Function", "config-push")
    for consumer in (mig, function):
        assert run.depends_on(consumer, db), consumer.name
    assert function.get("serviceConfig")["environmentVariables"]["FIRESTORE_DATABASE"] == "(default)"

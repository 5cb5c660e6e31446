"""Registry.session_grants, record_heartbeats and record_error: the batched calls of the front's re-check of
connected devices."""

from __future__ import annotations

import uuid

import pytest

from iotbridge.registry import Registry

pytestmark = pytest.mark.emulator


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> Registry:
    emulator_env(firestore_emulator)
    return Registry("local-project", f"reg-{uuid.uuid4().hex[:12]}", "europe-west1")


def test_session_grants_in_chunks_with_deleted_and_unknown_devices_absent(registry):
    from datetime import UTC, datetime, timedelta

    from iotbridge.device import generate_key
    from iotbridge.registry import Credential

    _, pub_a = generate_key("ES256")
    _, pub_b = generate_key("ES256")
    expiry = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    for device_id in ("dev-a", "dev-b", "dev-c", "dev-d", "dev-gone"):
        registry.create_device(device_id)
    registry.set_credentials("dev-a", [Credential("ES256_PEM", pub_a), Credential("ES256_PEM", pub_b, expiry)])
    registry.set_blocked("dev-b", True)
    registry.set_blocked("dev-d", True)
    registry.delete_device("dev-gone")

    asked = ["dev-a", "dev-b", "dev-gone", "dev-never", "dev-c", "dev-a", "dev-d"]
    # chunk=2: four round trips, duplicates asked once.
    grants = registry.session_grants(asked, chunk=2)
    assert {d: g.blocked for d, g in grants.items()} == {"dev-a": False, "dev-b": True, "dev-c": False,
                                                         "dev-d": True}
    assert {d: g.num_id for d, g in grants.items()} == {d: registry.get_device(d).num_id for d in grants}
    assert grants["dev-a"].credentials == {pub_a: None, pub_b: expiry}
    assert grants["dev-c"].credentials == {}
    registry.set_blocked("dev-b", False)
    assert registry.session_grants(["dev-b"])["dev-b"].blocked is False
    assert registry.session_grants([]) == {}

    # Deleted and created again: the same id, another numeric id, so the front can tell the two apart.
    before = grants["dev-c"].num_id
    registry.delete_device("dev-c")
    registry.create_device("dev-c")
    assert registry.session_grants(["dev-c"])["dev-c"].num_id != before


def test_record_error_keeps_the_latest_reason(registry):
    registry.create_device("dev-err")
    registry.record_error("dev-err", "rate limit: slowed")
    d = registry.get_device("dev-err")
    assert d.last_error_status == "rate limit: slowed" and d.last_error_time is not None
    registry.record_error("dev-err", "x" * 5000)
    assert len(registry.get_device("dev-err").last_error_status) == 1024


def test_record_heartbeats_batched_skips_a_deleted_device(registry):
    from datetime import UTC, datetime, timedelta

    for device_id in ("hb-a", "hb-b", "hb-c", "hb-gone"):
        registry.create_device(device_id)
    registry.delete_device("hb-gone")
    t = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    times = {"hb-a": t, "hb-b": t + timedelta(seconds=1), "hb-gone": t, "hb-c": t + timedelta(seconds=2)}
    # chunk=2: the batch holding the deleted device fails as a whole and is written one by one.
    assert registry.record_heartbeats(times, chunk=2) == 3
    assert [registry.get_device(d).last_heartbeat_time for d in ("hb-a", "hb-b", "hb-c")] == [
        t, t + timedelta(seconds=1), t + timedelta(seconds=2)]
    assert registry.record_heartbeats({}) == 0

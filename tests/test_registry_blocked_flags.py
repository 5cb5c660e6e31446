"""Registry.blocked_flags and record_heartbeats: the batched calls of the front's re-check of connected devices
(issue #7)."""

from __future__ import annotations

import uuid

import pytest

from iotbridge.registry import Registry

pytestmark = pytest.mark.emulator


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> Registry:
    emulator_env(firestore_emulator)
    return Registry("local-project", f"reg-{uuid.uuid4().hex[:12]}", "europe-west1")


def test_blocked_flags_in_chunks_with_deleted_and_unknown_devices_absent(registry):
    for device_id in ("dev-a", "dev-b", "dev-c", "dev-d", "dev-gone"):
        registry.create_device(device_id)
    registry.set_blocked("dev-b", True)
    registry.set_blocked("dev-d", True)
    registry.delete_device("dev-gone")

    asked = ["dev-a", "dev-b", "dev-gone", "dev-never", "dev-c", "dev-a", "dev-d"]
    # chunk=2: four round trips, duplicates asked once.
    assert registry.blocked_flags(asked, chunk=2) == {"dev-a": False, "dev-b": True, "dev-c": False,
                                                      "dev-d": True}
    registry.set_blocked("dev-b", False)
    assert registry.blocked_flags(["dev-b"]) == {"dev-b": False}
    assert registry.blocked_flags([]) == {}


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

"""Registry.blocked_flags: the batched read the front's re-check of connected devices uses (issue #7)."""

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

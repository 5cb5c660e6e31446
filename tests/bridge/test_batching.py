"""The raw Pub/Sub messages the bridge service batches: the same message as the protobuf built directly, with a
device's attribute map built once and copied into each of its messages."""

from __future__ import annotations

from typing import Any

import pytest

from iotbridge.bridge import batching


def test_a_message_is_the_one_built_directly_and_copies_its_attributes_once_per_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "_templates", {})
    maps_built = []
    real = batching.RawMessage

    def counting(**kwargs: Any) -> Any:  # noqa: ANN401 - a protobuf message
        if "attributes" in kwargs:
            maps_built.append(dict(kwargs["attributes"]))
        return real(**kwargs)

    monkeypatch.setattr(batching, "RawMessage", counting)
    a = {"deviceId": "d1", "deviceNumId": "1", "projectId": "p"}
    b = {**a, "subFolder": "x"}
    made = [batching.raw_message(f"m{i}".encode(), a if i % 3 else b) for i in range(30)]
    for i, m in enumerate(made):
        assert m == real(data=f"m{i}".encode(), attributes=a if i % 3 else b)
    # One map per distinct attribute set, not one per message.
    assert maps_built == [b, a]
    # A message changed later (the batcher never does; a caller could) leaves the device's next messages alone.
    made[1].attributes["deviceId"] = "other"
    assert batching.raw_message(b"n", a).attributes["deviceId"] == "d1"


def test_the_attribute_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "_templates", {})
    monkeypatch.setattr(batching, "MAX_TEMPLATES", 3)
    for i in range(10):
        assert batching.raw_message(b"x", {"deviceId": f"d{i}"}).attributes["deviceId"] == f"d{i}"
        assert len(batching._templates) <= 3


def test_the_attribute_cache_holds_every_device_a_host_carries() -> None:
    """A cache smaller than a host's devices, cleared when full, rebuilds most maps (and copies them too): slower
    than no cache. One host carries at most what the front's (or with device_auth mosquitto, Mosquitto's) idle CPU
    allows, for every machine type."""
    from iotbridge import spec
    from iotbridge.planning import host_sizing

    types = ["e2-micro", "e2-medium", "e2-standard-2", "e2-highmem-16", "n2-standard-32", "n2-highmem-128",
             "n2-custom-8-65536"]
    assert max(host_sizing.sizing(t, mode).devices for t in types for mode in spec.DEVICE_AUTH_MODES) \
        <= batching.MAX_TEMPLATES


def test_per_message_attributes_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter's attributes (its reason, its dropped size) differ per message: cached, they would push the
    devices' attribute sets out."""
    monkeypatch.setattr(batching, "_templates", {})
    batching.raw_message(b"x", {"deviceId": "d1"})
    for i in range(5):
        m = batching.raw_message(b"", {"deviceId": "d1", "dataDroppedBytes": str(i)}, cache=False)
        assert m == batching.RawMessage(data=b"", attributes={"deviceId": "d1", "dataDroppedBytes": str(i)})
    assert list(batching._templates) == [(("deviceId", "d1"),)]

"""The front's memory of QoS 1 publishes (iotbridge/bridge/resends.py): what it answers, holds and forwards, and
that it stays bounded per device and in all."""

from __future__ import annotations

from iotbridge.bridge.resends import Resends, digest

A, B = digest("/devices/d/events", b"a"), digest("/devices/d/events", b"b")


def test_a_dup_of_an_acknowledged_publish_is_answered_and_one_in_flight_held_in_its_connection_only() -> None:
    r = Resends()
    assert r.publish("d", "c1", 1, False, A) == "forward"
    assert r.publish("d", "c1", 1, True, A) == "held"  # the broker's PUBACK is still to come, in this connection
    assert r.publish("d", "c2", 1, True, A) == "forward"  # the first connection closed: the broker may lack it
    r.acknowledged("d", 1)
    assert r.publish("d", "c3", 1, True, A) == "answered"
    assert r.publish("d", "c3", 1, True, B) == "forward"  # another payload under the same packet id
    assert r.publish("d", "c3", 1, False, B) == "forward"  # the same bytes again without DUP: a new message
    assert r.publish("e", "c9", 1, True, B) == "forward"  # another device's packet ids are its own
    assert digest("/devices/d/events/x", b"a") != A  # the topic is part of what a resend repeats


def test_memory_is_bounded_per_device_and_in_all() -> None:
    r = Resends(per_device=3, max_devices=2)
    for pid in range(1, 5):
        r.publish("d", "c", pid, False, A)
        r.acknowledged("d", pid)
    assert r.publish("d", "c", 1, True, A) == "forward"  # packet id 1 was the oldest of four: forgotten
    assert r.publish("d", "c", 4, True, A) == "answered"
    r.publish("e", "c", 1, False, A)
    r.publish("f", "c", 1, False, A)
    assert len(r) == 2
    assert r.publish("d", "c", 4, True, A) == "forward"  # d was the least recently seen device: forgotten

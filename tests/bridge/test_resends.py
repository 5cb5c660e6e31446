"""A device resending a QoS 1 PUBLISH it holds no PUBACK for (DUP flag, same packet id) — after its own timeout in
the same connection, or after a reconnect because the PUBACK was lost with the connection — reaches Pub/Sub once.
The real host (front, Mosquitto, bridge service) against the Pub/Sub and Firestore emulators; the device speaks
MQTT by hand so that the test decides which PUBACKs it "lost" and which bytes it resends.

A device that sends the same bytes again without the DUP flag, or reuses a packet id for another payload, is
sending a new message: it is forwarded."""

from __future__ import annotations

import uuid

import pytest

from iotbridge.bridge import mqtt

from .conftest import PubSubReader
from .test_attacks import RawDevice, raw_device

pytestmark = pytest.mark.emulator
__all__ = ["raw_device"]  # the fixture, imported for this module's tests


def no_packet_within(dev: RawDevice, seconds: float) -> None:
    dev.sock.settimeout(seconds)
    try:
        first, body, _ = dev.packet()
    except TimeoutError:
        return
    finally:
        dev.sock.settimeout(10)
    raise AssertionError(f"unexpected packet type {first >> 4} ({body!r})")


def payloads_on_pubsub(reader: PubSubReader, n: int) -> list[bytes]:
    """Everything on the telemetry topic once ``n`` messages arrived and 2 s passed without more."""
    return sorted(m.data for m in reader.pull("telemetry", n, settle=2.0))


def front(stack) -> dict[str, int]:  # noqa: ANN001
    stats = stack.front_stats()
    return {k: stats.get(k, 0) for k in ("resends_answered", "resends_held")}


def test_a_resend_in_the_same_connection_after_the_puback_is_answered_by_the_front(raw_device, reader, stack):
    dev = raw_device()
    before = front(stack)
    first = b'{"temperature": 21}'  # Google's example payload: no time, no counter
    dev.sock.sendall(dev.publish(first, 7))
    assert dev.pubacks(1) == [7]
    # The device's timer fired before it read that PUBACK: it sends the same PUBLISH again, DUP set.
    dev.sock.sendall(dev.publish(first, 7, dup=True))
    assert dev.pubacks(1) == [7]  # the device is answered, by the front
    # New messages: the same bytes again on purpose (no DUP), and the packet id reused for other bytes with DUP.
    dev.sock.sendall(dev.publish(first, 7))
    assert dev.pubacks(1) == [7]
    other = b'{"temperature": 22}'
    dev.sock.sendall(dev.publish(other, 7, dup=True))
    assert dev.pubacks(1) == [7]
    assert payloads_on_pubsub(reader, 3) == sorted([first, first, other])
    after = front(stack)
    assert after["resends_answered"] - before["resends_answered"] == 1


def test_a_resend_while_the_original_is_in_flight_is_not_forwarded_and_gets_one_puback(raw_device, reader, stack):
    dev = raw_device()
    before = front(stack)
    payload = b'{"temperature": 23, "n": "' + uuid.uuid4().hex.encode() + b'"}'
    # One TLS write: the front reads both before the broker can acknowledge the first.
    dev.sock.sendall(dev.publish(payload, 11) + dev.publish(payload, 11, dup=True))
    assert dev.pubacks(1) == [11]
    no_packet_within(dev, 1.5)  # one PUBLISH reached the broker, so one PUBACK
    assert payloads_on_pubsub(reader, 1) == [payload]
    assert front(stack)["resends_held"] - before["resends_held"] == 1


def test_a_resend_after_a_reconnect_reaches_pubsub_once(devices, reader, stack):
    device_id, private = devices.register("ES256")
    dev = RawDevice(stack, device_id, private)
    payload = b"\x08\x96\x01 protobuf bytes nobody decodes"
    dev.sock.sendall(dev.publish(payload, 42, topic=f"/devices/{device_id}/events/blob"))
    dev.pubacks(1)  # the broker has it; this PUBACK is the one "lost" with the connection
    dev.close()
    again = RawDevice(stack, device_id, private)
    try:
        again.sock.sendall(again.publish(payload, 42, topic=f"/devices/{device_id}/events/blob", dup=True))
        assert again.pubacks(1) == [42]
        # The same bytes on another subfolder are another message.
        again.sock.sendall(again.publish(payload, 42, dup=True))
        assert again.pubacks(1) == [42]
    finally:
        again.close()
    got = reader.pull("telemetry", 2, settle=2.0)
    assert sorted((m.data, m.attributes.get("subFolder", "")) for m in got) == [(payload, ""), (payload, "blob")]


def test_the_front_s_own_puback_is_a_well_formed_puback_for_both_mqtt_levels():
    from iotbridge.bridge.resends import puback

    framer = mqtt.Framer(16)
    ((first, body, raw),) = list(framer.feed(puback(0xBEEF)))
    assert (first >> 4, mqtt.packet_id_of_ack(body), len(raw)) == (mqtt.PUBACK, 0xBEEF, 4)

"""A device's resent QoS 1 PUBLISH, recognised by the front so that it is not forwarded a second time.

A device that holds no PUBACK for a QoS 1 PUBLISH sends it again with the DUP flag and the same packet id: after a
reconnect (the PUBACK was lost with the connection; MQTT 3.1.1 §4.4, MQTT 5 §4.4), and with some firmware after its
own timeout in the same connection. The bridge would forward it to Pub/Sub as a new message (a new message id), and
for a payload without its own time or counter the pipeline could not tell it from a new reading.

The front remembers, per device and across the device's connections to this host, the latest QoS 1 publish of each
packet id: a digest of its topic and payload, and whether the broker acknowledged it (its PUBACK passed to the
device). A DUP publish with the same packet id and digest is then

- **acknowledged**: the broker holds the original; the front answers the device's resend with a PUBACK itself and
  forwards nothing;
- **in flight in this connection**: the broker's PUBACK for the original is on its way and answers the resend too;
  nothing is forwarded;
- anything else (unknown, a different payload, in flight in a connection that has since closed: the broker may or
  may not hold that one): forwarded, as at-least-once delivery requires.

What this does not see, and docs/messages.md says so: a resend that lands on another broker host, a resend without
the DUP flag, and a device sending the same bytes twice on purpose (a new message, rightly forwarded).

Pure bookkeeping, no I/O: the front calls it from its relay loop.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Literal

# Per device: the publishes of this many packet ids are remembered (a device has at most its in-flight window of
# QoS 1 publishes unacknowledged; MQTT 5's Receive Maximum defaults to 65,535, Mosquitto's to 20).
PER_DEVICE = 64
MAX_DEVICES = 100_000

Verdict = Literal["forward", "answered", "held"]


def digest(topic: str, payload: memoryview | bytes) -> bytes:
    h = hashlib.blake2b(payload, digest_size=16)
    h.update(topic.encode())
    return h.digest()


class Resends:
    """Device id → packet id → [digest, connection id while in flight or None once acknowledged]."""

    def __init__(self, per_device: int = PER_DEVICE, max_devices: int = MAX_DEVICES):
        self.per_device = per_device
        self.max_devices = max_devices
        self._devices: OrderedDict[str, dict[int, list[object]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._devices)

    def publish(self, device_id: str, connection: str, packet_id: int, dup: bool, sha: bytes) -> Verdict:
        """What to do with a device's QoS 1 PUBLISH; records it when it is forwarded."""
        known = self._devices.get(device_id)
        if known is None:
            known = self._devices[device_id] = {}
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device_id)
        entry = known.get(packet_id)
        if dup and entry is not None and entry[0] == sha:
            if entry[1] is None:
                return "answered"
            if entry[1] == connection:
                return "held"
        known.pop(packet_id, None)  # re-inserted last: the dict's order is the order of use
        known[packet_id] = [sha, connection]
        if len(known) > self.per_device:
            del known[next(iter(known))]
        return "forward"

    def acknowledged(self, device_id: str, packet_id: int) -> None:
        """The broker's PUBACK for ``packet_id`` passed to the device."""
        known = self._devices.get(device_id)
        entry = known.get(packet_id) if known is not None else None
        if entry is not None:
            entry[1] = None


def puback(packet_id: int) -> bytes:
    """A PUBACK for ``packet_id``; the same bytes are a success PUBACK in MQTT 3.1.1 and 5 (remaining length 2)."""
    return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))

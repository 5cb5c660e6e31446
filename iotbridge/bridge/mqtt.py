"""Just enough MQTT 3.1.1 / 5 packet codec for the TLS front: framing, CONNECT, PUBLISH and SUBSCRIBE.

The front never builds a broker: it reads whole packets from the device, looks at the few fields the device
protocol restricts (docs/device-protocol.md), and forwards the original bytes — except CONNECT, which it re-encodes with
the authenticated identity. Spec references: MQTT 3.1.1 §2-3, MQTT 5.0 §2-3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

MQTT_311, MQTT_5 = 4, 5

# CONNACK return codes (3.1.1) and reason codes (5) the front answers with when it refuses a CONNECT.
REFUSE_PROTOCOL = {MQTT_311: 0x01, MQTT_5: 0x84}
REFUSE_CLIENT_ID = {MQTT_311: 0x02, MQTT_5: 0x85}
REFUSE_BAD_PASSWORD = {MQTT_311: 0x04, MQTT_5: 0x86}
REFUSE_NOT_AUTHORIZED = {MQTT_311: 0x05, MQTT_5: 0x87}
REFUSE_UNAVAILABLE = {MQTT_311: 0x03, MQTT_5: 0x88}

# MQTT 5 property identifiers whose value is not self-delimiting by type: id -> value kind.
_PROPERTY_KINDS = {
    0x01: "byte", 0x02: "int4", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint", 0x11: "int4",
    0x12: "str", 0x13: "int2", 0x15: "str", 0x16: "bin", 0x17: "byte", 0x18: "int4", 0x19: "byte",
    0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "int2", 0x22: "int2", 0x23: "int2", 0x24: "byte",
    0x25: "byte", 0x26: "pair", 0x27: "int4", 0x28: "byte", 0x29: "byte", 0x2A: "byte",
}
PROP_SESSION_EXPIRY = 0x11
PROP_TOPIC_ALIAS = 0x23


class ProtocolError(Exception):
    """The peer sent bytes that are not a well-formed MQTT packet."""


class PacketTooLarge(ProtocolError):
    pass


def encode_varint(n: int) -> bytes:
    if n < 0 or n > 268_435_455:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    for i in range(4):
        if pos + i >= len(buf):
            raise ProtocolError("truncated variable byte integer")
        b = buf[pos + i]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos + i + 1
        mult *= 128
    raise ProtocolError("malformed variable byte integer")


async def read_packet(reader: asyncio.StreamReader, max_size: int) -> tuple[int, bytes, bytes]:
    """One packet: (first byte, body, raw bytes as received). ``IncompleteReadError`` at EOF."""
    head = await reader.readexactly(1)
    length, mult, lb = 0, 1, bytearray()
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        lb.append(b)
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    else:
        raise ProtocolError("malformed remaining length")
    if length > max_size:
        raise PacketTooLarge(f"packet of {length} bytes exceeds {max_size}")
    body = await reader.readexactly(length) if length else b""
    return head[0], body, head + bytes(lb) + body


class Framer:
    """Cuts a byte stream, fed one socket read at a time, into whole packets.

    The relay reads whatever the socket holds rather than one packet at a time (three small reads per packet and
    a write per packet were most of the front's CPU in a py-spy profile); this keeps the incomplete tail between reads.
    ``feed`` yields ``(first byte, body, raw bytes)`` of each complete packet in order. A malformed or oversized
    header raises ``ProtocolError`` at its place in the stream, after the packets before it were yielded; the
    stream is unusable after that (the caller closes the connection). The size limit is checked on the header,
    before the body is buffered.
    """

    __slots__ = ("max_size", "_tail", "_buffered", "_need")  # two per connected device

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._tail: list[bytes] = []  # the bytes of the incomplete packet at the head of the stream
        self._buffered = 0
        self._need = 0  # bytes that packet needs in all, 0 while its header is incomplete

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
        if self._tail:
            self._tail.append(data)
            self._buffered += len(data)
            if self._buffered < self._need:  # a large packet arriving over many reads: join it once
                return
            data = b"".join(self._tail)
            self._tail, self._buffered = [], 0
        pos, end_of_data = 0, len(data)
        while pos < end_of_data:
            length, mult, i = 0, 1, pos + 1
            while True:
                if i - pos > 4:
                    raise ProtocolError("malformed remaining length")
                if i >= end_of_data:
                    self._keep(data, pos, 0)
                    return
                b = data[i]
                i += 1
                length += (b & 0x7F) * mult
                if not b & 0x80:
                    break
                mult *= 128
            if length > self.max_size:
                raise PacketTooLarge(f"packet of {length} bytes exceeds {self.max_size}")
            end = i + length
            if end > end_of_data:
                self._keep(data, pos, end - pos)
                return
            yield data[pos], data[i:end], data[pos:end]
            pos = end

    def _keep(self, data: bytes, pos: int, need: int) -> None:
        self._tail = [data[pos:]]
        self._buffered = len(data) - pos
        self._need = need


def _read_u16(buf: bytes, pos: int) -> tuple[int, int]:
    if pos + 2 > len(buf):
        raise ProtocolError("truncated two-byte integer")
    return int.from_bytes(buf[pos:pos + 2], "big"), pos + 2


def _read_bin(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_u16(buf, pos)
    if pos + n > len(buf):
        raise ProtocolError("truncated string")
    return bytes(buf[pos:pos + n]), pos + n


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    raw, pos = _read_bin(buf, pos)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None
    if "\x00" in s:
        raise ProtocolError("string contains NUL")
    return s, pos


def _bin(b: bytes) -> bytes:
    if len(b) > 65535:
        raise ValueError("field longer than 65535 bytes")
    return len(b).to_bytes(2, "big") + b


def read_properties(buf: bytes, pos: int) -> tuple[list[tuple[int, bytes]], int]:
    """MQTT 5 properties as (id, raw value bytes) in order; a malformed block raises ProtocolError."""
    length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise ProtocolError("truncated properties")
    props: list[tuple[int, bytes]] = []
    while pos < end:
        pid, vstart = decode_varint(buf, pos)
        kind = _PROPERTY_KINDS.get(pid)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
        if kind == "byte":
            vend = vstart + 1
        elif kind == "int2":
            vend = vstart + 2
        elif kind == "int4":
            vend = vstart + 4
        elif kind == "varint":
            _, vend = decode_varint(buf, vstart)
        elif kind in ("str", "bin"):
            _, vend = _read_bin(buf, vstart)
        else:  # pair
            _, mid = _read_bin(buf, vstart)
            _, vend = _read_bin(buf, mid)
        if vend > end:
            raise ProtocolError("property overruns its block")
        props.append((pid, bytes(buf[vstart:vend])))
        pos = vend
    return props, end


def encode_properties(props: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(encode_varint(pid) + value for pid, value in props)
    return encode_varint(len(body)) + body


@dataclass(frozen=True)
class Connect:
    level: int
    clean: bool
    keepalive: int
    client_id: str
    username: str | None
    password: bytes | None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    properties: tuple[tuple[int, bytes], ...] = ()
    will_properties: tuple[tuple[int, bytes], ...] = ()


def parse_connect(body: bytes) -> Connect:
    name, pos = _read_str(body, 0)
    if pos + 4 > len(body):
        raise ProtocolError("truncated CONNECT")
    level, flags = body[pos], body[pos + 1]
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocol(f"protocol {name!r} level {level}")
    keepalive = int.from_bytes(body[pos + 2:pos + 4], "big")
    pos += 4
    if flags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    props: list[tuple[int, bytes]] = []
    if level == MQTT_5:
        props, pos = read_properties(body, pos)
    client_id, pos = _read_str(body, pos)
    will_topic, will_payload, will_props = None, b"", []
    if flags & 0x04:
        if level == MQTT_5:
            will_props, pos = read_properties(body, pos)
        will_topic, pos = _read_str(body, pos)
        will_payload, pos = _read_bin(body, pos)
    username = password = None
    if flags & 0x80:
        username, pos = _read_str(body, pos)
    if flags & 0x40:
        password, pos = _read_bin(body, pos)
    if pos != len(body):
        raise ProtocolError("trailing bytes in CONNECT")
    return Connect(level=level, clean=bool(flags & 0x02), keepalive=keepalive, client_id=client_id,
                   username=username, password=password, will_topic=will_topic, will_payload=will_payload,
                   will_qos=(flags >> 3) & 0x03, will_retain=bool(flags & 0x20), properties=tuple(props),
                   will_properties=tuple(will_props))


class UnsupportedProtocol(ProtocolError):
    pass


def encode_connect(c: Connect) -> bytes:
    flags = 0x02 if c.clean else 0
    if c.will_topic is not None:
        flags |= 0x04 | (c.will_qos << 3) | (0x20 if c.will_retain else 0)
    if c.username is not None:
        flags |= 0x80
    if c.password is not None:
        flags |= 0x40
    body = bytearray(_bin(b"MQTT") + bytes([c.level, flags]) + c.keepalive.to_bytes(2, "big"))
    if c.level == MQTT_5:
        body += encode_properties(list(c.properties))
    body += _bin(c.client_id.encode())
    if c.will_topic is not None:
        if c.level == MQTT_5:
            body += encode_properties(list(c.will_properties))
        body += _bin(c.will_topic.encode()) + _bin(c.will_payload)
    if c.username is not None:
        body += _bin(c.username.encode())
    if c.password is not None:
        body += _bin(c.password)
    return bytes([CONNECT << 4]) + encode_varint(len(body)) + bytes(body)


def rewrite_connect(c: Connect, client_id: str, username: str, password: bytes) -> Connect:
    """The CONNECT the broker sees: the authenticated identity, a clean session (commands are not stored), and a
    will that is not retained (device messages are never kept by the broker)."""
    props = tuple((pid, v) for pid, v in c.properties if pid != PROP_SESSION_EXPIRY)
    return replace(c, client_id=client_id, username=username, password=password, clean=True, properties=props,
                   will_retain=False)


def connack(level: int, code: int) -> bytes:
    if level == MQTT_5:
        return bytes([CONNACK << 4, 3, 0, code, 0])
    return bytes([CONNACK << 4, 2, 0, code])


@dataclass(frozen=True)
class Publish:
    topic: str
    qos: int
    retain: bool
    packet_id: int | None
    payload_len: int
    payload_offset: int
    topic_alias: int | None = None


def parse_publish(first: int, body: bytes, level: int) -> Publish:
    qos = (first >> 1) & 0x03
    topic, pos = _read_str(body, 0)
    packet_id = None
    if qos:
        packet_id, pos = _read_u16(body, pos)
    alias = None
    if level == MQTT_5:
        props, pos = read_properties(body, pos)
        for pid, value in props:
            if pid == PROP_TOPIC_ALIAS:
                alias = int.from_bytes(value, "big")
    return Publish(topic=topic, qos=qos, retain=bool(first & 0x01), packet_id=packet_id,
                   payload_len=len(body) - pos, payload_offset=pos, topic_alias=alias)


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int, int], ...]  # (filter, options byte, offset of the options byte in body)


def parse_subscribe(body: bytes, level: int) -> Subscribe:
    packet_id, pos = _read_u16(body, 0)
    if level == MQTT_5:
        _, pos = read_properties(body, pos)
    filters = []
    while pos < len(body):
        f, pos = _read_str(body, pos)
        if pos >= len(body):
            raise ProtocolError("SUBSCRIBE filter without options")
        filters.append((f, body[pos], pos))
        pos += 1
    if not filters:
        raise ProtocolError("SUBSCRIBE without filters")
    return Subscribe(packet_id=packet_id, filters=tuple(filters))


def packet_id_of_ack(body: bytes) -> int:
    return _read_u16(body, 0)[0]

"""The front's MQTT codec and JWT checks, without any service: fast and exhaustive on the edge cases."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import jwt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotbridge.bridge import mqtt
from iotbridge.bridge.auth import AuthError, ClientIdError, parse_client_id, verify_jwt
from iotbridge.bridge.front import session_deadline, subscription_allowed, topic_kind, verify_client_certificate
from iotbridge.device import generate_key
from iotbridge.registry import Credential
from tests.aio import run_in_own_loop


def _read(raw: bytes, max_size: int = 1 << 20) -> tuple[int, bytes, bytes]:
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(raw)
        r.feed_eof()
        return await mqtt.read_packet(r, max_size)

    return run_in_own_loop(go())


def _paho_connect(protocol: int, will: bool) -> bytes:
    """The CONNECT bytes paho itself sends, read off a loopback socket, so the codec meets a real client."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="projects/p/locations/r/registries/g/devices/d-1",
                    protocol=protocol)
    c.username_pw_set("unused", "the.jwt.password")
    props = None
    if protocol == paho.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.UserProperty = ("k", "v")
    if will:
        wp = None
        if protocol == paho.MQTTv5:
            wp = Properties(PacketTypes.WILLMESSAGE)
            wp.WillDelayInterval = 5
        c.will_set("/devices/d-1/state", b"gone", qos=1, retain=True, properties=wp)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        c.connect("127.0.0.1", server.getsockname()[1], keepalive=30, properties=props)
        conn, _ = server.accept()
        with conn:
            c.loop_write()
            conn.settimeout(10)
            data = b""
            while True:
                data += conn.recv(65536)
                try:
                    _read(data)
                    break
                except asyncio.IncompleteReadError:
                    continue
    sock = c.socket()
    if sock is not None:
        sock.close()
    return data


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
@pytest.mark.parametrize("will", [False, True])
def test_connect_from_paho_parses_and_rewrites(protocol, will):
    first, body, raw = _read(_paho_connect(protocol, will))
    assert first >> 4 == mqtt.CONNECT
    c = mqtt.parse_connect(body)
    assert (c.level, c.client_id, c.username, c.password, c.keepalive) == (
        protocol, "projects/p/locations/r/registries/g/devices/d-1", "unused", b"the.jwt.password", 30)
    # An untouched re-encode gives paho's bytes back: nothing is lost in the round trip.
    assert mqtt.encode_connect(c) == raw
    if will:
        assert (c.will_topic, c.will_payload, c.will_qos, c.will_retain) == ("/devices/d-1/state", b"gone", 1, True)
    out = mqtt.rewrite_connect(c, "d-1", "front", b"secret")
    again = mqtt.parse_connect(_read(mqtt.encode_connect(out))[1])
    assert (again.client_id, again.username, again.password, again.clean) == ("d-1", "front", b"secret", True)
    assert again.will_retain is False and again.will_payload == (b"gone" if will else b"")
    if protocol == paho.MQTTv5:
        ids = [pid for pid, _ in again.properties]
        assert mqtt.PROP_SESSION_EXPIRY not in ids and 0x26 in ids  # user property kept, session expiry gone
        if will:
            assert again.will_properties == c.will_properties


def test_malformed_packets_are_protocol_errors():
    with pytest.raises(mqtt.ProtocolError):
        _read(bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))  # remaining length of five bytes
    with pytest.raises(mqtt.PacketTooLarge):
        _read(bytes([0x30]) + mqtt.encode_varint(2000) + b"x" * 2000, max_size=1000)
    with pytest.raises(mqtt.UnsupportedProtocol):
        mqtt.parse_connect(b"\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x01x")  # MQTT 3.1
    with pytest.raises(mqtt.ProtocolError):
        mqtt.parse_connect(b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x05ab")  # client id overruns the packet
    with pytest.raises(mqtt.ProtocolError):
        mqtt.parse_publish(0x30, b"\x00\x03a\x00b", 4)  # NUL in a topic


def test_publish_and_subscribe_fields_v5():
    props = mqtt.encode_properties([(0x23, (7).to_bytes(2, "big")), (0x26, b"\x00\x01k\x00\x01v")])
    body = b"\x00\x0b/devices/dd" + (42).to_bytes(2, "big") + props + b"payload"
    p = mqtt.parse_publish(0x32, body, mqtt.MQTT_5)
    assert (p.topic, p.qos, p.packet_id, p.topic_alias, p.payload_len) == ("/devices/dd", 1, 42, 7, 7)
    assert body[p.payload_offset:] == b"payload"
    sub = mqtt.parse_subscribe((5).to_bytes(2, "big") + b"\x00" + b"\x00\x03a/b\x06" + b"\x00\x01#\x01",
                               mqtt.MQTT_5)
    assert sub.packet_id == 5 and [(f, o) for f, o, _ in sub.filters] == [("a/b", 6), ("#", 1)]


@pytest.mark.parametrize("topic,kind", [
    ("/devices/dev-1/events", "events"), ("/devices/dev-1/events/a/b", "events"), ("/devices/dev-1/state", "state"),
    ("/devices/dev-1/events/", None), ("/devices/dev-1/events/+", None), ("/devices/dev-1/config", None),
    ("/devices/dev-2/events", None), ("/devices/dev-1/state/x", None), ("devices/dev-1/events", None),
    ("/devices/dev-1x/events", None),
])
def test_publish_topics(topic, kind):
    assert topic_kind(topic, "dev-1") == kind


@pytest.mark.parametrize("f,ok", [
    ("/devices/dev-1/config", True), ("/devices/dev-1/commands/#", True), ("/devices/dev-1/commands", True),
    ("/devices/dev-1/commands/reboot", True), ("/devices/dev-1/commands/a/#", True), ("#", False),
    ("/devices/+/config", False), ("/devices/dev-1/#", False), ("/devices/dev-1/commands/+", False),
    ("/devices/dev-2/config", False), ("/devices/dev-1/events", False), ("/devices/dev-1/commands/", False),
])
def test_subscription_filters(f, ok):
    assert subscription_allowed(f, "dev-1") is ok


def test_client_id_path():
    assert parse_client_id("projects/p/locations/r/registries/g/devices/dev-1", "p", "r", "g") == "dev-1"
    base = "projects/p/locations/r/registries/g/devices/"
    for bad in (base + "de", base + "a+b", base + "dev-1/x", base.replace("/p/", "/q/") + "d1x", "dev-1", ""):
        with pytest.raises(ClientIdError):
            parse_client_id(bad, "p", "r", "g")


@pytest.fixture(scope="module")
def es256():
    private, public = generate_key("ES256")
    return private, Credential("ES256_PEM", public)


def _token(private: bytes, iat: float, exp: float, aud: str = "proj") -> str:
    return jwt.encode({"iat": int(iat), "exp": int(exp), "aud": aud}, private, algorithm="ES256")


def test_jwt_window_rules(es256, clock):
    private, cred = es256
    now = clock.time()
    at = clock.now()  # the bridge's clock: every window rule is judged against it, not the process's

    def verify(token: str):  # noqa: ANN202
        return verify_jwt(token, [cred], "proj", now=at)

    ok = verify(_token(private, now, now + 3600))
    assert ok.algorithm == "ES256" and abs(ok.expires_at.timestamp() - (now + 3600)) < 2
    verify(_token(private, now + 590, now + 3600))  # iat 9m50s ahead: skew allowed
    verify(_token(private, now - 10, now + 24 * 3600 - 10))  # exactly 24 h
    for token, reason in (
        (_token(private, now + 700, now + 3600), "future"),
        (_token(private, now - 7200, now - 1), "expired"),
        (_token(private, now, now + 24 * 3600 + 1), "24 h"),
        (_token(private, now, now + 3600, aud="other"), "aud"),
        (jwt.encode({"iat": int(now), "nbf": int(now) + 700, "exp": int(now) + 3600, "aud": "proj"}, private,
                    algorithm="ES256"), "nbf"),
    ):
        with pytest.raises(AuthError, match=reason):
            verify(token)


def test_jwt_credential_selection(es256, clock):
    private, cred = es256
    now, at = clock.time(), clock.now()
    token = _token(private, now, now + 600)
    expired = Credential("ES256_PEM", cred.public_key_pem, expiration_time=at - timedelta(seconds=1))
    with pytest.raises(AuthError, match="no unexpired"):
        verify_jwt(token, [expired], "proj", now=at)
    valid = Credential("ES256_PEM", cred.public_key_pem, expiration_time=at + timedelta(hours=1))
    assert verify_jwt(token, [expired, valid], "proj", now=at).algorithm == "ES256"
    other_private, other_public = generate_key("ES256")
    # The right key among several is found; a token from another key matches none.
    assert verify_jwt(token, [Credential("ES256_PEM", other_public), cred], "proj", now=at).algorithm == "ES256"
    with pytest.raises(AuthError, match="signature"):
        verify_jwt(_token(other_private, now, now + 600), [cred], "proj", now=at)
    rsa_private, rsa_public = generate_key("RS256")
    with pytest.raises(AuthError, match="no unexpired RS256"):
        verify_jwt(jwt.encode({"iat": int(now), "exp": int(now) + 60, "aud": "proj"}, rsa_private, algorithm="RS256"),
                   [cred], "proj", now=at)


def test_client_certificate_session_ends_at_the_earliest_of_certificate_credential_and_24_hours(clock):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    at = clock.now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    not_after = (at + timedelta(days=30)).replace(microsecond=0)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(at - timedelta(minutes=1))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    der = cert.public_bytes(serialization.Encoding.DER)
    plain, expiring = Credential("ES256_X509_PEM", pem), Credential("ES256_X509_PEM", pem, at + timedelta(hours=1))
    assert verify_client_certificate(der, [plain], now=at) == (not_after, plain)
    assert verify_client_certificate(der, [expiring], now=at) == (not_after, expiring)
    # The session ends at the earliest of: the certificate's notAfter, the credential's expiry, 24 h from now.
    assert session_deadline(at, not_after, None) == at + timedelta(hours=24)
    assert session_deadline(at, not_after, expiring.expiration_time) == at + timedelta(hours=1)
    assert session_deadline(at, at + timedelta(minutes=5), expiring.expiration_time) == at + timedelta(minutes=5)
    with pytest.raises(AuthError, match="no unexpired"):
        verify_client_certificate(der, [Credential("ES256_X509_PEM", pem, at - timedelta(seconds=1))], now=at)
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(AuthError, match="no unexpired"):  # a raw key is not an X.509 credential
        verify_client_certificate(der, [Credential("ES256_PEM", other)], now=at)


def _publish(topic: str, payload: bytes, packet_id: int = 1, first: int = 0x32) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + packet_id.to_bytes(2, "big") + payload
    return bytes([first]) + mqtt.encode_varint(len(body)) + body


def test_framer_yields_every_packet_of_one_read():
    packets = [_publish("/devices/d/events", b"a" * n, packet_id=n + 1) for n in (0, 1, 200, 20_000)]
    packets.append(bytes([mqtt.PINGREQ << 4, 0]))
    got = list(mqtt.Framer(1 << 20).feed(b"".join(packets)))
    assert [raw for _, _, raw in got] == packets
    assert [first for first, _, _ in got] == [0x32] * 4 + [0xC0]
    assert [body for _, body, _ in got][-2:] == [packets[3][4:], b""]  # 20 kB body: 3-byte remaining length


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_framer_joins_packets_split_across_reads(step):
    packets = [_publish("/devices/d/events", bytes([i]) * 150, packet_id=i + 1) for i in range(5)]
    packets.append(_publish("/devices/d/state", b"s" * 70_000))
    stream = b"".join(packets)
    framer = mqtt.Framer(1 << 20)
    got = [raw for i in range(0, len(stream), step) for _, _, raw in framer.feed(stream[i:i + step])]
    assert got == packets
    assert list(framer.feed(b"")) == []  # nothing left over


def test_framer_yields_the_packets_before_a_bad_header_then_fails():
    ok = _publish("/devices/d/events", b"ok")
    framer = mqtt.Framer(1000)
    seen = []
    with pytest.raises(mqtt.PacketTooLarge):
        # The size is refused from the header alone: the 2000-byte body never has to arrive.
        for _, _, raw in framer.feed(ok + bytes([0x30]) + mqtt.encode_varint(2000) + b"x" * 10 + ok):
            seen.append(raw)
    assert seen == [ok]
    with pytest.raises(mqtt.ProtocolError):
        list(mqtt.Framer(1000).feed(bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF])))  # five length bytes, no sixth needed

"""Every attack on identity, topics and framing is refused, against the real front, Mosquitto and emulators."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import paho.mqtt.client as paho
import pytest

from iotbridge.bridge import mqtt
from iotbridge.device import ConnectError, Device, create_jwt, generate_key
from iotbridge.registry import Credential
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY, retained

pytestmark = pytest.mark.emulator


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_jwt(header: dict, claims: dict, hmac_key: bytes | None = None) -> str:
    """A JWT built by hand, for algorithms PyJWT rightly refuses to produce with an asymmetric key."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key else b""
    return f"{signing_input}.{b64(sig)}"


class Spy:
    """A privileged wildcard subscriber on the loopback listener: sees every device message the broker routes."""

    def __init__(self, stack):
        self.seen: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"iotbridge:spy:{uuid.uuid4().hex[:6]}")
        c.username_pw_set("bridge", stack.settings.secrets()["bridge"])
        c.on_connect = lambda cl, *a: cl.subscribe([("/devices/#", 1)])
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = lambda cl, ud, m: self.seen.append((m.topic, bytes(m.payload)))
        c.connect(stack.settings.broker_host, stack.settings.broker_port)
        c.loop_start()
        assert self.ready.wait(10)
        self.client = c

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def spy(stack):
    s = Spy(stack)
    yield s
    s.close()


# The CONNACK refusals the front answers with (MQTT 3.1.1 codes as paho names them).
CLIENT_ID_REJECTED = "Client identifier not valid"  # 2
BAD_CREDENTIALS = "Bad user name or password"  # 4
NOT_AUTHORIZED = "Not authorized"  # 5


def expect_refused(connect, reason: str) -> None:
    """The front answered with the refusing CONNACK ``reason`` (not a timeout, not a dropped socket, not another
    refusal)."""
    with pytest.raises(ConnectError) as err:
        connect()
    assert err.value.reason is not None, f"no CONNACK: {err.value}"
    assert str(err.value.reason) == reason, err.value


def assert_dropped(dev, timeout: float = 10.0) -> None:
    dev.disconnects.get(timeout=timeout)
    assert not dev.is_connected()


def marker_roundtrip(devices, spy) -> None:
    """A legit message after the attack: once the spy sees it, anything the attack let through would be seen."""
    ok = devices.connected("ES256")
    marker = uuid.uuid4().bytes
    ok.publish_event(marker).wait_for_publish(10)
    wait_for("marker at the spy", lambda: any(p == marker for _, p in spy.seen), timeout=10)


# ------------------------------------------------------------------------------------------- topics


def test_cross_device_publish_reaches_nobody(devices, stack, spy, reader):
    victim = devices.connected("ES256")
    attacker = devices.connected("ES256")
    payload = b"forged-" + uuid.uuid4().bytes
    attacker.client.publish(f"/devices/{victim.identity.device_id}/events", payload, qos=1)
    assert_dropped(attacker)
    marker_roundtrip(devices, spy)
    assert not [p for _, p in spy.seen if p == payload]
    assert payload not in [m.data for m in reader.drain("telemetry")]


def test_broker_acl_alone_confines_a_session_to_its_client_id(stack, spy):
    """Defense in depth: even a session that skipped the front's checks cannot publish for another device."""
    payload = b"acl-" + uuid.uuid4().hex.encode()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.settings.broker_port), "-u", "front", "-P",
         stack.settings.secrets()["front"], "-i", "dev-aaa", "-q", "1", "-t", "/devices/dev-bbb/events",
         "-m", payload.decode()], timeout=10)
    own = b"own-" + uuid.uuid4().hex.encode()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(stack.settings.broker_port), "-u", "front", "-P",
         stack.settings.secrets()["front"], "-i", "dev-aaa", "-q", "1", "-t", "/devices/dev-aaa/events",
         "-m", own.decode()], check=True, timeout=10)
    wait_for("own publish at the spy", lambda: any(p == own for _, p in spy.seen), timeout=10)
    assert not [p for _, p in spy.seen if p == payload]


@pytest.mark.parametrize("topic_filter", ["#", "/devices/+/config", "/devices/{victim}/config",
                                          "/devices/{victim}/commands/#", "/devices/{me}/+"])
def test_foreign_or_wildcard_subscribe_is_refused(devices, topic_filter):
    victim = devices.connected("ES256")
    attacker = devices.connected("ES256")
    f = topic_filter.format(victim=victim.identity.device_id, me=attacker.identity.device_id)
    acked = threading.Event()
    attacker.client.on_subscribe = lambda *a: acked.set()
    attacker.client.subscribe(f, qos=1)
    assert_dropped(attacker)
    assert not acked.is_set()


def test_will_message_to_another_device_is_refused(devices):
    victim_id, _ = devices.register("ES256")
    device_id, private = devices.register("ES256")
    dev = devices.device(device_id, private)
    dev.client.will_set(f"/devices/{victim_id}/events", b"forged will", qos=1)
    expect_refused(lambda: dev.connect(), NOT_AUTHORIZED)


def test_publish_to_config_or_commands_topic_is_refused(devices):
    dev = devices.connected("ES256")
    dev.client.publish(dev.config_topic, b"self-config", qos=1)
    assert_dropped(dev)


# ------------------------------------------------------------------------------------------- identity


def test_client_id_takeover_with_other_credentials_is_refused(devices):
    victim = devices.connected("ES256")
    attacker_id, attacker_key = devices.register("ES256")
    # The attacker's own valid JWT, but the victim's client id.
    impostor = devices.device(victim.identity.device_id, attacker_key)
    # The JWT is signed by a key the victim does not have: refused as bad credentials, the victim undisturbed.
    expect_refused(lambda: impostor.connect(), BAD_CREDENTIALS)
    assert victim.is_connected() and victim.disconnects.empty()
    victim.publish_event(b"still here").wait_for_publish(10)
    # The attacker's own key still works for the attacker's own id: the refusal was about the pairing.
    devices.device(attacker_id, attacker_key).connect()


def test_second_connection_of_the_same_device_replaces_the_first(devices):
    device_id, private = devices.register("ES256")
    first = devices.device(device_id, private)
    first.connect()
    second = devices.device(device_id, private)
    second.connect()
    assert_dropped(first)
    assert second.is_connected()


@pytest.mark.parametrize("case", ["other-project", "other-region"])
def test_client_id_of_another_deployment_is_refused(devices, stack, case):
    device_id, private = devices.register("ES256")
    other = {"other-project": {"project": "someone-else"}, "other-region": {"region": "us-central1"}}[case]
    identity = dataclasses.replace(devices.device(device_id, private).identity, **other)
    d = Device(identity, stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
    devices.created.append(d)
    expect_refused(d.connect, CLIENT_ID_REJECTED)


def test_client_id_naming_a_registry_the_device_is_not_in_is_refused_as_an_unknown_device(devices, stack):
    """A deployment has several registries: a client id may name any of them, and the device must be in the one it
    names. Another registry (existing or not) answers as an unknown device does, telling nothing about which
    registries exist."""
    device_id, private = devices.register("ES256")
    identity = dataclasses.replace(devices.device(device_id, private).identity, registry_id="other-reg")
    d = Device(identity, stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
    devices.created.append(d)
    expect_refused(d.connect, BAD_CREDENTIALS)


def test_client_id_that_is_not_a_device_path_is_refused(devices, stack):
    device_id, private = devices.register("ES256")
    out = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(stack.mqtt_port), "--cafile", str(stack.ca_cert),
         "-i", device_id, "-u", "unused", "-P", create_jwt(PROJECT, private, "ES256"), "-q", "1",
         "-t", f"/devices/{device_id}/events", "-m", "x"], capture_output=True, timeout=20)
    assert out.returncode != 0, out
    assert b"identifier rejected" in out.stderr, out.stderr  # CONNACK 2, as mosquitto_pub names it


def _claims(now: float, **over) -> dict:
    return {"iat": int(now), "exp": int(now) + 3600, "aud": PROJECT, **over}


@pytest.mark.parametrize("case", ["expired", "over-24h", "future-iat", "wrong-aud", "no-exp", "garbage"])
def test_bad_jwt_is_refused(devices, case):
    device_id, private = devices.register("ES256")
    now = time.time()
    claims = {
        "expired": _claims(now - 7200, exp=int(now) - 60),
        "over-24h": _claims(now, exp=int(now) + 24 * 3600 + 1),
        "future-iat": _claims(now + 11 * 60),
        "wrong-aud": _claims(now, aud="another-project"),
        "no-exp": {"iat": int(now), "aud": PROJECT},
        "garbage": None,
    }[case]
    token = "not.a.jwt" if claims is None else jwt.encode(claims, private, algorithm="ES256")
    expect_refused(lambda: devices.device(device_id, private).connect(password=token), BAD_CREDENTIALS)


def test_clock_skew_within_ten_minutes_is_accepted(devices):
    device_id, private = devices.register("ES256")
    now = time.time()
    token = jwt.encode(_claims(now + 5 * 60), private, algorithm="ES256")
    devices.device(device_id, private).connect(password=token)


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_alg_none_and_hs256_are_refused(devices, registry, alg):
    device_id, private = devices.register("RS256")
    public_pem = registry.get_device(device_id).credentials[0].public_key_pem.encode()
    # HS256 keyed with the device's *public* key: the classic algorithm-confusion forgery.
    token = hand_made_jwt({"alg": alg, "typ": "JWT"}, _claims(time.time()),
                          hmac_key=public_pem if alg == "HS256" else None)
    expect_refused(lambda: devices.device(device_id, private, "RS256").connect(password=token), BAD_CREDENTIALS)


def test_unknown_key_and_unknown_device_are_refused(devices):
    device_id, _ = devices.register("ES256")
    other_private, _ = generate_key("ES256")
    expect_refused(lambda: devices.device(device_id, other_private).connect(), BAD_CREDENTIALS)
    # An unknown device is answered exactly like a known one with the wrong key: ids cannot be enumerated.
    expect_refused(lambda: devices.device(f"ghost-{uuid.uuid4().hex[:8]}", other_private).connect(), BAD_CREDENTIALS)


def test_expired_credential_is_refused_and_unexpired_one_accepted(devices, registry):
    old_private, old_public = generate_key("ES256")
    new_private, new_public = generate_key("RS256")
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    registry.create_device(device_id, [
        Credential("ES256_PEM", old_public, expiration_time=datetime.now(UTC) - timedelta(minutes=1)),
        Credential("RSA_PEM", new_public, expiration_time=datetime.now(UTC) + timedelta(days=1)),
    ])
    expect_refused(lambda: devices.device(device_id, old_private, "ES256").connect(), BAD_CREDENTIALS)
    devices.device(device_id, new_private, "RS256").connect()


def test_anonymous_is_refused(stack):
    client_id = f"projects/{PROJECT}/locations/{REGION}/registries/{REGISTRY}/devices/nobody-here"
    out = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(stack.mqtt_port), "--cafile", str(stack.ca_cert), "-i",
         client_id, "-t", "/devices/nobody-here/events", "-m", "x"], capture_output=True, timeout=20)
    assert out.returncode != 0, out
    assert b"bad user name or password" in out.stderr.lower(), out.stderr  # CONNACK 4: no password at all


def test_plaintext_gets_no_connack(stack):
    """MQTT in clear text to the device port: the TLS handshake fails, no MQTT byte is ever answered."""
    body = bytes(mqtt.encode_connect(mqtt.Connect(level=4, clean=True, keepalive=30, client_id="x",
                                                   username="unused", password=b"x")))
    with socket.create_connection((stack.mqtt_host, stack.mqtt_port), timeout=5) as s:
        s.sendall(body)
        s.settimeout(15)
        try:
            reply = s.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(bytes([mqtt.CONNACK << 4]))


def _tls_1_1_client(stack) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(stack.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def test_tls_below_1_2_is_refused(stack):
    # Control: this client does speak TLS 1.1, to a server that allows it, with the front's own certificate. So a
    # refusal below comes from the front's minimum version, not from this machine's OpenSSL refusing to offer 1.1.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.load_cert_chain(stack.settings.tls_cert, stack.settings.tls_key)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    served: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with permissive.wrap_socket(conn, server_side=True) as tls:
            served.append(str(tls.version()))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with (socket.create_connection(listener.getsockname(), timeout=5) as raw,
          _tls_1_1_client(stack).wrap_socket(raw, server_hostname="localhost") as tls):
        assert tls.version() == "TLSv1.1"
    server.join(5)
    listener.close()
    assert served == ["TLSv1.1"]

    with (socket.create_connection((stack.mqtt_host, stack.mqtt_port), timeout=5) as raw,
          pytest.raises(ssl.SSLError) as err,
          _tls_1_1_client(stack).wrap_socket(raw, server_hostname="localhost")):
        pass
    # The front ends the handshake: with a protocol_version alert, or by closing before it is flushed (asyncio's
    # TLS layer may drop the alert) -- never a certificate or cipher error, which would mean something else failed.
    assert err.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"), err.value


# ------------------------------------------------------------------------------------------- blocked


def test_blocked_device_is_refused(devices, registry):
    device_id, private = devices.register("ES256", blocked=True)
    expect_refused(lambda: devices.device(device_id, private).connect(), NOT_AUTHORIZED)


def test_device_blocked_or_deleted_while_connected_is_dropped(devices, registry):
    dev = devices.connected("ES256")
    registry.set_blocked(dev.identity.device_id, True)
    assert_dropped(dev, timeout=15)
    expect_refused(lambda: dev.connect(), NOT_AUTHORIZED)
    other = devices.connected("ES256")
    registry.delete_device(other.identity.device_id)
    assert_dropped(other, timeout=15)


def test_session_is_closed_when_the_token_expires(devices):
    dev = devices.connected("ES256", token_lifetime_s=3)
    assert_dropped(dev, timeout=15)


# ------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("kind,limit", [("events", 256 * 1024), ("state", 64 * 1024)])
def test_oversize_payload_closes_and_nothing_is_forwarded(devices, reader, spy, kind, limit):
    dev = devices.connected("ES256")
    at_limit = b"a" * limit
    publish = dev.publish_event if kind == "events" else dev.publish_state
    publish(at_limit).wait_for_publish(10)  # exactly the limit is fine
    publish(b"b" * (limit + 1))
    assert_dropped(dev)
    marker_roundtrip(devices, spy)
    assert [p == at_limit for _, p in spy.seen if len(p) >= limit] == [True]
    topic = "telemetry" if kind == "events" else "state"
    assert [m.data == at_limit for m in reader.drain(topic, wait=1.0) if len(m.data) >= limit] == [True]


def test_qos2_publish_closes_and_nothing_is_forwarded(devices, spy):
    dev = devices.connected("ES256")
    payload = b"qos2-" + uuid.uuid4().bytes
    dev.client.publish(dev.events_topic(), payload, qos=2)
    assert_dropped(dev)
    marker_roundtrip(devices, spy)
    assert payload not in [p for _, p in spy.seen]


def test_qos2_subscription_is_granted_qos1(devices):
    dev = devices.connected("ES256")
    granted: list = []
    done = threading.Event()
    dev.client.on_subscribe = lambda c, u, mid, rcs, props: (granted.extend(rcs), done.set())
    dev.client.subscribe(dev.config_topic, qos=2)
    assert done.wait(10)
    assert [rc.value for rc in granted] == [1]


def test_device_messages_are_never_retained_by_the_broker(devices, stack, reader):
    """A retained state would be replayed to the bridge on each resubscribe and forwarded again."""
    dev = devices.connected("ES256")
    dev.client.publish(dev.state_topic, b"retained?", qos=1, retain=True).wait_for_publish(10)
    assert [m.data for m in reader.pull("state", 1)] == [b"retained?"]
    assert retained(stack, dev.state_topic) == b""


# ------------------------------------------------------------------------------------------- mTLS


def test_mtls_device_with_registered_certificate_connects_without_jwt(devices, registry, device_ca, reader):
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    pem, cert_file, key_file = device_ca.issue(device_id)
    registry.create_device(device_id, [Credential("ES256_X509_PEM", pem)])
    dev = devices.device(device_id, key_file.read_bytes(), client_cert=str(cert_file), client_key=str(key_file))
    dev.connect(use_jwt=False)
    dev.publish_event(b"over mTLS").wait_for_publish(10)
    got = reader.pull("telemetry", 1)
    assert [(m.data, m.attributes["deviceId"]) for m in got] == [(b"over mTLS", device_id)]


def test_mtls_certificate_of_another_device_is_refused(devices, registry, device_ca):
    """Issued by the registry CA, but not registered for this device: the CA alone does not authenticate."""
    victim_id, _ = devices.register("ES256")
    pem, cert_file, key_file = device_ca.issue("someone-else")
    dev = devices.device(victim_id, key_file.read_bytes(), client_cert=str(cert_file), client_key=str(key_file))
    expect_refused(lambda: dev.connect(use_jwt=False), BAD_CREDENTIALS)


def test_mtls_certificate_from_an_unknown_ca_fails_the_handshake(devices, registry, tmp_path):
    from .conftest import DeviceCA

    rogue = DeviceCA(tmp_path / "rogue")
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    pem, cert_file, key_file = rogue.issue(device_id)
    registry.create_device(device_id, [Credential("ES256_X509_PEM", pem)])  # even when registered
    dev = devices.device(device_id, key_file.read_bytes(), client_cert=str(cert_file), client_key=str(key_file))
    # TLS 1.3 checks the client certificate after the client has sent its Finished: the server's alert then
    # closes the connection before any CONNACK (TLS 1.2 would fail inside the handshake instead).
    with pytest.raises((ConnectError, ssl.SSLError)) as err:
        dev.connect(use_jwt=False, timeout=5)
    assert getattr(err.value, "reason", None) is None  # no MQTT answer at all, not even a refusal


# ------------------------------------------------------------------------------------------- framing


class RawDevice:
    """A device speaking MQTT 3.1.1 by hand over TLS, to decide exactly which bytes share one TLS write."""

    def __init__(self, stack, device_id: str, private: bytes):
        ctx = ssl.create_default_context(cafile=str(stack.ca_cert))
        self.sock = ctx.wrap_socket(socket.create_connection((stack.mqtt_host, stack.mqtt_port), timeout=10),
                                    server_hostname="localhost")
        self.framer = mqtt.Framer(1 << 20)
        self.pending: list[tuple[int, bytes, bytes]] = []
        self.device_id = device_id
        client_id = f"projects/{PROJECT}/locations/{REGION}/registries/{REGISTRY}/devices/{device_id}"
        self.sock.sendall(mqtt.encode_connect(mqtt.Connect(
            level=mqtt.MQTT_311, clean=True, keepalive=60, client_id=client_id, username="unused",
            password=create_jwt(PROJECT, private, "ES256").encode())))
        first, body, _ = self.packet()
        assert (first >> 4, body) == (mqtt.CONNACK, b"\x00\x00")

    def publish(self, payload: bytes, packet_id: int, topic: str | None = None, dup: bool = False) -> bytes:
        """A QoS 1 PUBLISH; ``dup``: with the DUP flag, as a device resends one it holds no PUBACK for."""
        topic = topic or f"/devices/{self.device_id}/events"
        body = _bin(topic.encode()) + packet_id.to_bytes(2, "big") + payload
        return bytes([mqtt.PUBLISH << 4 | 0x02 | (0x08 if dup else 0)]) + mqtt.encode_varint(len(body)) + body

    def packet(self) -> tuple[int, bytes, bytes]:
        """The next packet from the front; ``EOFError`` when it closed the connection."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.pending.extend(self.framer.feed(data))
        return self.pending.pop(0)

    def pubacks(self, n: int) -> list[int]:
        acks = []
        for _ in range(n):
            first, body, _ = self.packet()
            assert first >> 4 == mqtt.PUBACK
            acks.append(mqtt.packet_id_of_ack(body))
        return acks

    def close(self) -> None:
        self.sock.close()


def _bin(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


@pytest.fixture
def raw_device(devices, stack):
    made: list[RawDevice] = []

    def make() -> RawDevice:
        d = RawDevice(stack, *devices.register("ES256"))
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_packets_in_one_write_and_split_across_writes_are_all_forwarded(raw_device, spy):
    dev = raw_device()
    payloads = [b"batch-" + uuid.uuid4().bytes for _ in range(4)]
    dev.sock.sendall(b"".join(dev.publish(p, i + 1) for i, p in enumerate(payloads[:3])))  # one TLS record
    assert sorted(dev.pubacks(3)) == [1, 2, 3]
    split = dev.publish(payloads[3], 4)
    dev.sock.sendall(split[:3])  # inside the topic: the front must wait for the rest
    dev.sock.sendall(split[3:])
    assert dev.pubacks(1) == [4]
    wait_for("all four at the spy", lambda: all(p in [q for _, q in spy.seen] for p in payloads), timeout=10)


def test_nothing_after_an_offending_packet_in_the_same_read_is_forwarded(raw_device, devices, spy):
    dev = raw_device()
    before, forged, after = (f"{tag}-{uuid.uuid4().hex}".encode() for tag in ("before", "forged", "after"))
    dev.sock.sendall(dev.publish(before, 1) + dev.publish(forged, 2, topic="/devices/someone-else/events")
                     + dev.publish(after, 3))  # one TLS record, so one read at the front
    acks = []
    with pytest.raises((EOFError, ConnectionResetError, ssl.SSLError)):
        while True:
            acks += dev.pubacks(1)
    assert acks in ([], [1])  # at most the packet before the offending one
    wait_for("the packet before the offending one", lambda: any(p == before for _, p in spy.seen), timeout=10)
    marker_roundtrip(devices, spy)
    assert not [p for _, p in spy.seen if p in (forged, after)]

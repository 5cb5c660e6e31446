"""One device, authenticated or not, cannot stall the host, flood the registry or outlive its identity: each
attack against the running bridge (front + Mosquitto + bridge service, the Pub/Sub and Firestore emulators).

The module's stack keeps the front's default per-address limits; the tests that fail CONNECTs on purpose do it
from addresses of their own in 127.0.0.0/8, so the limits of 127.0.0.1 stay untouched for the others."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from iotbridge.bridge.front import VIOLATION_BACKOFF_S, Front, Session
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.device import ConnectError, Device, generate_key
from iotbridge.local.broker_host import BridgeStack
from iotbridge.registry import Credential
from tests.aio import run_in_own_loop
from tests.waiting import wait_for

from .conftest import DeviceFactory, new_stack
from .test_attacks import BAD_CREDENTIALS, NOT_AUTHORIZED, assert_dropped, expect_refused

pytestmark = pytest.mark.emulator

DEFAULT_ADDRESS_LIMIT = {"auth_failures_per_s": 2.0, "auth_failure_burst": 20}


@pytest.fixture(scope="module")
def stack(bridge_env, tmp_path_factory) -> Iterator[BridgeStack]:
    """This module's host (the conftest's `devices` and `reader` use it): the default per-address failure limits,
    and small caps on connections awaiting CONNECT."""
    st = new_stack(tmp_path_factory.mktemp("hardening"), bridge_env, max_pending_connects=5,
                   max_pending_per_address=3, **DEFAULT_ADDRESS_LIMIT)
    yield st
    st.stop()


def counter(stack: BridgeStack, name: str) -> int:
    return int(stack.front_stats()[name])


def push_config(stack: BridgeStack, registry, device_id: str, data: bytes) -> None:  # noqa: ANN001
    """Store a config version and fan it out to the host, as the config-push function does."""
    from google.cloud import pubsub_v1

    from iotbridge.bridge import fanout

    fanout.push_config(registry, pubsub_v1.PublisherClient(), stack.settings.prefix, device_id, data, min_interval_s=0)


def with_config(devices: DeviceFactory, registry, data: bytes) -> Device:  # noqa: ANN001
    """A connected device whose config the broker already holds, retained (the front syncs it at connect)."""
    device_id, private = devices.register("ES256")
    registry.update_config(device_id, data, min_interval_s=0)
    dev = devices.device(device_id, private)
    dev.connect()
    return dev


# ------------------------------------------------------------------------------------------- SUBSCRIBE flood


@pytest.mark.parametrize("copies", [2, 3000])
def test_subscribe_naming_one_filter_many_times_is_refused_before_the_broker_sees_it(devices, stack, registry,
                                                                                      copies):
    dev = with_config(devices, registry, b'{"v":1}')
    acks = counter(stack, "config_acks")
    dev.client.subscribe([(dev.config_topic, 1)] * copies)
    assert_dropped(dev)
    reason = "more than once" if copies <= 8 else f"SUBSCRIBE with {copies} filters"
    wait_for("the refusal in the front's log", lambda: reason in stack.log_text("front"), timeout=10)
    # Nothing reached Mosquitto: the retained config was never sent back, so the device acknowledged none. The
    # same device, subscribing once, does get it: the check above could have seen it. (It reconnects once its
    # backoff after the violation has passed.)
    assert dev.configs.empty() and counter(stack, "config_acks") == acks
    expect_refused(lambda: dev.connect(), "Server unavailable")
    time.sleep(VIOLATION_BACKOFF_S)
    dev.connect()
    dev.subscribe_config()
    assert dev.configs.get(timeout=10) == b'{"v":1}'


def test_more_distinct_subscriptions_than_allowed_are_refused(devices):
    dev = devices.connected("ES256")
    base = f"/devices/{dev.identity.device_id}/commands"
    dev.client.subscribe([(f"{base}/s{i}", 1) for i in range(8)])  # 8 in one packet: the most allowed
    time.sleep(0.5)
    assert dev.is_connected()
    dev.client.subscribe([(f"{base}/t{i}", 1) for i in range(8)])  # 16 held: still allowed
    time.sleep(0.5)
    assert dev.is_connected()
    dev.client.subscribe([(f"{base}/u0", 1)])  # the 17th distinct filter
    assert_dropped(dev)


def test_a_config_is_acknowledged_in_the_registry_once_however_often_it_is_redelivered(devices, stack, registry):
    dev = with_config(devices, registry, b'{"v":"once"}')
    device_id = dev.identity.device_id
    dev.subscribe_config()
    assert dev.configs.get(timeout=10) == b'{"v":"once"}'
    wait_for("the first ack", lambda: registry.get_config(device_id).device_ack_time, timeout=10)
    acks = counter(stack, "config_acks")
    for _ in range(9):  # every re-subscribe makes Mosquitto send the retained config again, and the device ack it
        dev.subscribe_config()
        assert dev.configs.get(timeout=10) == b'{"v":"once"}'
    time.sleep(1.0)
    assert counter(stack, "config_acks") == acks  # nine more PUBACKs, no more registry work
    push_config(stack, registry, device_id, b'{"v":"twice"}')  # a new version is acked again
    assert dev.configs.get(timeout=10) == b'{"v":"twice"}'
    wait_for("the new version's ack", lambda: counter(stack, "config_acks"), lambda v: v == acks + 1, timeout=10)
    # A new version with the same bytes is a version of its own: acknowledged too.
    push_config(stack, registry, device_id, b'{"v":"twice"}')
    assert dev.configs.get(timeout=10) == b'{"v":"twice"}'
    wait_for("the same bytes' ack", lambda: registry.get_config(device_id).device_ack_time, timeout=10)
    assert counter(stack, "config_acks") == acks + 2


def test_a_new_version_with_the_same_bytes_acked_while_the_last_ack_runs_is_acknowledged_too(registry):
    """The front's registry ack reads the device's versions, then records the one whose bytes the device acked. A
    second version with the same bytes, stored and acked while the first ack has read but not yet recorded, must be
    recorded by an ack of its own (or by the running one looking again), not skipped as a duplicate."""
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    registry.create_device(device_id)
    data = b'{"v":"same"}'
    registry.update_config(device_id, data, min_interval_s=0)
    digest = hashlib.sha256(data).hexdigest()
    listed, go_on = threading.Event(), threading.Event()

    class PausedAfterFirstRead:  # the device's registry, held still between the first ack's read and its write
        reads = 0

        def list_config_versions(self, dev: str):  # noqa: ANN201
            versions = registry.list_config_versions(dev)
            self.reads += 1
            if self.reads == 1:
                listed.set()
                assert go_on.wait(10)
            return versions

        def ack_config(self, *args) -> None:  # noqa: ANN002
            registry.ack_config(*args)

    settings = BridgeSettings(project=registry.project, region=registry.region, registry_id=registry.registry_id,
                              prefix="p")

    def puback(front: Front, session: Session, packet_id: int) -> None:
        session.config_inflight[packet_id] = (digest, False)  # a live delivery of the config, as the broker sent it
        body = packet_id.to_bytes(2, "big")
        front._checked(session, 0x40, body, b"\x40\x02" + body)

    async def go() -> int:
        loop = asyncio.get_running_loop()
        front = Front(settings, registry, ssl.create_default_context(), "pw")
        session = Session(device_id, 4, datetime.now(UTC) + timedelta(hours=1), "peer",
                          registry=PausedAfterFirstRead())
        session.limits = front._device_limits(device_id)
        front.sessions.add(session)
        puback(front, session, 1)
        assert await loop.run_in_executor(None, listed.wait, 10)
        second = await loop.run_in_executor(None, lambda: registry.update_config(device_id, data, min_interval_s=0))
        puback(front, session, 2)
        go_on.set()
        for _ in range(200):
            if not session.acks_running:
                break
            await asyncio.sleep(0.05)
        assert not session.acks_running
        return second.version

    version = run_in_own_loop(go())
    latest = registry.get_config(device_id)
    assert latest is not None and latest.version == version
    assert latest.device_ack_time is not None, "the second version's ack was skipped"


# ------------------------------------------------------------------------------------------- revocation


def test_removing_or_rotating_the_credential_ends_the_session(devices, registry):
    dev = devices.connected("ES256")
    _, new_public = generate_key("ES256")
    registry.set_credentials(dev.identity.device_id, [Credential("ES256_PEM", new_public)])
    assert_dropped(dev, timeout=10)
    expect_refused(lambda: dev.connect(), BAD_CREDENTIALS)


def test_a_device_deleted_and_created_again_with_another_key_loses_the_old_session(devices, registry):
    dev = devices.connected("ES256")
    device_id = dev.identity.device_id
    _, new_public = generate_key("ES256")
    registry.delete_device(device_id)
    registry.create_device(device_id, [Credential("ES256_PEM", new_public)])
    assert_dropped(dev, timeout=10)


def test_a_jwt_session_ends_when_its_credential_expires(devices, registry):
    private, public = generate_key("ES256")
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    registry.create_device(device_id, [
        Credential("ES256_PEM", public, expiration_time=datetime.now(UTC) + timedelta(seconds=5))])
    dev = devices.device(device_id, private)
    dev.connect()  # its JWT is valid for an hour; the credential for five seconds
    assert_dropped(dev, timeout=15)
    expect_refused(lambda: dev.connect(), BAD_CREDENTIALS)


# ------------------------------------------------------------------------------------------- will


def test_a_revoked_device_leaves_without_its_will_and_a_lost_one_with_it(devices, reader, registry):
    revoked = devices.device(*devices.register("ES256"))
    revoked.client.will_set(revoked.events_topic(), b"will-of-revoked", qos=1)
    revoked.connect()
    lost = devices.device(*devices.register("ES256"))
    lost.client.will_set(lost.events_topic(), b"will-of-lost", qos=1)
    lost.connect()

    registry.set_blocked(revoked.identity.device_id, True)
    assert_dropped(revoked, timeout=10)
    # The network goes away under the other device: no DISCONNECT, so its will is published, as MQTT promises.
    sock = lost.client.socket()
    assert sock is not None
    lost.client.loop_stop()
    sock.close()

    ours = {revoked.identity.device_id, lost.identity.device_id}
    got = [m.data for m in reader.pull("telemetry", 1, timeout=30, settle=3.0) if m.attributes["deviceId"] in ours]
    assert got == [b"will-of-lost"]


# ------------------------------------------------------------------------------------------- before authentication


def test_only_a_device_that_proved_its_identity_learns_that_it_is_blocked(devices):
    device_id, private = devices.register("ES256", blocked=True)
    other_private, _ = generate_key("ES256")
    expect_refused(lambda: devices.device(device_id, other_private).connect(), BAD_CREDENTIALS)
    expect_refused(lambda: devices.device(device_id, private).connect(), NOT_AUTHORIZED)


def test_an_unknown_device_is_looked_up_once_then_remembered_briefly(devices, stack):
    private, _ = generate_key("ES256")
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    lookups = counter(stack, "registry_lookups")
    for _ in range(10):
        expect_refused(lambda: devices.device(ghost, private, bind_address="127.0.0.3").connect(), BAD_CREDENTIALS)
    assert counter(stack, "registry_lookups") == lookups + 1


def test_an_address_that_keeps_failing_is_cut_off_and_others_are_not(devices, stack):
    private, _ = generate_key("ES256")
    limited, lookups = counter(stack, "address_limited"), counter(stack, "registry_lookups")
    outcomes = []
    for i in range(30):  # distinct unknown ids: every one would cost a registry read
        d = devices.device(f"probe-{uuid.uuid4().hex[:8]}-{i}", private, bind_address="127.0.0.2")
        try:
            d.connect()
            outcomes.append("connected")
        except ConnectError as exc:
            outcomes.append(str(exc.reason) if exc.reason is not None else "closed")
        except (ssl.SSLError, OSError):
            outcomes.append("closed")  # turned away before the TLS handshake
    # The burst of 20 failures is answered "bad user name or password"; then the address is cut off: its
    # connections are closed before TLS (or, had it spent its last token meanwhile, answered "server unavailable"),
    # without a registry read, but for the token it earns back every half second.
    assert outcomes[:20] == [BAD_CREDENTIALS] * 20
    assert set(outcomes) <= {BAD_CREDENTIALS, "closed", "Server unavailable"}, outcomes
    cut = len(outcomes) - outcomes.count(BAD_CREDENTIALS)
    assert cut >= 5 and counter(stack, "address_limited") - limited == cut
    assert counter(stack, "registry_lookups") - lookups == outcomes.count(BAD_CREDENTIALS)
    devices.connected("ES256")  # a device from another address connects as usual


def test_control_characters_in_the_client_id_are_escaped_in_the_log(devices, stack):
    device_id, private = devices.register("ES256")
    marker = f"INJECTED-{uuid.uuid4().hex[:6]}"
    d = devices.device(device_id, private)
    evil = dataclasses.replace(d.identity, project=f"x\n{marker} forged log line")
    dev = Device(evil, stack.mqtt_host, stack.mqtt_port, str(stack.ca_cert))
    devices.created.append(dev)
    with pytest.raises(Exception):  # noqa: B017 - refused before or at CONNACK: either way, not connected
        dev.connect()
    wait_for("the refusal in the log", lambda: marker in stack.log_text("front"), timeout=10)
    lines = stack.log_text("front").splitlines()
    assert not [line for line in lines if line.startswith(marker)]
    assert any(f"x\\n{marker}" in line for line in lines)


def _idle(stack: BridgeStack, source: str) -> ssl.SSLSocket:
    """A TLS connection from ``source`` that never sends its CONNECT."""
    ctx = ssl.create_default_context(cafile=str(stack.ca_cert))
    raw = socket.create_connection((stack.mqtt_host, stack.mqtt_port), timeout=5, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_connections_that_never_send_connect_are_capped_per_address_and_in_all(devices, stack):
    # The module's stack allows 5 connections awaiting CONNECT, 3 of them from one address.
    idle: list[ssl.SSLSocket] = []
    try:
        idle += [_idle(stack, "127.0.0.4") for _ in range(3)]
        wait_for("3 pending connections", lambda: counter(stack, "pending"), lambda v: v == 3, timeout=10)
        before = counter(stack, "pending_limited")
        with pytest.raises((ssl.SSLError, OSError)):  # a 4th from the same address: closed before TLS
            idle.append(_idle(stack, "127.0.0.4"))
            idle[-1].recv(1)
        assert counter(stack, "pending_limited") == before + 1
        devices.connected("ES256")  # another address is not affected

        idle += [_idle(stack, "127.0.0.5") for _ in range(2)]  # 5 in all: the host's cap
        wait_for("5 pending connections", lambda: counter(stack, "pending"), lambda v: v == 5, timeout=10)
        with pytest.raises(Exception):  # noqa: B017 - the front closes the socket: TLS, socket or CONNACK error
            devices.connected("ES256")
        assert counter(stack, "pending_limited") == before + 2
    finally:
        for s in idle:
            s.close()
    wait_for("the idle connections gone", lambda: counter(stack, "pending"), lambda v: v == 0, timeout=15)
    devices.connected("ES256")


# ------------------------------------------------------------------------------------------- per-device limits


def _publish_all(dev: Device, payloads: list[bytes], state: bool = False) -> float:
    start = time.monotonic()
    infos = [(dev.publish_state if state else dev.publish_event)(p) for p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    return time.monotonic() - start


def test_a_device_over_its_message_rate_is_slowed_and_told_others_are_not(devices, stack, registry):
    fast = devices.connected("ES256", max_inflight=300)
    other = devices.connected("ES256")
    # 300 events at once: the first 100 pass (the burst), the other 200 at 100 a second: at least 2 s.
    elapsed = _publish_all(fast, [b"m%d" % i for i in range(300)])
    assert elapsed >= 1.9, elapsed
    # Reconnecting brings no fresh burst: the limit is the device's, not the connection's.
    fast.disconnect()
    fast.connect()
    assert _publish_all(fast, [b"r%d" % i for i in range(100)]) >= 0.5
    _publish_all(other, [b"o%d" % i for i in range(50)])
    log_text = stack.log_text("front")
    assert f"device {fast.identity.device_id} slowed: rate limit" in log_text
    assert f"device {other.identity.device_id} slowed" not in log_text
    wait_for("the limit recorded in the registry",
             lambda: registry.get_device(fast.identity.device_id).last_error_status.startswith("rate limit"),
             timeout=10)


def test_state_updates_are_held_to_one_a_second(devices):
    dev = devices.connected("ES256")
    assert _publish_all(dev, [b"s1", b"s2", b"s3"], state=True) >= 1.9


def test_throughput_is_held_to_512_kib_a_second(devices):
    dev = devices.connected("ES256")
    # 1 MiB in four 256 KiB events: the first 512 KiB pass at once, the rest at 512 KiB/s.
    assert _publish_all(dev, [bytes(256 * 1024)] * 4) >= 0.9


# ---------------------------------------------------------------------------------------- Pub/Sub's limits at the front


def test_an_event_whose_subfolder_pubsub_would_refuse_closes_the_connection(devices, reader, stack):
    dev = devices.connected("ES256")
    dev.publish_event(b"fits", sub_folder="s" * 1024).wait_for_publish(10)  # exactly Pub/Sub's 1,024 bytes
    dev.publish_event(b"poison", sub_folder="s" * 1025)
    assert_dropped(dev)
    wait_for("the refusal in the log", lambda: "attribute_value_too_long" in stack.log_text("front"), timeout=10)
    got = reader.pull("telemetry", 1, timeout=30, settle=2.0)
    # (Earlier tests' devices share this host: only this device's messages are judged.)
    mine = [m for m in got if m.attributes["deviceId"] == dev.identity.device_id]
    assert [(m.data, len(m.attributes["subFolder"])) for m in mine] == [(b"fits", 1024)]

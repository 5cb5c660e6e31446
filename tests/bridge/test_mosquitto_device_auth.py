"""``device_auth: mosquitto`` for real: the product plugin compiled here, Mosquitto 2.0 from Debian with the host's
own configuration (password file, ACL file, dynamic security plugin, loopback listener) plus the plugin's lines
(``plugin.mosquitto_lines``), and the auth daemon started as a host starts it (``python -m iotbridge.bridge authd``)
on a registry on the Firestore emulator. One host for the module; the re-check interval is short so that a
revocation is seen within a second or two (time is controlled through the settings, never by a fake clock)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from iotbridge.bridge import fanout, plugin
from iotbridge.bridge.authd import AuthDaemon, Refused
from iotbridge.bridge.settings import (
    EVENTS_MAX_BYTES,
    STATE_MAX_BYTES,
    BridgeSettings,
    mosquitto_config,
    new_secrets,
    write_secrets,
)
from iotbridge.device import create_jwt, generate_key
from iotbridge.local import services
from iotbridge.local.tls import generate_local_tls
from iotbridge.registry import Credential, GatewayConfig, Registry, RegistrySettings
from tests.aio import run_in_own_loop
from tests.conftest import require
from tests.test_mosquitto_auth_plugin import Device

from .test_no_delay import tcp_sockets

PROJECT, REGION = "mqauth-project", "europe-west1"
RECHECK_S = 1.0  # the map is fresh while a round succeeded within 2 s: a loaded machine's emulator reads fit
# A kick's bound: the round after the commit (every RECHECK_S) and its registry reads, on a loaded machine.
KICK_WITHIN_S = 10.0
pytestmark = pytest.mark.emulator


class Watched(Device):
    """A device client that records when the broker ends its connection, and does not reconnect."""

    def __init__(self, port: int, ca: Path, client_id: str, password: str):
        self.gone = threading.Event()
        super().__init__(port, ca, client_id, password)
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *_: object) -> None:
        self.gone.set()
        self.client.loop_stop()  # from the network thread: ends it after this callback, without reconnecting


@dataclass
class Host:
    settings: BridgeSettings
    registry: Registry
    keys: dict[str, bytes]
    ca: Path
    daemon_log: Path
    secrets: dict[str, str]
    daemon: services.Service
    env: dict[str, str]

    @property
    def prefix(self) -> str:
        return plugin.client_id_prefix(self.settings)

    def token(self, device: str, **kw) -> str:  # noqa: ANN003
        return create_jwt(PROJECT, self.keys[device], "ES256", **kw)

    def connect(self, device: str, token: str | None = None, client_id: str | None = None) -> Watched:
        return Watched(self.settings.front_port, self.ca, client_id or self.prefix + device,
                       token if token is not None else self.token(device))

    def connack(self, device: str, token: str | None = None, client_id: str | None = None) -> int:
        d = self.connect(device, token, client_id)
        try:
            return d.connack if d.connack is not None else -1
        finally:
            d.close()

    def stats(self) -> dict[str, int]:
        return json.loads(_http(self.settings.health_port, "/stats")[1])

    def restart_daemon(self) -> None:
        self.daemon.stop()
        self.daemon = _start_daemon(self.daemon_log.parent, self.env)

    def internal(self, on_message=None) -> paho.Client:  # noqa: ANN001
        """The bridge service's user on the loopback listener (the password file's user)."""
        done = threading.Event()
        codes: list[int] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:test:{uuid.uuid4().hex[:6]}")
        c.username_pw_set("bridge", self.secrets["bridge"])

        def on_connect(_c, _u, _f, rc, _p) -> None:  # noqa: ANN001
            codes.append(rc.value)
            done.set()

        c.on_connect = on_connect
        if on_message is not None:
            c.on_message = on_message
        c.connect(self.settings.broker_host, self.settings.broker_port)
        c.loop_start()
        assert done.wait(10) and codes == [0], f"internal user refused: {codes}"
        return c


def _devices(registry: Registry) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for device in ("dev-a", "dev-b", "dev-blocked", "dev-gateway", "dev-revoked", "dev-expiring", "dev-pres"):
        private, public = generate_key("ES256")
        registry.create_device(device, [Credential("ES256_PEM", public)], blocked=device == "dev-blocked",
                               gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY")
                               if device == "dev-gateway" else None)
        keys[device] = private
    return keys


@pytest.fixture(scope="module")
def host(firestore_emulator: services.Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    wd = tmp_path_factory.mktemp("mqauth")
    try:
        lib = plugin.build(wd / "plugin")
    except plugin.BuildError as exc:  # as conftest's require(): fail with the install command
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in firestore_emulator.env.items():
            mp.setenv(k, v)
        registry = Registry(PROJECT, f"reg-{uuid.uuid4().hex[:10]}", REGION)
        registry.create_registry(RegistrySettings())
        keys = _devices(registry)
    tls = generate_local_tls(wd / "tls")
    secrets = new_secrets()
    write_secrets(wd / "secrets.json", secrets)
    settings = BridgeSettings(PROJECT, REGION, registry.registry_id, "t", front_host="127.0.0.1",
                              front_port=services.free_port(), broker_port=services.free_port(),
                              tls_cert=str(tls.server_cert), tls_key=str(tls.server_key),
                              secrets_file=str(wd / "secrets.json"), recheck_interval_s=RECHECK_S,
                              health_port=services.free_port(), device_auth="mosquitto",
                              auth_socket=str(wd / "auth.sock"), auth_failure_burst=1000)
    settings.dump(wd / "settings.json")
    daemon = _start_daemon(wd, firestore_emulator.env)
    try:
        # The host's configuration with the plugin's lines in it (mosquitto_config includes them in this mode).
        conf = mosquitto_config(settings, wd / "broker", run_as_root=os.geteuid() == 0, plugin_path=lib)
        mosq = require(services.start_mosquitto, conf, settings.front_port, wd / "broker")
        try:
            h = Host(settings, registry, keys, tls.ca_cert, wd / "authd.log", secrets, daemon, firestore_emulator.env)
            yield h
            daemon = h.daemon
        finally:
            mosq.stop()
    finally:
        daemon.stop()


def _start_daemon(wd: Path, env: dict[str, str]) -> services.Service:
    """The auth daemon as a host starts it, on ``wd/settings.json``, once it listens."""
    log = wd / "authd.log"
    before = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iotbridge.bridge", "authd", "--settings",
                                 str(wd / "settings.json")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=services.REPO_ROOT,
                                start_new_session=True)
    daemon = services.Service(name="authd", proc=proc, host="", port=0, log_path=log, workdir=wd)
    if not _wait(lambda: not daemon.alive() or b"auth daemon listening" in log.read_bytes()[before:], 60) \
            or not daemon.alive():
        daemon.stop()
        pytest.fail(f"the auth daemon did not start:\n{daemon.log_tail()}")
    return daemon


def _wait(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_devices_admitted_and_refused_for_the_right_reason(host: Host) -> None:
    assert host.connack("dev-a") == 0
    refused = {
        "JWT expired": host.connack("dev-a", host.token("dev-a", now=time.time() - 7200)),
        "JWT signature does not match any registered credential": host.connack("dev-a", host.token("dev-b")),
        "unknown device": host.connack("dev-zz", host.token("dev-a")),
        "device is blocked": host.connack("dev-blocked"),
        "device is a gateway": host.connack("dev-gateway"),
        # An internal user's password is no JWT: a device client id is judged by the plugin alone.
        "password is not a JWT": host.connack("dev-a", host.secrets["front"]),
    }
    assert all(code >= 0x80 for code in refused.values()), refused
    log = host.daemon_log.read_text()
    missing = [reason for reason in refused if f": {reason}" not in log]
    assert not missing, f"refusal reasons not in the daemon's log: {missing}"
    # A client id outside the device prefix is not the plugin's: the password file refuses a JWT for it.
    assert host.connack("dev-a", client_id="dev-a") >= 0x80
    assert host.connack("dev-a", client_id=host.prefix.replace(host.settings.registry_id, "elsewhere") + "dev-a") \
        >= 0x80


def _tls_connack(h: Host, client_id: str, username: str, password: str, source: str = "",
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, persistent: bool = False) -> int:
    """The CONNACK code of a client on the device listener whose connection leaves from ``source`` (any when "")."""
    codes: list[int] = []
    done = threading.Event()
    v5 = protocol == MQTTProtocolVersion.MQTTv5
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    clean_session=None if v5 else not persistent)
    c.tls_set_context(ssl.create_default_context(cafile=str(h.ca)))
    c.username_pw_set(username, password)

    def on_connect(_c, _u, _f, rc, _p) -> None:  # noqa: ANN001
        codes.append(rc.value)
        done.set()

    c.on_connect = on_connect
    c.connect("localhost", h.settings.front_port, keepalive=30, bind_address=source,
              clean_start=not persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return codes[0]
    finally:
        c.disconnect()
        c.loop_stop()


def test_internal_users_refused_on_the_device_listener(host: Host) -> None:
    """The device listener faces the network: the host's own users (password file) cannot log in there from any
    address but the loopback listener's, while a device can; and the password file holds no front user."""
    outside = "127.0.0.2"  # another source address than broker_host's, as a client from the network has
    assert _tls_connack(host, host.prefix + "dev-a", "unused", host.token("dev-a"), outside) == 0
    for user in ("bridge", "front"):
        assert _tls_connack(host, f"evil-{user}", user, host.secrets[user], outside) >= 0x80, user
    assert "refused a client that is no device from 127.0.0.2" in \
        (host.daemon_log.parent / "broker" / "mosquitto.log").read_text()
    assert not any(line.startswith("front:") for line in (host.daemon_log.parent / "broker" / "passwd").read_text()
                   .splitlines())


def test_persistent_sessions_refused(host: Host) -> None:
    """As at the front and IoT Core, no device session outlives its connection: Mosquitto would otherwise keep an
    offline device's session and queue its commands (up to max_queued_messages) for ever."""
    for protocol in (MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5):
        assert _tls_connack(host, host.prefix + "dev-a", "unused", host.token("dev-a"), protocol=protocol,
                            persistent=True) >= 0x80, protocol
    assert "a persistent session (clean session or clean start false) is not supported" in \
        (host.daemon_log.parent / "broker" / "mosquitto.log").read_text()


def test_internal_user_connects_and_receives_device_traffic(host: Host) -> None:
    got: list[tuple[str, bytes]] = []
    arrived = threading.Condition()

    def on_message(_c, _u, msg) -> None:  # noqa: ANN001
        with arrived:
            got.append((msg.topic, msg.payload))
            arrived.notify_all()

    bridge = host.internal(on_message)
    try:
        bridge.subscribe([("/devices/+/events/#", 1), ("/devices/+/events", 1), ("iotbridge/sync", 1)])
        time.sleep(0.3)
        d = host.connect("dev-b")
        assert d.connack == 0
        assert d.publish("/devices/dev-b/events") in (0, 0x10)
        with arrived:  # the event, the config sync at connect (after the presence commit: a session that ended
            # before it asks none), then the "gone" when the host's last session ended
            assert arrived.wait_for(lambda: {("/devices/dev-b/events", b"x"), ("iotbridge/sync", b"dev-b")}
                                    <= set(got), 10), got
        d.close()
        with arrived:
            assert arrived.wait_for(lambda: ("iotbridge/sync", b"dev-b/gone") in got, 10), got
        # As at the front: a SUBSCRIBE to its config asks for it again (an empty latest config, a new device's
        # version 1, is not retained by the broker and reaches only the subscribers of the moment).
        assert ("iotbridge/sync", b"dev-b/subscribed") not in got
        d = host.connect("dev-b")
        assert d.subscribe("/devices/dev-b/config") == 1
        with arrived:
            assert arrived.wait_for(lambda: ("iotbridge/sync", b"dev-b/subscribed") in got, 10), got
        d.close()
    finally:
        bridge.loop_stop()
        bridge.disconnect()


def test_will_outside_the_devices_topics_never_sent(host: Host) -> None:
    """Mosquitto 2.0.11 checks a will when it sends it, not at CONNECT: a will to another device's topic or a retained
    one is admitted with the session and dropped when due; a will on the device's own events topic is sent."""
    got: list[bytes] = []
    bridge = host.internal(lambda _c, _u, m: got.append(m.payload))
    bridge.subscribe([("/devices/+/events", 1)])
    time.sleep(0.3)
    try:
        for topic, payload, retain in (("/devices/dev-b/events", b"will-other", False),
                                       ("/devices/dev-a/events", b"will-retained", True),
                                       ("/devices/dev-a/events", b"will-own", False)):
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=host.prefix + "dev-a",
                            protocol=MQTTProtocolVersion.MQTTv5)
            c.tls_set_context(ssl.create_default_context(cafile=str(host.ca)))
            c.username_pw_set("unused", host.token("dev-a"))
            c.will_set(topic, payload, qos=1, retain=retain)
            c.connect("localhost", host.settings.front_port, keepalive=30, clean_start=True)
            for _ in range(100):  # the CONNACK, read on this thread
                c.loop(timeout=0.1)
                if c.is_connected():
                    break
            assert c.is_connected()
            sock = c.socket()
            assert sock is not None
            sock.close()  # abruptly: the will is due
        assert _wait(lambda: b"will-own" in got, 10), got
        assert b"will-other" not in got and b"will-retained" not in got, got
    finally:
        bridge.loop_stop()
        bridge.disconnect()


def test_device_confined_to_its_topics_and_limits(host: Host) -> None:
    a = host.connect("dev-a")
    try:
        assert a.connack == 0
        assert a.publish("/devices/dev-a/events") in (0, 0x10)
        assert a.publish("/devices/dev-a/events/sub") in (0, 0x10)
        assert a.publish("/devices/dev-a/state") in (0, 0x10)
        assert a.publish("/devices/dev-b/events") == 0x87  # not authorized
        assert a.publish("/devices/dev-b/state") == 0x87
        assert a.publish("/devices/dev-a/config") == 0x87

        def publish(topic: str, size: int, qos: int = 1, retain: bool = False) -> int:
            return a.wait_ack(a.client.publish(topic, b"x" * size, qos=qos, retain=retain).mid)

        assert publish("/devices/dev-a/events", EVENTS_MAX_BYTES) in (0, 0x10)
        assert publish("/devices/dev-a/events", EVENTS_MAX_BYTES + 1) == 0x87
        assert publish("/devices/dev-a/state", STATE_MAX_BYTES) in (0, 0x10)
        assert publish("/devices/dev-a/state", STATE_MAX_BYTES + 1) == 0x87
        assert publish("/devices/dev-a/events", 1, retain=True) == 0x87
        assert a.subscribe("/devices/dev-a/config") == 1
        assert a.subscribe("/devices/dev-a/commands/#") == 1
        assert a.subscribe("/devices/dev-a/commands/fw") == 1
        assert a.subscribe("/devices/dev-b/config") == 0x87
        assert a.subscribe("/devices/+/config") == 0x87
        assert a.subscribe("#") == 0x87
        assert a.subscribe("$SYS/#") == 0x87
        assert a.subscribe("$share/g//devices/dev-b/config") == 0x87
        assert a.subscribe("/devices/dev-a/#") == 0x87
    finally:
        a.close()


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310 - local
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_presence_gauge_and_health(host: Host) -> None:
    client, reg, port = host.registry.client, host.registry.registry_id, host.settings.health_port
    assert _http(port, "/healthz") == (200, "ok")
    d = host.connect("dev-pres")
    assert d.connack == 0
    assert _wait(lambda: fanout.is_connected(client, reg, "dev-pres"), 10), "no presence record after connect"
    assert json.loads(_http(port, "/stats")[1])["connected"] == 1
    d.close()  # the plugin's GONE: the daemon removes the record
    assert _wait(lambda: not fanout.is_connected(client, reg, "dev-pres"), 10), "presence record left behind"
    assert json.loads(_http(port, "/stats")[1])["connected"] == 0


def test_takeover_counts_each_connect_once(host: Host) -> None:
    first = host.connect("dev-b")
    second = host.connect("dev-b")  # the same client id: Mosquitto ends the first session
    try:
        assert first.gone.wait(5) and second.connack == 0
        assert _wait(lambda: host.stats()["connected"] == 1, 10), host.stats()
        assert not second.gone.is_set()
    finally:
        second.close()
        first.close()
    assert _wait(lambda: host.stats()["connected"] == 0, 10), host.stats()


def test_restarted_daemon_learns_the_live_sessions(host: Host) -> None:
    d = host.connect("dev-b")
    try:
        assert d.connack == 0
        host.restart_daemon()
        # the plugin reconnects on its tick and sends its LIVE list
        assert _wait(lambda: host.stats()["connected"] == 1, 10), host.stats()
        host.registry.set_blocked("dev-b", True)  # a session the new daemon did not admit is still revocable
        assert d.gone.wait(KICK_WITHIN_S), "a blocked device stayed connected after the daemon restarted"
    finally:
        d.close()
        host.registry.set_blocked("dev-b", False)
    assert _wait(lambda: host.stats()["connected"] == 0, 10), host.stats()


def test_revocation_kicks_within_a_round(host: Host) -> None:
    d = host.connect("dev-revoked")
    try:
        assert d.connack == 0
        time.sleep(RECHECK_S)
        assert not d.gone.is_set()
        host.registry.set_blocked("dev-revoked", True)
        # the change is committed: the next round (every RECHECK_S) reads it and the daemon sends KICK
        assert d.gone.wait(KICK_WITHIN_S), "a blocked device stayed connected"
    finally:
        d.close()
    assert host.connack("dev-revoked") >= 0x80


def test_session_ends_at_its_deadline(host: Host) -> None:
    token = host.token("dev-expiring", lifetime_s=5)
    d = host.connect("dev-expiring", token)
    try:
        assert d.connack == 0
        assert not d.gone.wait(1.5), "ended before the token's exp"
        assert d.gone.wait(8), "still connected after the token's exp"
    finally:
        d.close()


def test_mqtt_switched_off_refuses_and_kicks(host: Host) -> None:
    d = host.connect("dev-a")
    try:
        assert d.connack == 0
        host.registry.update_settings(RegistrySettings(mqtt_enabled=False))
        assert d.gone.wait(KICK_WITHIN_S), "a device stayed connected after MQTT was switched off"
        assert host.connack("dev-b") >= 0x80
        assert "MQTT is disabled for registry" in host.daemon_log.read_text()
    finally:
        d.close()
        host.registry.update_settings(RegistrySettings())


def test_stale_map_and_failing_address_refused(firestore_emulator: services.Service, host: Host,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon in this process on the same registry, its monotonic clock moved by hand: a map whose last round
    is older than two re-check intervals refuses; an address that spent its failures is refused before its JWT."""
    for k, v in firestore_emulator.env.items():
        monkeypatch.setenv(k, v)
    clock = [1000.0]
    settings = BridgeSettings(PROJECT, REGION, host.settings.registry_id, "t", recheck_interval_s=5.0,
                              auth_failures_per_s=0.1, auth_failure_burst=2)
    daemon = AuthDaemon(settings, Registry(PROJECT, settings.registry_id, REGION), monotonic=lambda: clock[0])
    run_in_own_loop(daemon.refresh())
    client_id = host.prefix + "dev-b"
    daemon.check(client_id, "203.0.113.7", host.token("dev-b"))
    clock[0] += 2 * settings.recheck_interval_s
    with pytest.raises(Refused, match="registry not fresh"):
        daemon.check(client_id, "203.0.113.7", host.token("dev-b"))
    run_in_own_loop(daemon.refresh())
    for _ in range(settings.auth_failure_burst):
        with pytest.raises(Refused, match="JWT signature"):
            daemon.check(client_id, "203.0.113.8", host.token("dev-a"))
    with pytest.raises(Refused, match="too many failed connects"):
        daemon.check(client_id, "203.0.113.8", host.token("dev-b"))
    daemon.check(client_id, "203.0.113.9", host.token("dev-b"))  # another address is not held back


def test_presence_removed_in_batches_but_never_a_newer_sessions(host: Host) -> None:
    """The daemon removes ended sessions' records in one commit; a record a newer session replaced meanwhile fails
    that commit's precondition, and each is then removed on its own: the newer session's record stays."""
    client, reg = host.registry.client, host.registry.registry_id
    until = datetime.now(UTC) + timedelta(hours=1)
    old_x, old_y = fanout.mark_connected_many(client, [(reg, "dev-x", "h", "s1", until),
                                                       (reg, "dev-y", "h", "s1", until)])
    fanout.mark_disconnected_many(client, [(reg, "dev-x", old_x), (reg, "dev-y", old_y)])
    assert not fanout.is_connected(client, reg, "dev-x") and not fanout.is_connected(client, reg, "dev-y")
    old_x, old_y = fanout.mark_connected_many(client, [(reg, "dev-x", "h", "s2", until),
                                                       (reg, "dev-y", "h", "s2", until)])
    fanout.mark_connected(client, reg, "dev-y", "h", "s3", until)  # a newer session of dev-y
    fanout.mark_disconnected_many(client, [(reg, "dev-x", old_x), (reg, "dev-y", old_y)])
    assert not fanout.is_connected(client, reg, "dev-x")
    assert fanout.is_connected(client, reg, "dev-y")


def test_daemon_control_connection_does_not_hold_small_writes(host: Host) -> None:
    """The daemon's sync requests are small writes one after another on its paho connection to the broker's loopback
    listener: with Nagle, each would wait for the broker's delayed ACK of the one before (see test_no_delay)."""
    broker = (host.settings.broker_host, host.settings.broker_port)
    found: dict[tuple[str, int], int] = {}

    def connected() -> bool:
        with tcp_sockets(host.daemon.proc.pid) as socks:
            for s in socks:
                with contextlib.suppress(OSError):  # a listening socket has no peer
                    if s.getpeername()[:2] == broker:
                        found[s.getsockname()[:2]] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        return bool(found)

    assert _wait(connected, 10), "the daemon has no connection to the broker's loopback listener"
    assert set(found.values()) == {1}, found


def test_presence_commits_gather_connects_that_arrive_one_at_a_time(firestore_emulator: services.Service,
                                                                   host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto asks one CONNECT at a time: CONNECTs 8 ms apart (longer than the front's 5 ms window) share presence
    commits, whose sync requests then reach the bridge service together. The bound: the commits a window of
    ``window_s`` (below the daemon's) makes of the gaps actually seen (a loaded machine stretches them); a longer
    window never makes more."""
    window_s = 0.02
    for k, v in firestore_emulator.env.items():
        monkeypatch.setenv(k, v)
    settings = BridgeSettings(PROJECT, REGION, host.settings.registry_id, "t", auth_failure_burst=1000)
    registry = Registry(PROJECT, settings.registry_id, REGION)
    keys = {}
    for i in range(12):
        private, public = generate_key("ES256")
        registry.create_device(f"dev-burst-{i}", [Credential("ES256_PEM", public)])
        keys[f"dev-burst-{i}"] = private
    daemon = AuthDaemon(settings, registry)

    async def burst() -> list[float]:
        await daemon.refresh()
        loop, times = asyncio.get_running_loop(), []
        for device, key in keys.items():
            times.append(loop.time())
            assert daemon.authenticate(host.prefix + device, "127.0.0.1",
                                       create_jwt(PROJECT, key, "ES256")).startswith("OK")
            await asyncio.sleep(0.008)
        while daemon._tasks:  # noqa: SLF001 - the presence writes end
            await asyncio.sleep(0.01)
        return times

    times = run_in_own_loop(burst())
    windows, opened = 0, -1.0
    for t in times:  # a commit gathers the CONNECTs within the window of the first it took
        if t >= opened + window_s:
            windows, opened = windows + 1, t
    assert windows < len(times), f"the machine stretched every gap beyond {window_s} s: {times}"
    assert daemon.counters()["presence_commits"] <= windows, (daemon.counters(), times)


class _Plugin:
    """The plugin's side of the auth daemon's protocol, spoken by hand to a daemon of this process."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        self.r, self.w = r, w

    async def line(self, timeout: float = 5) -> str:
        return (await asyncio.wait_for(self.r.readline(), timeout)).decode().rstrip("\n")

    async def quiet(self, timeout: float) -> bool:
        """Whether the daemon writes nothing for ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.r.readline(), timeout)
        except TimeoutError:
            return True
        return False


def _own_daemon(h: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                **fields: object) -> AuthDaemon:
    """An auth daemon in this process on the host's registry and Mosquitto, its own socket; no round runs during a
    test (an hour between them): what it does at SYNCED is its own doing."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = dataclasses.replace(h.settings, auth_socket=str(tmp_path / "own.sock"), recheck_interval_s=3600.0,
                                   host_id="own", **fields)
    return AuthDaemon(settings, Registry(PROJECT, h.settings.registry_id, REGION))


async def _connect(daemon: AuthDaemon) -> _Plugin:
    return _Plugin(*await asyncio.open_unix_connection(daemon.settings.auth_socket))


def test_list_race_and_revocation_at_synced(host: Host, firestore_emulator: services.Service, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A session admitted after the plugin began its LIVE list (the daemon reads the AUTH first) is kept; a listed
    session the daemon did not admit whose device is blocked is kicked at SYNCED, not at its device's next change
    (which may never come: the block happened while no daemon ran); /healthz is unhealthy until the plugin's events
    connection is synced (kicks would go nowhere)."""
    daemon = _own_daemon(host, tmp_path, monkeypatch, firestore_emulator.env, health_port=services.free_port(),
                         workdir="")

    # A session of this host that ended while no daemon ran: its presence record goes after the first LIVE list.
    fanout.mark_connected(host.registry.client, host.registry.registry_id, "dev-stale", "own", "s0",
                          datetime.now(UTC) + timedelta(hours=1))

    async def main() -> None:
        await daemon.start()
        try:
            assert (await daemon.healthy())[1] == "no events connection from Mosquitto's plugin"
            auth = await _connect(daemon)
            auth.w.write(f"AUTH 7 {host.prefix}dev-b\n203.0.113.1\n{host.token('dev-b')}\n".encode())
            rid, ok, deadline, sid = (await auth.line()).split()
            assert (rid, ok) == ("7", "OK") and int(deadline) > time.time()
            # A refusal's reason is capped: an attacker-sized JWT header (echoed in it) never outgrows the plugin's
            # 512-byte answer buffer.
            header = base64.urlsafe_b64encode(json.dumps({"alg": "x" * 3000}).encode()).decode().rstrip("=")
            auth.w.write(f"AUTH 8 {host.prefix}dev-b\n203.0.113.1\n{header}.e30.c2ln\n".encode())
            refusal = await auth.line()
            assert refusal.startswith("8 NO JWT alg 'xxx") and len(refusal) < 256, refusal
            events = await _connect(daemon)
            blocked = int(sid) + 1000  # a session of a daemon before this one, listed by the plugin
            events.w.write(f"EVENTS {int(sid) - 1}\nLIVE {blocked} {deadline} {host.prefix}dev-blocked\n"
                           "SYNCED\n".encode())
            assert await events.line() == f"KICK {blocked}"
            assert await events.quiet(0.3), "a KICK for the session admitted after the list began"
            assert int(sid) in daemon.sessions and blocked in daemon.sessions
            for _ in range(100):
                if not fanout.is_connected(host.registry.client, host.registry.registry_id, "dev-stale"):
                    break
                await asyncio.sleep(0.1)
            assert daemon.stats["presence_swept"] == 1, daemon.stats
            assert not fanout.is_connected(host.registry.client, host.registry.registry_id, "dev-stale")
            assert await daemon.healthy() == (True, "ok")
            events.w.write(f"GONE {blocked}\n".encode())
            # The next list (a reconnect) lacks the session: it has ended, its GONE lost with the connection.
            again = await _connect(daemon)
            again.w.write(f"EVENTS {sid}\nSYNCED\n".encode())
            assert await again.quiet(0.3) and daemon.sessions == {}
            # A Mosquitto that restarted: its plugin was given no session id yet, and the auth connection of the old
            # one has closed: the sessions admitted on it have ended.
            auth.w.write(f"AUTH 9 {host.prefix}dev-b\n203.0.113.1\n{host.token('dev-b')}\n".encode())
            assert (await auth.line()).startswith("9 OK ") and len(daemon.sessions) == 1
            auth.w.close()
            restarted = await _connect(daemon)
            restarted.w.write(b"EVENTS 0\nSYNCED\n")
            assert await restarted.quiet(0.3) and daemon.sessions == {}
        finally:
            await daemon.stop()

    run_in_own_loop(main())


def test_an_events_line_not_understood_is_skipped_not_the_connection(host: Host, firestore_emulator: services.Service,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A GONE, SUBSCRIBED, LIVE or EVENTS line the daemon cannot read is counted and skipped: ending the plugin's
    events connection for it would leave revocations going nowhere until the plugin connects again. A session's
    /subscribed requests are one a second at most."""
    daemon = _own_daemon(host, tmp_path, monkeypatch, firestore_emulator.env, health_port=services.free_port(),
                         workdir="")

    async def main() -> None:
        await daemon.start()
        try:
            events = await _connect(daemon)
            events.w.write(b"EVENTS 0\nSYNCED\nGONE 'RS256']\nSUBSCRIBED x\nEVENTS y\nLIVE 1\n")
            # the same connection still works: a listed session of a blocked device is kicked at SYNCED
            events.w.write(f"EVENTS 0\nLIVE 77 {int(time.time()) + 3600} {host.prefix}dev-blocked\nSYNCED\n".encode())
            assert await events.line() == "KICK 77"
            assert daemon.stats["bad_lines"] == 3, daemon.stats
            # A device naming its config again and again (one SUBSCRIBE may hold it N times): one /subscribed request
            # a second per session, each a registry read in the bridge service.
            auth = await _connect(daemon)
            auth.w.write(f"AUTH 1 {host.prefix}dev-b\n203.0.113.1\n{host.token('dev-b')}\n".encode())
            sid = (await auth.line()).split()[3]
            events.w.write(f"SUBSCRIBED {sid}\n".encode() * 5)
            for _ in range(100):
                if daemon.stats["subscribed_coalesced"] == 4:
                    break
                await asyncio.sleep(0.05)
            assert daemon.stats["subscribed_coalesced"] == 4, daemon.stats
        finally:
            await daemon.stop()

    run_in_own_loop(main())

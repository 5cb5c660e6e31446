"""The bench's OpenSSL plugin prototype (bench/mosquitto_auth) authenticates for real: compiled here, Mosquitto
started with it on a TLS listener, devices registered on the Firestore emulator, their keys written as the bench
writes them. A valid device connects; an expired JWT, a JWT signed with another key, an unknown device and client
ids of the wrong form or of another registry are refused; a device publishes and subscribes only on its own topics.
(The product's plugin with its auth daemon: tests/bridge/test_mosquitto_device_auth.py; its ``Device`` client is
this module's.)"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench import mosquitto_auth
from iotbridge.device import create_jwt, generate_key
from iotbridge.local import services
from iotbridge.local.tls import generate_local_tls
from iotbridge.registry import Credential, Registry, RegistrySettings
from tests.conftest import require

PROJECT, REGION = "plugin-project", "europe-west1"
pytestmark = pytest.mark.emulator


class Device:
    def __init__(self, port: int, ca: Path, client_id: str, password: str):
        self.done = threading.Event()
        self.connack: int | None = None
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        c.tls_set_context(ssl.create_default_context(cafile=str(ca)))
        c.username_pw_set("unused", password)
        c.on_connect = self._on_connect
        c.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid, rc.value)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ack(mid, rcs[0].value)
        self.client = c
        c.connect("localhost", port, keepalive=30, clean_start=True)
        c.loop_start()
        assert self.done.wait(10), "no CONNACK within 10 s"

    def _on_connect(self, _c, _u, _flags, rc, _props) -> None:  # noqa: ANN001
        self.connack = rc.value
        self.done.set()

    def _ack(self, mid: int, code: int) -> None:
        with self.acked:
            self.acks[mid] = code
            self.acked.notify_all()

    def wait_ack(self, mid: int) -> int:
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, 10), f"no acknowledgement of {mid}"
            return self.acks[mid]

    def publish(self, topic: str) -> int:
        return self.wait_ack(self.client.publish(topic, b"x", qos=1).mid)

    def subscribe(self, topic: str) -> int:
        mid = self.client.subscribe(topic, qos=1)[1]
        assert mid is not None
        return self.wait_ack(mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return mosquitto_auth.build(tmp_path_factory.mktemp("plugin"))
    except services.MissingPrerequisite as exc:  # as conftest's require(): fail with the install command
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def fleet(firestore_emulator: services.Service) -> tuple[Registry, dict[str, tuple[bytes, str]]]:
    """A fresh registry with three devices: two ES256, one RS256; {device: (private key, algorithm)}."""
    keys: dict[str, tuple[bytes, str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in firestore_emulator.env.items():
            mp.setenv(k, v)
        registry = Registry(PROJECT, f"reg-{uuid.uuid4().hex[:10]}", REGION)
        registry.create_registry(RegistrySettings())
        for device, alg, fmt in (("dev-a", "ES256", "ES256_PEM"), ("dev-b", "ES256", "ES256_PEM"),
                                 ("dev-rsa", "RS256", "RSA_PEM")):
            private, public = generate_key("ES256" if alg == "ES256" else "RS256")
            registry.create_device(device, [Credential("ES256_PEM" if fmt == "ES256_PEM" else "RSA_PEM", public)])
            keys[device] = (private, alg)
    return registry, keys


@pytest.fixture(scope="module")
def broker(plugin: Path, fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    registry, _keys = fleet
    wd = tmp_path_factory.mktemp("broker-openssl")
    keydir = wd / "keys"
    mosquitto_auth.write_keys({d.id: d for d in registry.list_devices()}, keydir)
    tls = generate_local_tls(wd / "tls")
    port = services.free_port()
    prefix = mosquitto_auth.client_id_prefix(PROJECT, REGION, registry.registry_id)
    conf = mosquitto_auth.listener_conf(port, tls.server_cert, tls.server_key, plugin, prefix, keydir=keydir,
                                        audience=PROJECT)
    mosq = require(mosquitto_auth.start_broker, conf, port, wd / "mosquitto")
    yield port, tls.ca_cert
    mosq.stop()


def test_plugin_authenticates_and_confines(broker, fleet) -> None:
    port, ca = broker
    registry, keys = fleet
    prefix = mosquitto_auth.client_id_prefix(PROJECT, REGION, registry.registry_id)

    def connack(device: str, token: str, client_id: str | None = None) -> int:
        d = Device(port, ca, client_id or prefix + device, token)
        try:
            return d.connack if d.connack is not None else -1
        finally:
            d.close()

    def token(device: str, **kw) -> str:  # noqa: ANN003
        private, alg = keys[device]
        return create_jwt(PROJECT, private, alg, **kw)

    assert connack("dev-a", token("dev-a")) == 0
    assert connack("dev-rsa", token("dev-rsa")) == 0
    refused = {
        "expired": connack("dev-a", token("dev-a", now=time.time() - 7200)),
        "signed with another device's key": connack("dev-a", token("dev-b")),
        "another key of the same algorithm, unregistered": connack(
            "dev-a", create_jwt(PROJECT, generate_key("ES256")[0], "ES256")),
        "another project's token": connack("dev-a", create_jwt("other", keys["dev-a"][0], "ES256")),
        "unknown device": connack("dev-zz", token("dev-a")),
        "client id not a device path": connack("dev-a", token("dev-a"), client_id="dev-a"),
        "client id of another registry": connack(
            "dev-a", token("dev-a"), mosquitto_auth.client_id_prefix(PROJECT, REGION, "elsewhere") + "dev-a"),
        "not a JWT": connack("dev-a", "password"),
    }
    assert all(code >= 0x80 for code in refused.values()), refused

    a = Device(port, ca, prefix + "dev-a", token("dev-a"))
    try:
        assert a.connack == 0
        # accepted: 0 or 0x10 (no matching subscribers), refused: 0x87 (not authorized)
        assert a.publish("/devices/dev-a/events") in (0, 0x10)
        assert a.publish("/devices/dev-a/events/sub") in (0, 0x10)
        assert a.publish("/devices/dev-a/state") in (0, 0x10)
        assert a.publish("/devices/dev-b/events") == 0x87  # not authorized
        assert a.publish("/devices/dev-b/state") == 0x87
        assert a.subscribe("/devices/dev-a/config") == 1  # granted QoS 1
        assert a.subscribe("/devices/dev-a/commands/#") == 1
        assert a.subscribe("/devices/dev-b/config") == 0x87
        assert a.subscribe("#") == 0x87
    finally:
        a.close()


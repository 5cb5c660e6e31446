"""Fixtures for the bridge tests: the real Pub/Sub and Firestore emulators, a real Mosquitto, the front and the
bridge service as their own processes, and devices written the IoT Core way (iotbridge.device on paho)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1
from googleapiclient import discovery

from iotbridge import spec
from iotbridge.device import ConnectError, Device, DeviceIdentity, generate_key
from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.registry import Credential, Registry
from tests.waiting import wait_for

from .admin_server import start_admin

PROJECT = "local-project"
REGION = "europe-west1"
REGISTRY = "bridge-tests"
PULL_TOPICS = ("telemetry", "state", "device-logs")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PubSubReader:
    """Pull subscriptions on the bridge's output topics, created fresh per test (nothing stale is read)."""

    project: str
    prefix: str
    subscriber: pubsub_v1.SubscriberClient = field(default_factory=pubsub_v1.SubscriberClient)
    paths: dict[str, str] = field(default_factory=dict)

    def attach(self, tag: str, keys: tuple[str, ...] = PULL_TOPICS) -> None:
        for key in keys:
            path = self.subscriber.subscription_path(self.project, f"{self.prefix}-{key}-{tag}")
            self.subscriber.create_subscription(request={
                "name": path, "topic": f"projects/{self.project}/topics/{spec.topic_name(self.prefix, key)}",
                "ack_deadline_seconds": 60})
            self.paths[key] = path

    def pull(self, key: str, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[pubsub_v1.types.PubsubMessage]:
        """At least ``n`` messages (all that arrive until ``settle`` seconds after the n-th), acked."""
        out: list[pubsub_v1.types.PubsubMessage] = []
        deadline = time.monotonic() + timeout

        def received() -> int:
            out.extend(self._pull_once(key, deadline))
            return len(out)

        if n:
            wait_for(f"{n} messages on {key} (the number received)", received, lambda got: got >= n,
                     timeout=timeout, interval=0)
        settle_until = min(time.monotonic() + settle, deadline)
        while time.monotonic() < settle_until:
            out.extend(self._pull_once(key, settle_until))
        return out

    def _pull_once(self, key: str, until: float) -> list[pubsub_v1.types.PubsubMessage]:
        """One pull, acked. The emulator holds an empty pull until its deadline: keep each call short."""
        try:
            resp = self.subscriber.pull(request={"subscription": self.paths[key], "max_messages": 1000},
                                        timeout=max(0.3, min(2.0, until - time.monotonic())))
        except gexc.DeadlineExceeded:
            return []
        if resp.received_messages:
            self.subscriber.acknowledge(request={"subscription": self.paths[key],
                                                 "ack_ids": [m.ack_id for m in resp.received_messages]})
        return [m.message for m in resp.received_messages]

    def drain(self, key: str, wait: float = 1.0) -> list[pubsub_v1.types.PubsubMessage]:
        """Everything that arrives within ``wait`` seconds (to prove nothing was forwarded)."""
        return self.pull(key, 0, timeout=wait + 10, settle=wait)


@pytest.fixture(scope="session")
def bridge_env(pubsub_emulator, firestore_emulator) -> Iterator[dict[str, str]]:
    env = {**pubsub_emulator.env, **firestore_emulator.env}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    yield env
    mp.undo()


def create_topics(project: str, prefix: str) -> None:
    pub = pubsub_v1.PublisherClient()
    for key in spec.TOPICS:
        with contextlib.suppress(gexc.AlreadyExists):
            pub.create_topic(request={"name": pub.topic_path(project, spec.topic_name(prefix, key))})


@pytest.fixture(scope="session")
def registry(bridge_env) -> Registry:
    return Registry(PROJECT, REGISTRY, REGION)


class DeviceCA:
    """A registry CA that issues device client certificates (the optional mTLS way in)."""

    def __init__(self, directory: Path):
        from datetime import UTC, datetime, timedelta

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self._now = datetime.now(UTC) - timedelta(minutes=5)
        self._td = timedelta
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device CA")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(self._now)
                     .not_valid_after(self._now + timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "device-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, device_id: str) -> tuple[str, Path, Path]:
        """(certificate PEM, cert file, key file) for a new device key signed by this CA."""
        x509, ser = self._x509, self._ser
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, device_id)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(self._now)
                .not_valid_after(self._now + self._td(days=1)).sign(self.key, self._hashes.SHA256()))
        pem = cert.public_bytes(ser.Encoding.PEM)
        cert_file, key_file = self.directory / f"{device_id}.pem", self.directory / f"{device_id}-key.pem"
        cert_file.write_bytes(pem)
        key_file.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        return pem.decode(), cert_file, key_file


# Every test connects from 127.0.0.1 and the attack tests fail many CONNECTs on purpose: the shared stacks give the
# loopback address room, so that only the tests of the per-address limit (which keep the defaults) meet it.
GENEROUS_ADDRESS_LIMIT = {"auth_failures_per_s": 1000.0, "auth_failure_burst": 100_000}


def new_stack(tmp: Path, env: dict[str, str], recheck_interval_s: float = 0.5,
              client_ca: Path | None = None, **settings: object) -> BridgeStack:
    """A fresh host; ``settings`` are further BridgeSettings fields, e.g. ``publisher_factory`` ("module:callable",
    importable from the repository root) to replace the bridge service's Pub/Sub publisher. Unless they say
    otherwise, the loopback address gets generous per-address limits. Each host has an id of its own, as deployed
    hosts (their instance names) do: hosts sharing an id would share one liveness record, and one stopping would run
    out the record of the others."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    if settings:
        env = {**env, "PYTHONPATH": str(REPO_ROOT)}
    try:
        return start_bridge_stack(tmp, PROJECT, REGION, REGISTRY, prefix, env, recheck_interval_s=recheck_interval_s,
                                  client_ca=client_ca, host_id=f"h-{prefix}",
                                  **{**GENEROUS_ADDRESS_LIMIT, **settings})
    except services.MissingPrerequisite as exc:
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)


def broker_session(stack: BridgeStack, user: str, client_id: str, max_inflight: int = 20,
                   password: str | None = None) -> paho.Client:
    """A connected client on the loopback listener (e.g. as the front relays a device: user ``front``, client id =
    device id), with the user's password from the host's secrets unless given; AssertionError when the broker
    refuses it."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.username_pw_set(user, password if password is not None else stack.settings.secrets()[user])
    c.max_inflight_messages_set(max_inflight)
    answered = threading.Event()
    outcome: list[object] = []

    def on_connect(cl, ud, flags, rc, props) -> None:  # noqa: ANN001
        outcome.append(rc)
        answered.set()

    c.on_connect = on_connect
    c.connect(stack.settings.broker_host, stack.settings.broker_port)
    c.loop_start()
    if not answered.wait(10) or getattr(outcome[0], "is_failure", True):
        c.loop_stop()
        c.disconnect()
        raise AssertionError(f"broker refused {user} as {client_id}: {outcome or 'no CONNACK'}")
    return c


@pytest.fixture(scope="session")
def device_ca(tmp_path_factory) -> DeviceCA:
    return DeviceCA(tmp_path_factory.mktemp("device-ca"))


@pytest.fixture(scope="session")
def stack(bridge_env, tmp_path_factory, device_ca) -> Iterator[BridgeStack]:
    st = new_stack(tmp_path_factory.mktemp("bridge"), bridge_env, client_ca=device_ca.path)
    yield st
    st.stop()


@pytest.fixture
def reader(stack, request) -> PubSubReader:
    r = PubSubReader(PROJECT, stack.settings.prefix)
    r.attach(uuid.uuid4().hex[:8])
    return r


@dataclass
class DeviceFactory:
    registry: Registry
    stack: BridgeStack
    created: list[Device] = field(default_factory=list)

    def register(self, algorithm: str = "ES256", device_id: str | None = None, **create) -> tuple[str, bytes]:
        device_id = device_id or f"dev-{uuid.uuid4().hex[:10]}"
        private, public = generate_key(algorithm)  # type: ignore[arg-type]
        fmt = "ES256_PEM" if algorithm == "ES256" else "RSA_PEM"
        self.registry.create_device(device_id, [Credential(fmt, public)], **create)
        return device_id, private

    def device(self, device_id: str, private: bytes, algorithm: str = "ES256", stack: BridgeStack | None = None,
               **kw) -> Device:
        st = stack or self.stack
        d = Device(DeviceIdentity(PROJECT, REGION, REGISTRY, device_id, private, algorithm),  # type: ignore[arg-type]
                   st.mqtt_host, st.mqtt_port, str(st.ca_cert), **kw)
        self.created.append(d)
        return d

    def connected(self, algorithm: str = "ES256", **kw) -> Device:
        device_id, private = self.register(algorithm)
        d = self.device(device_id, private, algorithm, **kw)
        d.connect()
        return d


def connects(dev: Device, timeout: float = 10.0) -> bool:
    """Connect; False when refused (for waiting until a change reaches the host that judges the CONNECT)."""
    try:
        dev.connect(timeout=timeout)
    except ConnectError:
        return False
    return True


@pytest.fixture
def devices(registry, stack) -> Iterator[DeviceFactory]:
    f = DeviceFactory(registry, stack)
    yield f
    for d in f.created:
        with contextlib.suppress(Exception):
            d.disconnect()


# The admin API over a module's bridge stack, and Google's discovery client for it (static discovery).
@pytest.fixture(scope="module")
def api_url(stack, bridge_env, tmp_path_factory) -> Iterator[str]:
    svc, url = start_admin(stack, bridge_env, tmp_path_factory.mktemp("admin"))
    yield url
    svc.stop()


@pytest.fixture(scope="module")
def cloudiot(api_url):
    return discovery.build("cloudiot", "v1", client_options={"api_endpoint": api_url},
                           credentials=AnonymousCredentials(), static_discovery=True, cache_discovery=False)


def retained(stack: BridgeStack, topic: str, wait_s: int = 2) -> bytes:
    """What the host's broker retains on ``topic`` (b"" for nothing), read on its loopback listener with
    mosquitto_sub (a client nobody here wrote)."""
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(stack.settings.broker_port), "-u", "bridge", "-P",
         stack.settings.secrets()["bridge"], "-i", f"iotbridge:test-retained-{uuid.uuid4().hex[:8]}", "-t", topic,
         "-C", "1", "-W", str(wait_s), "--retained-only"], capture_output=True, timeout=wait_s + 8)
    return out.stdout.rstrip(b"\n")



def host_subscription_exists(sub: pubsub_v1.SubscriberClient, prefix: str, host: str) -> bool:
    """Whether the broker host ``host``'s own delivery subscription exists."""
    from iotbridge.bridge import fanout

    try:
        sub.get_subscription(request={"subscription": sub.subscription_path(
            PROJECT, fanout.host_subscription(prefix, host))})
        return True
    except gexc.NotFound:
        return False

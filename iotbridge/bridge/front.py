"""The MQTT-aware TLS front: IoT Core device authentication in front of a host-local Mosquitto.

Mosquitto cannot check IoT Core JWTs, so every device connection ends here first:

1. TLS 1.2+ is terminated (a plaintext client never gets past the handshake).
2. The CONNECT packet is read and checked: MQTT 3.1.1 or 5; client id
   ``projects/{p}/locations/{r}/registries/{reg}/devices/{d}`` of this deployment; the device exists and is not
   blocked; the password is a JWT signed by one of its unexpired credentials (:mod:`iotbridge.bridge.auth`) —
   or, without a password, the TLS client certificate (issued by ``client_ca``) carries the key of one of its
   unexpired X.509 credentials; a will message may only target the device's own telemetry/state topics.
3. The CONNECT is re-encoded for Mosquitto's local listener (its Unix socket, ``broker_socket``; or loopback TCP)
   and sent on a connection of the session's own: client id = device id (so Mosquitto's client-id
   takeover keeps one live connection per device, and its ACL ``pattern`` lines on ``%c`` confine the session to
   that device's topics), user ``front`` with the front's password, clean session (commands are not stored).
4. Bytes are relayed both ways, cut into packets on whole socket reads and written once per read. Each
   device→broker PUBLISH and SUBSCRIBE packet is checked (own topics only, QoS ≤ 1, events ≤ 256 KB, state
   ≤ 64 KB); a violation closes the connection and nothing of the offending packet, nor anything after it, is
   forwarded. A SUBSCRIBE asking QoS 2 is granted QoS 1.
5. The session is closed at the token's ``exp``; every ``recheck_interval_s`` the devices whose registry record
   changed since the previous round are re-read (:mod:`iotbridge.bridge.regcache`) and their sessions dropped when
   blocked, deleted or their credential is gone; a device's latest PINGREQ is written as ``last_heartbeat_time``
   at most every ``regcache.HEARTBEAT_RECORD_S``. A reconnecting device is authenticated from that cache while it
   is fresh; other CONNECTs' reads, and the presence records, are batched.
6. A config the broker delivers at QoS 1 is acknowledged in the registry when the device's PUBACK passes
   (IoT Core recorded the ack the same way; a QoS 0 config subscription gets no ack).
7. At connect, the front asks the bridge service (``iotbridge/sync``) to make sure the broker holds the
   device's latest config as a retained message — so a device gets its config on whichever host it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
import uuid
from asyncio import sslproto
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge import spec
from iotbridge.bridge import fanout, limits, mqtt, regcache, resends
from iotbridge.bridge.auth import AuthError, ClientIdError, parse_device_path, verify_jwt
from iotbridge.bridge.gateway import MAX_ATTACHED, GatewayRelay, GatewaySession
from iotbridge.bridge.ratelimit import ExpiringSet, KeyedBuckets, TokenBucket
from iotbridge.bridge.settings import EVENTS_MAX_BYTES, STATE_MAX_BYTES, BridgeSettings
from iotbridge.registry import (
    Grant,
    Registry,
    RegistryNotFound,
    RegistrySettings,
    signed_by_one_of,
)

T = TypeVar("T")

log = logging.getLogger("iotbridge.front")

CONNECT_TIMEOUT_S = 10.0
BROKER_CONNECT_TIMEOUT_S = 5.0  # a session's connect to Mosquitto's Unix socket (open_unix_stream)
MAX_CONNECT_BYTES = 16 * 1024
# Largest device→broker packet read at all: a 256 KB event plus its topic and MQTT 5 properties.
MAX_DEVICE_PACKET = EVENTS_MAX_BYTES + 70 * 1024
MAX_BROKER_PACKET = 2 * 1024 * 1024
SYNC_TOPIC = "iotbridge/sync"
SYNC_SUBSCRIBED = "/subscribed"  # appended to the device id: it just subscribed to its config topic
# Appended to the device id: a gateway attached the device after subscribing to its config topic, so the retained
# copy the broker sent at that subscribe was dropped; the latest config is published again, even if already published.
SYNC_AGAIN = "/again"
SYNC_GONE = "/gone"  # appended to the device id: its last session on this host ended


def _per_registry(values: dict[str, T], registries: dict[str, Registry]) -> dict[Registry, dict[str, T]]:
    """``values`` keyed by device id, split by the registry each device belongs to."""
    out: dict[Registry, dict[str, T]] = {}
    for device_id, value in values.items():
        out.setdefault(registries[device_id], {})[device_id] = value
    return out


def sync_payload(device_id: str, subscribed: bool = False, again: bool = False) -> bytes:
    """A sync request: ``{device}`` at connect, ``{device}/subscribed`` after a SUBSCRIBE to its config topic,
    which makes the bridge deliver an empty latest config (an empty retained message is not kept by the
    broker, so it reaches only the subscribers of the moment); ``{device}/again`` (see SYNC_AGAIN)."""
    return (device_id + (SYNC_AGAIN if again else SYNC_SUBSCRIBED if subscribed else "")).encode()


def no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:  # noqa: ANN401 - paho's socket-like
    """A paho client's ``on_socket_open``: no Nagle on a loopback TCP connection to Mosquitto. The bridge service
    acks a sync request and then publishes its config, the front publishes one sync request after another: small
    segments, each of which Nagle would hold until the broker's delayed ACK of the one before (about 40 ms on Linux
    loopback). A Unix socket has no such option. (The front's device sessions, asyncio streams, have it already:
    asyncio sets ``TCP_NODELAY`` on every TCP connection it makes or accepts.)"""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
TLS_READ_BUFFER = 32 * 1024
RELAY_READ = 64 * 1024

# ---- limits (README "Security" lists each, with what a device sees when it reaches it)
MAX_SESSION = timedelta(hours=24)  # IoT Core's longest connection; mTLS sessions too
# Before authentication, BridgeSettings bounds how many connections may await their CONNECT
# (max_pending_connects) and what one source address may cost the registry (auth_failures_per_s,
# auth_failure_burst): a refused CONNECT costs a token; a spent address is answered "server unavailable"
# without a registry read until it earns one back.
MAX_TRACKED_ADDRESSES = 50_000
MAX_TRACKED_DEVICES = 100_000  # rate-limit buckets kept per device id, across its reconnects
REFUSAL_LOG_S = 10.0  # refusals of one address before TLS are logged at most this often
UNKNOWN_DEVICE_TTL_S = 10.0  # a device id the registry did not know is not looked up again for this long
# A device the front disconnected for a protocol violation may not reconnect for this long: each reconnect costs a
# TLS handshake, a JWT verification and a registry read, and a firmware that loops on the violation would spend
# them as fast as it can.
VIOLATION_BACKOFF_S = 5.0
MAX_UNKNOWN_DEVICES = 50_000
AUTH_WORKERS = 8  # registry reads of CONNECTs; nothing an authenticated device sends runs on these threads
REGISTRY_WORKERS = 4  # config acks, presence, heartbeats, re-checks
# Per device session: messages, bytes and state updates a second are BridgeSettings' (IoT Core's limits by default).
# A device over a limit is slowed: the front stops reading its socket until the limit allows the next packet.
SUBSCRIBES_PER_S = 1.0
SUBSCRIBE_BURST = 10
MAX_FILTERS_PER_SUBSCRIBE = 8
MAX_SUBSCRIPTIONS = 16  # distinct filters one session may hold: config, commands, commands/# and subfolders
GATEWAY_MAX_SUBSCRIPTIONS = MAX_SUBSCRIPTIONS + 2 * MAX_ATTACHED  # a gateway's: config and commands/# per device
LIMIT_REPORT_S = 60.0  # a slowed device is logged and recorded in the registry at most once a minute
# A session the front ends because the device is no longer allowed leaves without its will: Mosquitto would
# otherwise publish the will of a revoked identity as its telemetry.
MQTT_DISCONNECT = bytes([mqtt.DISCONNECT << 4, 0])


def address_key(host: str) -> str:
    """What the per-address limits count by: the IPv4 address, or the /64 of an IPv6 one (one subscriber's)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def printable(text: str, limit: int = 300) -> str:
    """Device-supplied text made safe for one log line: control characters escaped, length capped."""
    out = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


async def _forward(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write, and wait only when the transport's buffer is above its high-water mark (or it is closing, so a
    closed peer still surfaces as an error): awaiting ``drain`` after every write was a measurable share of the
    relay's CPU (bench/)."""
    writer.write(data)
    transport = writer.transport
    if transport.is_closing() or transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
        await writer.drain()


class _SharedReadBufferSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with one read buffer for all the connections of the event loop.

    asyncio gives each TLS connection a read buffer of its own (``SSLProtocol.max_size``, 256 KiB, zero-filled and
    so resident: 2.5 GiB of the front's 3 GiB at 10,000 idle devices; 32 KiB a connection after ``max_size`` was
    lowered). The buffer holds nothing between two reads: the selector transport asks for it (``get_buffer``),
    reads the socket into it and hands the bytes over (``buffer_updated``, which copies them into the
    connection's TLS input) in one callback, so one buffer serves every connection of a thread's event loop (a
    protocol is created and used in the thread of its loop)."""

    _per_thread = threading.local()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shared = getattr(self._per_thread, "buffer", None)
        if shared is None or len(shared) < self.max_size:
            shared = self._per_thread.buffer = bytearray(self.max_size)
        self._ssl_buffer = shared
        self._ssl_buffer_view = memoryview(shared)


def share_tls_read_buffer() -> None:
    """TLS connections the event loop starts from now on (``start_tls``) share one read buffer. A TLS record
    carries at most 16 KiB of plaintext, so a 32 KiB buffer costs no throughput."""
    _SharedReadBufferSSLProtocol.max_size = TLS_READ_BUFFER
    sslproto.SSLProtocol = _SharedReadBufferSSLProtocol


async def open_unix_stream(path: str, timeout: float = BROKER_CONNECT_TIMEOUT_S,
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream connected to the Unix socket at ``path``, also when its listener's backlog is full.

    A Unix socket does not queue a connect beyond the listener's backlog (Mosquitto's is 100; a TCP connect
    would be retried by the kernel): a non-blocking connect fails with EAGAIN, which
    ``asyncio.open_unix_connection`` takes for "in progress" and hands back a socket that was never connected
    (a connect storm lost about one device in ten that way). Here the connect is tried again, with a short
    backoff, until it succeeds or ``timeout`` passes (``TimeoutError``, an ``OSError``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    deadline, delay = loop.time() + timeout, 0.001
    try:
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise TimeoutError(f"{path}: listener's backlog full for {timeout:g}s") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.05)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


def server_ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """TLS 1.2+ with the server certificate; with ``client_ca``, a device may also present a client certificate
    issued by that CA (IoT Core's registry CA certificates) instead of a JWT."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca)
    return ctx


def _spki(public_key) -> bytes:  # noqa: ANN001
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_client_certificate(cert_der: bytes, credentials, now: datetime | None = None):  # noqa: ANN001, ANN201
    """The TLS layer verified the chain; here the certificate must carry the key of one of the device's
    unexpired X.509 credentials. Returns (the certificate's notAfter, the matching credential)."""
    now = now or datetime.now(UTC)
    cert = x509.load_der_x509_certificate(cert_der)
    presented = _spki(cert.public_key())
    for cred in credentials:
        if not cred.format.endswith("_X509_PEM") or (cred.expiration_time and cred.expiration_time <= now):
            continue
        if _spki(cred.public_key()) == presented:
            return cert.not_valid_after_utc, cred
    raise AuthError("client certificate matches no unexpired X.509 credential of this device")


def session_deadline(now: datetime, proof_expires_at: datetime, credential_expires_at: datetime | None) -> datetime:
    """When a session must end whatever else happens: its proof (the JWT's ``exp``, the client certificate's
    notAfter), its credential's expiration, and at most 24 h after it began (IoT Core's longest JWT)."""
    ends = [proof_expires_at, now + MAX_SESSION]
    if credential_expires_at is not None:
        ends.append(credential_expires_at)
    return min(ends)


def topic_kind(topic: str, device_id: str) -> str | None:
    """'events' or 'state' when a device may publish to ``topic`` (the layout of ``spec.device_topic``); None
    otherwise."""
    parsed = spec.parse_device_topic(topic)
    if parsed is None or parsed[0] != device_id:
        return None
    _, kind, sub_folder = parsed
    if kind == spec.STATE:
        return "state"
    if kind == spec.EVENTS:
        return None if ("+" in sub_folder or "#" in sub_folder) else "events"
    return None


def subscription_allowed(topic_filter: str, device_id: str) -> bool:
    """Whether a device may subscribe to ``topic_filter``: its config, its commands, or the commands of one
    subfolder (with or without ``/#``)."""
    parsed = spec.parse_device_topic(topic_filter)
    if parsed is None or parsed[0] != device_id:
        return False
    _, kind, sub_folder = parsed
    if kind == spec.CONFIG:
        return True
    if kind != spec.COMMANDS:
        return False
    if sub_folder in ("", "#"):
        return True
    head = sub_folder[:-2] if sub_folder.endswith("/#") else sub_folder
    return bool(head) and "+" not in head and "#" not in head


class Refusal(Exception):
    """A device's proof of identity refused by :meth:`Front.verify_device`: ``kind`` says how each protocol answers
    (MQTT CONNACK code, HTTP status), ``reason`` is safe to log."""

    BAD_CREDENTIALS = "bad_credentials"  # unknown device, bad token or certificate: indistinguishable on purpose
    BLOCKED = "blocked"  # only a device that proved its identity learns it is blocked
    ADDRESS_LIMITED = "address_limited"  # the source address spent its failed attempts
    UNAVAILABLE = "unavailable"  # the registry is unreachable
    DISABLED = "disabled"  # the device's registry has the protocol off (mqttConfig / httpConfig)

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Proof:
    """A device that proved its identity: how (``RS256``/``ES256``/``mTLS``), until when, with which credential."""

    device: Any
    method: str
    expires_at: datetime
    credential: Any
    at: datetime
    registry: Any = None  # the Registry the device was found in


class Dropped(Exception):
    """The front closes this session; the message is the logged reason."""


def revoked_reason(num_id: str, credential_pem: str, grant: Grant | None, now: datetime) -> str:
    """Why a session authenticated as device ``num_id`` with ``credential_pem`` may no longer stay, given what
    the registry holds now (``grant``; None when the device is gone); "" when it may."""
    if grant is None or grant.num_id != num_id:
        return "device deleted"  # a device deleted and created again is another device, with another numeric id
    if grant.blocked:
        return "device blocked"
    if credential_pem not in grant.credentials:
        return "credential removed"
    expires = grant.credentials[credential_pem]
    if expires is not None and expires <= now:
        return "credential expired"
    return ""


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


# Slots: one of these lives per connected device (no per-instance __dict__).
@dataclass(eq=False, slots=True)
class Session:
    """A connected device's session; created in the event loop's thread, used only there."""

    device_id: str
    level: int
    expires_at: datetime
    peer: str
    num_id: str = ""
    credential_pem: str = ""  # the registered credential this session authenticated with
    done: asyncio.Future[None] = field(default_factory=_new_future)  # resolved by close()
    reason: str = ""
    drop_will: bool = False
    # broker packet id -> (sha256 of the config, whether the broker sent it as a retained replay on a SUBSCRIBE)
    config_inflight: dict[int, tuple[str, bool]] = field(default_factory=dict)
    # sha256 of a config whose registry ack is running -> whether another live delivery of those bytes (a new
    # version) was acknowledged meanwhile, so that the running ack looks once more when it ends
    acks_running: dict[str, bool] = field(default_factory=dict)
    subscriptions: set[str] = field(default_factory=set)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    presence_time: object = None
    last_ping: datetime | None = None  # the device's latest PINGREQ (IoT Core's lastHeartbeatTime)
    ping_recorded: datetime | None = None
    limits: dict[str, TokenBucket] = field(default_factory=dict)
    limit_reported: float = float("-inf")
    dwriter: asyncio.StreamWriter | None = None  # the device's connection, for the PUBACKs the front answers itself
    address: str = ""  # what the per-address limits count this session's source as
    gateway: GatewaySession | None = None  # set when the device is a gateway (iotbridge/bridge/gateway.py)
    config_subscribed: bool = False  # a SUBSCRIBE to the config topic awaits its sync (sync_payload)
    registry: Any = None  # the Registry of the device (the one its client id names)

    @property
    def closed(self) -> bool:
        return self.done.done()

    def close(self, reason: str, drop_will: bool = False) -> None:
        if not self.done.done():
            self.reason = reason
            self.drop_will = drop_will
            self.done.set_result(None)


DRAIN_TICK_S = 0.1
STOP_WAIT_S = 20.0  # how long a stopping front waits for its ended sessions to remove their presence records


async def drain(sessions: list[Session], seconds: float,
                sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
    """End ``sessions`` evenly over ``seconds``: every DRAIN_TICK_S as many as keep the pace, the last ones by the
    end. A device whose session ends reconnects through the load balancer, which no longer sends it here."""
    ticks = max(1, round(seconds / DRAIN_TICK_S))
    for tick in range(ticks):
        for s in sessions[len(sessions) * tick // ticks:len(sessions) * (tick + 1) // ticks]:
            s.close("host draining")
        if tick < ticks - 1:
            await sleep(seconds / ticks)


class Front:
    def __init__(self, settings: BridgeSettings, registry: Registry, ssl_context: ssl.SSLContext,
                 front_password: str, control_password: str | None = None):
        self.settings = settings
        self.registry = registry
        self._registries: dict[str, Registry] = {registry.registry_id: registry}
        # registry id -> (monotonic time it was read, its settings): whether MQTT/HTTP are on, re-read at most
        # every recheck_interval_s for connects and every round of the recheck for connected sessions.
        self._registry_settings: dict[str, tuple[float, RegistrySettings]] = {}
        self.ssl_context = ssl_context
        self._front_password = front_password.encode()
        self._control_password = control_password
        self.sessions: set[Session] = set()
        # device id -> how many sessions on this host hold it (its own, or a gateway's attachment): when none is
        # left, the broker's retained config of the device is cleared (see :meth:`release`).
        self._holders: Counter[str] = Counter()
        self._handlers = 0  # device connections being served (until their handler has finished its clean-up)
        self._server: asyncio.Server | None = None
        self._health: asyncio.Server | None = None
        self._control: paho.Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = {"accepted": 0, "refused": 0, "dropped": 0, "registry_lookups": 0, "config_acks": 0,
                      "address_limited": 0, "pending_limited": 0, "device_slowed": 0,
                      "violation_backoff": 0, "resends_answered": 0, "resends_held": 0, "recheck_rounds": 0}
        # Registry reads that authenticate CONNECTs run on threads of their own, so that nothing an authenticated
        # device can trigger (config acks, presence, heartbeats) delays another device's connect.
        self._auth_pool = ThreadPoolExecutor(AUTH_WORKERS, thread_name_prefix="front-auth")
        self._registry_pool = ThreadPoolExecutor(REGISTRY_WORKERS, thread_name_prefix="front-registry")
        self._pending = 0
        self._pending_by_address: dict[str, int] = {}
        self._device_limits_by_id: OrderedDict[str, dict[str, TokenBucket]] = OrderedDict()
        self._refusal_logged = ExpiringSet(REFUSAL_LOG_S, MAX_TRACKED_ADDRESSES)
        self._unknown = ExpiringSet(UNKNOWN_DEVICE_TTL_S, MAX_UNKNOWN_DEVICES)
        self._violators = ExpiringSet(VIOLATION_BACKOFF_S, MAX_UNKNOWN_DEVICES)
        self._failures = KeyedBuckets(settings.auth_failures_per_s, settings.auth_failure_burst, MAX_TRACKED_ADDRESSES)
        self._acked: dict[str, str] = {}  # device id -> sha256 of the config last acknowledged in the registry
        self._resends = resends.Resends()  # QoS 1 publishes per device, to recognise a resend (DUP) of one
        self.gateways = GatewayRelay(self)
        # The registry as this host knows it (kept current by the re-check's change feed), and the batched reads
        # and presence writes of CONNECTs.
        self.cache = regcache.RegistryCache(settings.recheck_interval_s, self._registry_pool)
        self._reads = regcache.ReadBatcher(self._auth_pool)
        self._presence = regcache.WriteBatcher(self._auth_pool, fanout.mark_connected_many)

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def on_registry(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a registry call on the front's registry threads (never on the event loop)."""
        return await self._on(self._registry_pool, fn, *args)

    def _new_registry(self, registry_id: str) -> Registry:
        """One of the deployment's registries (a device's client id names it), sharing the Firestore client."""
        return Registry(self.settings.project, registry_id, self.settings.region, client=self.registry.client,
                        deployment=self.registry.registry_id)

    async def registry_settings(self, registry: Registry, fresh: bool = False) -> RegistrySettings:
        """The settings of ``registry`` (IoT Core's ``mqttConfig``/``httpConfig`` states), read at most every
        ``recheck_interval_s`` unless ``fresh``; a registry without a settings document has both protocols on."""
        now = time.monotonic()
        known = self._registry_settings.get(registry.registry_id)
        if known is not None and not fresh and now - known[0] < self.settings.recheck_interval_s:
            return known[1]

        def read() -> RegistrySettings:
            try:
                return registry.get_settings()
            except RegistryNotFound:
                return RegistrySettings()

        settings = await self._on(self._registry_pool, read)
        self._registry_settings[registry.registry_id] = (now, settings)
        return settings

    def request_config_sync(self, device_id: str, again: bool = False) -> None:
        """Ask the bridge service to make sure the broker holds the device's latest config (retained); ``again``
        when a subscriber of the config topic has yet to receive it (see SYNC_AGAIN)."""
        if self._control is not None:
            self._control.publish(SYNC_TOPIC, sync_payload(device_id, again=again), qos=1)

    def hold(self, device_id: str) -> None:
        """A session on this host now holds the device (connected itself, or attached through a gateway)."""
        self._holders[device_id] += 1

    def release(self, device_id: str) -> None:
        """A session on this host no longer holds the device. When it was the last one, the bridge service clears
        the device's retained config here: configs go only to the host that holds a device, so the copy retained
        here would go stale while the device is elsewhere (a reconnect here gets the registry's latest by the
        config sync)."""
        left = self._holders[device_id] - 1
        if left > 0:
            self._holders[device_id] = left
            return
        self._holders.pop(device_id, None)
        if self._control is not None:
            self._control.publish(SYNC_TOPIC, (device_id + SYNC_GONE).encode(), qos=1)

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        share_tls_read_buffer()
        if self._control_password is not None:
            self._control = self._control_client(self._control_password)
        # Plain TCP first, TLS started per connection in _handle: an address that keeps failing is turned away
        # before the TLS handshake, the most expensive step of a connection for the front's one thread.
        self._server = await asyncio.start_server(self._handle, self.settings.front_host, self.settings.front_port)
        self._spawn(self._recheck_loop())
        self._spawn(self._metrics_loop())
        if self.settings.health_port:
            self._health = await asyncio.start_server(self._health_check, self.settings.front_host,
                                                      self.settings.health_port)
        s = self.settings
        log.info("front listening on %s:%d (TLS) -> broker %s", s.front_host, s.front_port,
                 s.broker_socket or f"{s.broker_host}:{s.broker_port}")

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop accepting connections (the health check fails with them), end the device sessions — spread over
        ``drain_s`` seconds, see :func:`drain` — and stop."""
        for server in (self._server, self._health):
            if server:
                server.close()
        sessions = list(self.sessions)
        if drain_s > 0 and sessions:
            log.info("draining %d device sessions over %.0f s", len(sessions), drain_s)
            await drain(sessions, drain_s)
        for s in list(self.sessions):
            s.close("front stopping")
        # The ended sessions' handlers remove their presence records (and gateways' attachments) on the registry
        # threads: they finish before those threads go, within a bound (what is left then, the liveness record of
        # the stopped host answers for: fanout.host_gone).
        deadline = time.monotonic() + STOP_WAIT_S
        while self._handlers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._handlers:
            log.warning("stopping with %d connections still ending", self._handlers)
        for t in list(self._tasks):
            t.cancel()
        for pool in (self._auth_pool, self._registry_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        if self._control:
            self._control.loop_stop()
            self._control.disconnect()

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _control_client(self, password: str) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:front:{self.settings.host_id}",
                        clean_session=True)
        c.username_pw_set("bridge", password)
        c.max_queued_messages_set(0)
        c.on_socket_open = no_delay
        c.connect_async(self.settings.broker_host, self.settings.broker_port, keepalive=30)
        c.loop_start()
        return c

    # ---------------------------------------------------------------------------------- one connection

    async def _handle(self, dreader: asyncio.StreamReader, dwriter: asyncio.StreamWriter) -> None:
        self._handlers += 1
        try:
            await self._serve(dreader, dwriter)
        finally:
            self._handlers -= 1

    async def _serve(self, dreader: asyncio.StreamReader, dwriter: asyncio.StreamWriter) -> None:
        peername = dwriter.get_extra_info("peername")
        peer = str(peername)
        address = address_key(str(peername[0])) if isinstance(peername, tuple) and peername else peer
        bwriter: asyncio.StreamWriter | None = None
        session: Session | None = None
        pending = (self._pending < self.settings.max_pending_connects
                   and self._pending_by_address.get(address, 0) < self.settings.max_pending_per_address)
        try:
            if not pending:  # bounded count (and, by CONNECT_TIMEOUT_S and MAX_CONNECT_BYTES, time and memory)
                self.stats["pending_limited"] += 1
                self._refused_quietly(address, peer, f"{self._pending} connections awaiting CONNECT "
                                      f"({self._pending_by_address.get(address, 0)} from {address})")
                return
            self._pending += 1
            self._pending_by_address[address] = self._pending_by_address.get(address, 0) + 1
            if self._failures.exhausted(address, time.monotonic()):
                self.stats["address_limited"] += 1
                self._refused_quietly(address, peer, f"too many failed connects from {address}; closed before TLS")
                return
            try:
                await dwriter.start_tls(self.ssl_context, ssl_handshake_timeout=CONNECT_TIMEOUT_S)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
                self._failures.charge(address, time.monotonic())
                self._refused(peer, f"TLS handshake failed: {type(exc).__name__}")
                return
            try:
                first, body, _ = await asyncio.wait_for(mqtt.read_packet(dreader, MAX_CONNECT_BYTES),
                                                        CONNECT_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, mqtt.ProtocolError, ConnectionError, ssl.SSLError):
                self._failures.charge(address, time.monotonic())
                self._refused(peer, "no CONNECT")
                return
            if first >> 4 != mqtt.CONNECT:
                self._refused(peer, "first packet is not CONNECT")
                return
            try:
                connect = mqtt.parse_connect(body)
            except mqtt.UnsupportedProtocol as exc:
                await self._refuse(dwriter, mqtt.MQTT_311, mqtt.REFUSE_PROTOCOL, peer, str(exc))
                return
            except mqtt.ProtocolError as exc:
                self._refused(peer, f"malformed CONNECT: {exc}")
                return
            accepted = await self._authenticate(connect, dwriter, peer, address)
            self._end_pending(address)
            pending = False
            if accepted is None:
                return
            session, breader, bwriter = accepted
            await self._relay(session, dreader, dwriter, breader, bwriter)
        finally:
            if pending:
                self._end_pending(address)
            if session is not None:
                self._forget_session(session)
                with contextlib.suppress(Exception):
                    await self.gateways.closed(session)
                if session.drop_will and bwriter is not None:
                    # DISCONNECT first: the broker then discards the will instead of publishing it.
                    with contextlib.suppress(Exception):
                        bwriter.write(MQTT_DISCONNECT)
                        await asyncio.wait_for(bwriter.drain(), 2)
                if session.presence_time is not None:
                    with contextlib.suppress(Exception):
                        registry = session.registry or self.registry
                        await self._on(self._registry_pool, fanout.mark_disconnected, registry.client,
                                       registry.registry_id, session.device_id, session.presence_time)
                # Forgotten with the session (a takeover's other session then acks its next replay once more).
                self._acked.pop(session.device_id, None)
                log.info("device %s disconnected: %s", session.device_id, session.reason or "closed")
            for w in (dwriter, bwriter):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 2)

    def _end_pending(self, address: str) -> None:
        self._pending -= 1
        left = self._pending_by_address.get(address, 1) - 1
        if left > 0:
            self._pending_by_address[address] = left
        else:
            self._pending_by_address.pop(address, None)

    def _refused_quietly(self, address: str, peer: str, reason: str) -> None:
        """A refusal that an attack repeats thousands of times a second: counted always, logged once per
        address every REFUSAL_LOG_S."""
        if self._refusal_logged.has(address, time.monotonic()):
            self.stats["refused"] += 1
            return
        self._refusal_logged.add(address, time.monotonic())
        self._refused(peer, reason + f" (further refusals of {address} for {REFUSAL_LOG_S:g}s are counted only)")

    def _refused(self, peer: str, reason: str) -> None:
        self.stats["refused"] += 1
        log.warning("refused %s: %s", peer, printable(reason))

    async def _refuse(self, w: asyncio.StreamWriter, level: int, codes: dict[int, int], peer: str,
                      reason: str) -> None:
        self._refused(peer, reason)
        with contextlib.suppress(Exception):
            w.write(mqtt.connack(level, codes[level]))
            await asyncio.wait_for(w.drain(), 2)

    async def verify_device(self, device_id: str, password: bytes | None, client_cert: bytes | None,
                            address: str, registry_id: str | None = None, protocol: str = "mqtt") -> Proof:
        """The checks every way in shares (MQTT CONNECT, HTTP bridge request, gateway attach): the address has
        failures to spare, the device exists, the JWT (or, without one, the client certificate) proves it, it
        is not blocked, and its registry has ``protocol`` (``mqtt`` or ``http``) enabled. ``Refusal`` says why
        not; a failed proof costs ``address`` a token."""
        now = time.monotonic()
        if self._failures.exhausted(address, now):
            self.stats["address_limited"] += 1
            raise Refusal(Refusal.ADDRESS_LIMITED, f"too many failed connects from {address}; retry later")

        def bad_credentials(reason: str) -> Refusal:
            self._failures.charge(address, time.monotonic())
            return Refusal(Refusal.BAD_CREDENTIALS, reason)

        if not password and not client_cert:
            raise bad_credentials("no password (anonymous)")
        registry_id = registry_id or self.registry.registry_id
        if self._unknown.has(f"{registry_id}/{device_id}", now):
            raise bad_credentials("unknown device (remembered)")
        registry = self._registries.get(registry_id) or self._new_registry(registry_id)
        # An MQTT CONNECT may come from the cache (a change not yet applied ends the session at the next round); an
        # HTTP request whose JWT the HTTP bridge does not remember reads the registry, which it refuses at once.
        device = self.cache.device(registry, device_id) if protocol == "mqtt" else None
        if device is None:
            try:
                self.stats["registry_lookups"] += 1
                read_at = datetime.now(UTC)
                device = await self._reads.get(registry, device_id)
            except Exception as exc:  # noqa: BLE001 - registry unreachable: refuse, the device retries
                raise Refusal(Refusal.UNAVAILABLE, f"registry error {type(exc).__name__}") from None
            if device is None:
                self._unknown.add(f"{registry_id}/{device_id}", time.monotonic())
                raise bad_credentials("unknown device")
            # Kept only once it served a device: client ids naming made-up registries add nothing here.
            registry = self._registries.setdefault(registry_id, registry)
            self.cache.learned(registry, device, read_at)
        at = datetime.now(UTC)
        try:
            if password or client_cert is None:
                token = verify_jwt(password or b"", device.credentials, audience=self.settings.project, now=at)
                proof = Proof(device, token.algorithm, token.expires_at, token.credential, at, registry)
            else:
                expires_at, credential = verify_client_certificate(client_cert, device.credentials, now=at)
                proof = Proof(device, "mTLS", expires_at, credential, at, registry)
        except (AuthError, ValueError) as exc:
            raise bad_credentials(str(exc)) from None
        if device.blocked:
            raise Refusal(Refusal.BLOCKED, "device is blocked")
        try:
            settings = await self.registry_settings(registry)
        except Exception as exc:  # noqa: BLE001 - registry unreachable: refuse, the device retries
            raise Refusal(Refusal.UNAVAILABLE, f"registry error {type(exc).__name__}") from None
        if not (settings.http_enabled if protocol == "http" else settings.mqtt_enabled):
            raise Refusal(Refusal.DISABLED, f"{protocol.upper()} is disabled for registry {registry_id}")
        credential = proof.credential
        if (settings.ca_certificates and credential.format.endswith("_X509_PEM")
                and not signed_by_one_of(credential.public_key_pem, settings.ca_certificates)):
            # The registry's CA certificates changed since the credential was added: it no longer verifies.
            raise bad_credentials("certificate not signed by any of the registry's CA certificates")
        return proof

    async def _authenticate(self, c: mqtt.Connect, dwriter: asyncio.StreamWriter, peer: str, address: str,
                            ) -> tuple[Session, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Unknown device, wrong key, expired credential, bad token: all answered "bad user name or password",
        so that device ids cannot be enumerated. Only a device that proved its identity learns that it is blocked
        ("not authorized"). Returns the session and its broker connection, or None when refused."""
        level = c.level
        s = self.settings
        try:
            registry_id, device_id = parse_device_path(c.client_id, s.project, s.region)
        except ClientIdError as exc:
            await self._refuse(dwriter, level, mqtt.REFUSE_CLIENT_ID, peer, str(exc))
            return None
        who = f"{peer} as {device_id}"
        now = time.monotonic()
        if self._violators.has(device_id, now):
            self.stats["violation_backoff"] += 1
            await self._refuse(dwriter, level, mqtt.REFUSE_UNAVAILABLE, who,
                               f"disconnected for a protocol violation less than {VIOLATION_BACKOFF_S:g}s ago")
            return None
        ssl_object = dwriter.get_extra_info("ssl_object")
        client_cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            proof = await self.verify_device(device_id, c.password, client_cert, address, registry_id)
        except Refusal as exc:
            codes = {Refusal.BAD_CREDENTIALS: mqtt.REFUSE_BAD_PASSWORD, Refusal.BLOCKED: mqtt.REFUSE_NOT_AUTHORIZED,
                     Refusal.DISABLED: mqtt.REFUSE_NOT_AUTHORIZED, Refusal.ADDRESS_LIMITED: mqtt.REFUSE_UNAVAILABLE,
                     Refusal.UNAVAILABLE: mqtt.REFUSE_UNAVAILABLE}[exc.kind]
            await self._refuse(dwriter, level, codes, who, exc.reason)
            return None
        device, method, proof_expires, credential = proof.device, proof.method, proof.expires_at, proof.credential
        at = proof.at
        if c.will_topic is not None:
            kind = topic_kind(c.will_topic, device_id)
            limit = STATE_MAX_BYTES if kind == "state" else EVENTS_MAX_BYTES
            if kind is None or c.will_qos > 1 or len(c.will_payload) > limit:
                await self._refuse(dwriter, level, mqtt.REFUSE_NOT_AUTHORIZED, who, "will message not allowed")
                return None
        try:
            breader, bwriter = await self.open_broker()
        except OSError as exc:
            await self._refuse(dwriter, level, mqtt.REFUSE_UNAVAILABLE, who, f"broker unreachable: {exc}")
            return None
        gateway = device.gateway_config.is_gateway and self._control_password is not None
        # A gateway's loopback session reads the config and commands of the devices it attaches: user bridge, whose
        # ACL allows them; the front filters what reaches the gateway (iotbridge/bridge/gateway.py).
        user, password = ("bridge", (self._control_password or "").encode()) if gateway else (
            "front", self._front_password)
        bwriter.write(mqtt.encode_connect(mqtt.rewrite_connect(c, device_id, user, password)))
        expires_at = session_deadline(at, proof_expires, credential.expiration_time)
        session = Session(device_id=device_id, level=level, expires_at=expires_at, peer=peer, num_id=device.num_id,
                          credential_pem=credential.public_key_pem, limits=self._device_limits(device_id),
                          address=address, registry=proof.registry)
        if gateway:
            session.gateway = GatewaySession(device_id, device.gateway_config.gateway_auth_method
                                             or "ASSOCIATION_ONLY", dwriter, bwriter)
        self.sessions.add(session)
        self.hold(device_id)
        try:
            session.presence_time = await self._presence.write(
                proof.registry.client, (proof.registry.registry_id, device_id, s.host_id, session.id, expires_at))
        except Exception as exc:  # noqa: BLE001 - presence only serves command senders; the device may still connect
            log.warning("presence of %s not recorded: %s", device_id, exc)
        except BaseException:  # cancelled (the host stopping): the caller never gets the session to end it
            self._forget_session(session)
            raise
        self.stats["accepted"] += 1
        self.request_config_sync(device_id)
        log.info("device %s connected from %s (%s, MQTT level %d, until %s)", device_id, peer, method, level,
                 expires_at.isoformat())
        return session, breader, bwriter

    def _forget_session(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.release(session.device_id)

    async def _relay(self, session: Session, dreader: asyncio.StreamReader, dwriter: asyncio.StreamWriter,
                     breader: asyncio.StreamReader, bwriter: asyncio.StreamWriter) -> None:
        session.dwriter = dwriter
        # Two tasks a session, one a direction; each closes the session when it ends, and so do the expiry timer
        # and the registry re-check. This task waits for the close. (A task, its coroutine and futures are most of
        # what a Python object costs a connection: the expiry was a sleeping task and the close an Event awaited
        # by another, 5 tasks a session in all where 3 do.)
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(max(0.0, session.expires_at.timestamp() - time.time()), session.close,
                                 "session expired (token, certificate or credential expiry, or 24 h)", True)
        tasks = (loop.create_task(self._device_to_broker(session, dreader, bwriter)),
                 loop.create_task(self._broker_to_device(session, breader, dwriter)))
        try:
            await session.done
        finally:
            expiry.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if session.reason.startswith(("refused:", "session expired", "device ", "credential ")):
            self.stats["dropped"] += 1

    async def _device_to_broker(self, session: Session, dreader: asyncio.StreamReader,
                                bwriter: asyncio.StreamWriter) -> None:
        # Framed on whole socket reads, one write per read: relaying packet by packet (three reads, a parse and a
        # send() each) was the front's CPU in the profile (bench/). Every packet is still checked on its own.
        framer = mqtt.Framer(MAX_DEVICE_PACKET)
        try:
            while True:
                data = await dreader.read(RELAY_READ)
                if not data:
                    session.close("device closed the connection")
                    return
                out: list[bytes] = []
                try:
                    for first, body, raw in framer.feed(data):
                        relayed = None
                        if session.gateway is not None and first >> 4 == mqtt.PUBLISH:
                            relayed = await self.gateways.publish(session, first, body, raw)
                        checked, wait = relayed if relayed is not None else self._checked(session, first, body, raw)
                        if wait > 0:
                            # Over a rate limit: what passed goes now, this packet when the limit allows it, and
                            # the device's socket is not read meanwhile.
                            if out:
                                passed, out = b"".join(out), []
                                await _forward(bwriter, passed)
                            self._slowed(session, wait)
                            await asyncio.sleep(wait)
                        out.append(checked)
                        if first >> 4 == mqtt.DISCONNECT:
                            session.close("device disconnected")
                            return
                finally:
                    # The packets before an offending one passed their checks, as they would have in an earlier
                    # read; the offending packet and everything after it are never forwarded.
                    if out:
                        await _forward(bwriter, b"".join(out))
                    if session.config_subscribed and self._control is not None:
                        session.config_subscribed = False
                        self._control.publish(SYNC_TOPIC, sync_payload(session.device_id, subscribed=True), qos=1)
        except Dropped as exc:
            log.warning("device %s refused: %s", session.device_id, printable(str(exc)))
            session.close(f"refused: {printable(str(exc))}")
            self._violators.add(session.device_id, time.monotonic())
        except mqtt.ProtocolError as exc:
            session.close(f"refused: protocol error: {printable(str(exc))}")
            self._violators.add(session.device_id, time.monotonic())
        except (ConnectionError, ssl.SSLError):
            session.close("device closed the connection")
        finally:
            session.close("relay from the device stopped")  # whatever ended it (a no-op when closed above)

    def device_limits(self, device_id: str) -> dict[str, TokenBucket]:
        """The per-device buckets every protocol charges (MQTT sessions, HTTP requests)."""
        return self._device_limits(device_id)

    def _device_limits(self, device_id: str) -> dict[str, TokenBucket]:
        """The device's buckets: kept per device id (at most MAX_TRACKED_DEVICES, least recently connected
        forgotten first), so a reconnect does not bring a fresh burst."""
        known = self._device_limits_by_id.get(device_id)
        if known is not None:
            self._device_limits_by_id.move_to_end(device_id)
            return known
        s, now = self.settings, time.monotonic()
        buckets = {"messages": TokenBucket(s.device_messages_per_s, s.device_messages_per_s, now),
                   "state": TokenBucket(s.device_state_per_s, 1, now),
                   "bytes": TokenBucket(s.device_bytes_per_s, s.device_bytes_per_s, now),
                   "subscribe": TokenBucket(SUBSCRIBES_PER_S, SUBSCRIBE_BURST, now)}
        self._device_limits_by_id[device_id] = buckets
        while len(self._device_limits_by_id) > MAX_TRACKED_DEVICES:
            self._device_limits_by_id.popitem(last=False)
        return buckets

    def _slowed(self, session: Session, wait: float) -> None:
        self.stats["device_slowed"] += 1
        now = time.monotonic()
        if now - session.limit_reported < LIMIT_REPORT_S:
            return
        session.limit_reported = now
        s = self.settings
        message = (f"rate limit: over {s.device_messages_per_s:g} messages/s, {s.device_bytes_per_s / 1024:g} KiB/s "
                   f"or {s.device_state_per_s:g} state updates/s; slowed by {wait:.2f}s")
        log.warning("device %s slowed: %s", session.device_id, message)
        self._spawn(self._record_error(session.device_id, message, session.registry))

    async def record_error(self, device_id: str, message: str) -> None:
        """Note a refusal or limit in the registry (IoT Core's ``lastErrorStatus``), best effort."""
        await self._record_error(device_id, message)

    async def _record_error(self, device_id: str, message: str, registry: Registry | None = None) -> None:
        try:
            await self._on(self._registry_pool, (registry or self.registry).record_error, device_id, message)
        except Exception as exc:  # noqa: BLE001 - the limit holds either way; only the registry's note is missing
            log.warning("could not record the error of %s: %s", device_id, exc)

    def _checked(self, session: Session, first: int, body: bytes, raw: bytes) -> tuple[bytes, float]:
        """The bytes to forward for one device→broker packet, and how long to wait before reading on (its rate
        limits); ``Dropped`` when the device may not send it."""
        dev = session.device_id
        kind = first >> 4
        now = time.monotonic()
        # Every packet counts, PINGREQ and PUBACK included: a cheap packet still costs the front a parse and a relay.
        wait = max(session.limits["bytes"].take(len(raw), now), session.limits["messages"].take(1, now))
        if kind == mqtt.PUBLISH:
            p = mqtt.parse_publish(first, body, session.level)
            if p.qos > 1:
                raise Dropped(f"QoS {p.qos} publish")
            if p.topic_alias is not None:
                raise Dropped("topic aliases are not supported")
            tk = topic_kind(p.topic, dev)
            if tk is None:
                raise Dropped(f"publish to {p.topic!r} not allowed")
            if tk == "events" and (violation := limits.event_topic_violation(p.topic, dev)) is not None:
                # Pub/Sub would refuse the message whole (its subFolder attribute): it can never be forwarded.
                raise Dropped(f"{violation[0]}: {violation[1]}")
            limit = STATE_MAX_BYTES if tk == "state" else EVENTS_MAX_BYTES
            if p.payload_len > limit:
                raise Dropped(f"{tk} payload of {p.payload_len} bytes exceeds {limit}")
            if tk == "state":
                wait = max(wait, session.limits["state"].take(1, now))
            if p.retain:
                # A retained event or state would be replayed to the bridge on every resubscribe and
                # forwarded again; IoT Core never kept device messages either.
                raw = bytes([raw[0] & ~0x01]) + raw[1:]
            if p.packet_id is not None:  # QoS 1: a resend (DUP) of a publish the broker holds is not forwarded again
                verdict = self._resends.publish(dev, session.id, p.packet_id, bool(first & 0x08), resends.digest(
                    p.topic, memoryview(body)[p.payload_offset:]))
                if verdict != "forward":
                    self.stats[f"resends_{verdict}"] += 1
                    if verdict == "answered" and session.dwriter is not None:
                        session.dwriter.write(resends.puback(p.packet_id))
                    return b"", wait
        elif kind == mqtt.SUBSCRIBE:
            sub = mqtt.parse_subscribe(body, session.level)
            # Mosquitto answers every filter of a SUBSCRIBE with the retained config, copies included: the count
            # of filters and of distinct subscriptions is bounded, and a copy is a protocol violation.
            names = [f for f, _, _ in sub.filters]
            if len(names) > MAX_FILTERS_PER_SUBSCRIBE:
                raise Dropped(f"SUBSCRIBE with {len(names)} filters; at most {MAX_FILTERS_PER_SUBSCRIBE}")
            if len(set(names)) != len(names):
                raise Dropped("SUBSCRIBE names the same filter more than once")
            head = len(raw) - len(body)
            patched = bytearray(raw)
            for f, opts, off in sub.filters:
                if not subscription_allowed(f, dev) and not self.gateways.may_subscribe(session, f):
                    raise Dropped(f"subscribe to {f!r} not allowed")
                if opts & 0x03 == 2:
                    patched[head + off] = (opts & ~0x03) | 0x01
            held = session.subscriptions | set(names)
            most = MAX_SUBSCRIPTIONS if session.gateway is None else GATEWAY_MAX_SUBSCRIPTIONS
            if len(held) > most:
                raise Dropped(f"more than {most} distinct subscriptions")
            session.subscriptions = held
            if spec.device_topic(dev, spec.CONFIG) in names:
                session.config_subscribed = True
            wait = max(wait, session.limits["subscribe"].take(1, now))
            raw = bytes(patched)
        elif kind == mqtt.PUBACK:
            pid = mqtt.packet_id_of_ack(body)
            inflight = session.config_inflight.pop(pid, None)
            # One registry ack per config version: the retained replay of a config already acknowledged (Mosquitto
            # sends one on every re-subscribe) costs nothing more. A config delivered live is a new version, even
            # with the same bytes, and is acknowledged.
            if inflight is not None:
                digest, replay = inflight
                if digest in session.acks_running:
                    # The running ack may have read the versions before this one was stored: it looks again after
                    # (a replay is of a version already stored, so the running ack covers it).
                    session.acks_running[digest] = session.acks_running[digest] or not replay
                elif not (replay and self._acked.get(dev) == digest):
                    session.acks_running[digest] = False
                    self._spawn(self._ack_config(session, digest))
        elif kind == mqtt.PINGREQ:
            session.last_ping = datetime.now(UTC)
        elif kind == mqtt.CONNECT:
            raise Dropped("second CONNECT")
        elif kind in (mqtt.PUBREC, mqtt.PUBREL, mqtt.PUBCOMP):
            raise Dropped("QoS 2 flow")
        return raw, wait

    async def _broker_to_device(self, session: Session, breader: asyncio.StreamReader,
                                dwriter: asyncio.StreamWriter) -> None:
        # Same framing as the other direction: several packets per TLS record and send().
        config_topic = spec.device_topic(session.device_id, spec.CONFIG)
        framer = mqtt.Framer(MAX_BROKER_PACKET)
        try:
            while True:
                data = await breader.read(RELAY_READ)
                if not data:
                    break
                out: list[bytes] = []
                for first, body, raw in framer.feed(data):
                    if session.gateway is not None and first >> 4 == mqtt.PUBLISH and not self.gateways.delivers(
                            session, mqtt.parse_publish(first, body, session.level).topic):
                        self.gateways.drop_delivery(session, first, body)
                        continue
                    if first >> 4 == mqtt.PUBACK:
                        self._resends.acknowledged(session.device_id, mqtt.packet_id_of_ack(body))
                    elif first >> 4 == mqtt.PUBLISH and (first >> 1) & 0x03 == 1:
                        p = mqtt.parse_publish(first, body, session.level)
                        if p.topic == config_topic and p.packet_id is not None:
                            session.config_inflight[p.packet_id] = (
                                hashlib.sha256(body[p.payload_offset:]).hexdigest(), p.retain)
                    out.append(raw)
                if out:
                    await _forward(dwriter, b"".join(out))
        except (ConnectionError, mqtt.ProtocolError, ssl.SSLError):
            pass
        finally:
            session.close("broker closed the connection")

    async def _ack_config(self, session: Session, digest: str) -> None:
        device_id = session.device_id
        registry = session.registry or self.registry

        def ack() -> None:
            for cfg in registry.list_config_versions(device_id):
                if hashlib.sha256(cfg.data).hexdigest() == digest:
                    registry.ack_config(device_id, cfg.version, datetime.now(UTC))
                    log.info("device %s acknowledged config v%d", device_id, cfg.version)
                    return
            log.warning("device %s acked a config that matches no stored version", device_id)

        try:
            while True:
                try:
                    self.stats["config_acks"] += 1
                    await self._on(self._registry_pool, ack)
                    if session in self.sessions:  # not for a device that has gone meanwhile: nothing would remove it
                        self._acked[device_id] = digest
                except Exception as exc:  # noqa: BLE001 - the device keeps working; only the ack time is missing
                    log.warning("could not record config ack of %s: %s", device_id, exc)
                if not session.acks_running.get(digest):
                    return
                session.acks_running[digest] = False  # a new version with these bytes was acked meanwhile
        finally:
            session.acks_running.pop(digest, None)

    async def open_broker(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A device session's connection to Mosquitto: its Unix socket when the settings name one (no ephemeral
        port per device), else its loopback TCP listener."""
        if self.settings.broker_socket:
            return await open_unix_stream(self.settings.broker_socket)
        return await asyncio.open_connection(self.settings.broker_host, self.settings.broker_port)

    # ---------------------------------------------------------------------------------- health

    async def healthy(self) -> tuple[bool, str]:
        """Mosquitto accepts connections and the bridge service reported within the last 10 s."""
        try:
            _, w = await asyncio.wait_for(self.open_broker(), 2)
            w.close()
        except (OSError, TimeoutError):
            return False, "broker unreachable"
        if self.settings.workdir:
            stats = Path(self.settings.workdir) / "service-stats.json"
            try:
                age = time.time() - stats.stat().st_mtime
            except OSError:
                return False, "bridge service has not reported"
            if age > 10:
                return False, f"bridge service silent for {age:.0f}s"
        return True, "ok"

    async def _health_check(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from iotbridge.bridge import metrics

        await metrics.answer_health(reader, writer, self.healthy, self.counters)

    # ---------------------------------------------------------------------------------- metrics

    def connected_devices(self) -> int:
        return len({s.device_id for s in self.sessions})

    def counters(self) -> dict[str, int]:
        return {**self.stats, **self.cache.stats, "read_batches": self._reads.batches,
                "presence_commits": self._presence.commits, "connected": self.connected_devices(),
                "pending": self._pending,
                "unknown_remembered": len(self._unknown), "addresses_tracked": len(self._failures)}

    async def _metrics_loop(self) -> None:
        """The connected-devices gauge, once a minute (Cloud Monitoring in the cloud, the log locally)."""
        from iotbridge.bridge import metrics

        s = self.settings
        await metrics.connected_devices_loop(s.project, s.registry_id, s.host_id, s.connected_devices_metric,
                                             self.connected_devices, log)

    # ---------------------------------------------------------------------------------- registry watch

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.recheck_interval_s)
            try:
                await self.recheck()
            except Exception:  # revocation and heartbeats must go on: log and try again next round
                log.exception("registry recheck failed")
            self.stats["recheck_rounds"] += 1

    async def recheck(self) -> None:
        """End the sessions their device no longer allows (blocked, deleted or created again, credential removed,
        rotated or expired), from grants kept current by the registry's change feed (only the devices changed
        since the previous round are read); record heartbeats (at most every ``HEARTBEAT_RECORD_S`` a device)."""
        by_device: dict[str, list[Session]] = {}
        registries: dict[str, Registry] = {}
        gateways = [s for s in list(self.sessions) if s.gateway is not None]
        for s in list(self.sessions):
            by_device.setdefault(s.device_id, []).append(s)
            registries[s.device_id] = s.registry or self.registry
        # A gateway attaches devices of its own registry.
        attached = {d: registries[s.device_id] for s in gateways for d in self.gateways.attached_ids(s)}
        await self._record_heartbeats(registries)
        # Every registry this host serves gets its round, so that the cache of reconnecting devices stays fresh.
        wanted = {**{d: registry for d, registry in attached.items() if d not in by_device},
                  **{d: registries[d] for d in by_device}}
        served = {r.registry_id: r for r in self._registries.values()}
        grants: dict[str, Grant] = {}
        failed: set[str] = set()
        for registry_id, registry in served.items():
            ids = [d for d, r in wanted.items() if r.registry_id == registry_id]
            try:
                grants.update(await self.cache.refresh(registry, ids))
            except Exception as exc:  # noqa: BLE001 - registry briefly unreachable: keep the sessions, try next round
                log.warning("registry recheck of %d devices of %s failed: %s", len(ids), registry_id, exc)
                failed.add(registry_id)
        if not by_device:
            return
        # A registry whose MQTT was disabled since its devices connected ends their sessions.
        disabled: set[str] = set()
        for registry in {id(r): r for r in registries.values()}.values():
            try:
                if not (await self.registry_settings(registry, fresh=True)).mqtt_enabled:
                    disabled.add(registry.registry_id)
            except Exception as exc:  # noqa: BLE001 - registry briefly unreachable: try next round
                log.warning("settings of registry %s not read: %s", registry.registry_id, exc)
        now = datetime.now(UTC)
        for device_id, sessions in by_device.items():
            if registries[device_id].registry_id in failed:
                continue
            for s in sessions:
                reason = revoked_reason(s.num_id, s.credential_pem, grants.get(device_id), now)
                if not reason and registries[device_id].registry_id in disabled:
                    reason = "MQTT disabled for the registry"
                if reason:
                    log.warning("dropping %s: %s", device_id, reason)
                    s.close(reason, drop_will=True)
        for s in gateways:
            if (s.registry or self.registry).registry_id not in failed:
                await self.gateways.recheck(s, grants, now, checked=wanted)

    async def _record_heartbeats(self, registries: dict[str, Registry]) -> None:
        """Each device's latest PINGREQ as ``last_heartbeat_time``, in batched writes, at most every
        ``HEARTBEAT_RECORD_S`` a device (IoT Core's was "periodically collected ... stale by a few minutes")."""
        every = timedelta(seconds=regcache.HEARTBEAT_RECORD_S)
        pings = [(s, s.last_ping) for s in list(self.sessions) if s.last_ping is not None
                 and (s.ping_recorded is None or s.last_ping - s.ping_recorded >= every)]
        if not pings:
            return
        try:
            for registry, times in _per_registry({s.device_id: ping for s, ping in pings}, registries).items():
                await self._on(self._registry_pool, registry.record_heartbeats, times)
            for s, ping in pings:
                s.ping_recorded = ping
        except Exception as exc:  # noqa: BLE001 - best effort, like IoT Core's heartbeat time
            log.debug("heartbeats of %d devices not recorded: %s", len(pings), exc)

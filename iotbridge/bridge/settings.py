"""Settings of one broker host: the TLS front, the loopback Mosquitto and the bridge service.

One JSON file describes a host (``BridgeSettings.load``); secrets live in a separate 0600 JSON file
(``secrets_file``) so that the settings can be logged and shown. In the cloud the startup script writes both,
the secrets taken from Secret Manager.

Identities on Mosquitto's local listeners (loopback TCP, and the Unix socket ``broker_socket`` when set; one set
of users and ACL for both, ``per_listener_settings false``):

- ``front``   — every device session relayed by the front. Its client id is the authenticated device id, and
  the ACL's ``pattern`` lines on ``%c`` confine it to that device's topics. Nothing else is granted to it. Not in
  the password file with ``device_auth`` "mosquitto" (no front runs).
- ``bridge``  — the bridge service and the front's control connection: reads device traffic, writes configs
  and commands. Also the HTTP bridge (publishes an authenticated HTTP device's events and state) and a
  gateway's session (client id = the gateway's id; reads the config and commands of the devices it attaches,
  and the front lets through only those of its attached devices).
- ``backend`` — a backend publisher (e.g. the config-push function or an operator tool on the host): writes
  ``/devices/+/config`` and ``/devices/+/commands/#`` only, under one client id, ``iotbridge:backend:{host}``.

The ACL's ``pattern`` lines apply to every user, and Mosquitto lets any user pick any client id: a ``backend``
connecting as a device's client id would disconnect the device and, through the patterns, publish as it; as the
bridge's client id it would take the bridge's persistent session and its queued telemetry. So ``backend`` is not
in the ``password_file``: Mosquitto's dynamic security plugin authenticates it and refuses any client id but its
own (``backend_client_id``), and its topics stay in the ACL file (the plugin grants it nothing). ``front`` and
``bridge`` are the host's own processes, whose passwords sit in the same 0600 file; the plugin binds at most one
client id per user, which neither fits (every device id; the service and the front's control connection).

Backend client ids carry a ``:``, which no device id may contain, so no device can take over their sessions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from iotbridge import spec

EVENTS_MAX_BYTES = 256 * 1024
# Per client, QoS 1 messages the broker holds beyond those in flight. What matters is the bridge service's persistent
# session during a Pub/Sub outage (it acks nothing, so everything devices send waits here): a million messages
# cover 16 minutes at 1,000 msg/s per host, 2.8 hours at 100 msg/s; 1 GiB of payload caps the broker's memory
# (plus ~250 bytes of bookkeeping per message) on an 8 GB e2-standard-2. Past either bound Mosquitto drops
# messages it already acknowledged to the device: the bridge service reports the fill level and every drop.
MAX_QUEUED_MESSAGES = spec.BROKER_MAX_QUEUED_MESSAGES
MAX_QUEUED_BYTES = 1024 * 1024 * 1024
# Mosquitto's window of unacknowledged QoS 1 messages per client (bench/broker.py gives the raw broker the same).
MAX_INFLIGHT_MESSAGES = 1000
# The broker's $SYS/broker/log/N line for a client whose queue is full (Mosquitto 2.0 src/database.c).
DROPPING_NOTICE = "Outgoing messages are being dropped for client "
STATE_MAX_BYTES = 64 * 1024
MAX_ROUTES = 10
HOST_ALIVE_S = 90.0  # a host's liveness record runs this far ahead; it renews it every third of it
MAX_UNIX_SOCKET_PATH = 107  # Linux's sockaddr_un.sun_path holds 108 bytes, the last a NUL
BACKEND_USERS = ("front", "bridge", "backend")
PASSWORD_FILE_USERS = ("front", "bridge")  # backend: the dynamic security plugin, bound to one client id
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib")


@dataclass(frozen=True)
class Route:
    sub_folder: str
    topic: str  # a full Pub/Sub topic id within the project (e.g. "iot-dev-device-logs")


@dataclass(frozen=True)
class BridgeSettings:
    project: str
    region: str
    registry_id: str
    prefix: str  # topic names: iotbridge.spec.topic_name(prefix, key)
    host_id: str = "local"  # names this host's subscription to the device-commands fan-out
    # The host registrar's URL (iotbridge.bridge.registrar): set, the host has its subscription made and deleted
    # there, proving which VM it is with its instance identity token; empty, it makes and deletes it itself (the
    # local stack, and hosts whose account holds the project role for it).
    registrar_url: str = ""
    front_host: str = "127.0.0.1"
    front_port: int = 8883
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    # A Unix domain socket Mosquitto also listens on (same users, ACL and limits as the TCP listener); the front's
    # device sessions use it when set. A loopback TCP connection per device costs an ephemeral port (55,536 at
    # most per host) and a TCP socket pair in the kernel; a Unix socket costs neither. Empty: loopback TCP.
    broker_socket: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    secrets_file: str = ""
    client_ca: str = ""  # PEM file of the CA(s) issuing device client certificates; empty: mTLS off
    routes: tuple[Route, ...] = ()
    recheck_interval_s: float = 5.0  # how often connected devices are re-read (blocked/deleted → dropped)
    # On SIGTERM (a host being removed or replaced), the front stops accepting connections and ends its device
    # sessions spread evenly over this many seconds, so its devices reconnect to the other hosts a few at a time
    # instead of all at once; 0 ends them at once.
    drain_s: float = 0.0
    # Refused CONNECTs one source address may make (a burst, then this many a second) before it is answered
    # "server unavailable" without a registry read. Raise both for fleets behind one NAT address.
    auth_failures_per_s: float = 2.0
    auth_failure_burst: int = 20
    # TLS connections that have not yet sent their CONNECT (each for at most 10 s); more are closed at once.
    max_pending_connects: int = 1000
    max_pending_per_address: int = 20  # of those, from one address (an IPv6 /64): one address cannot fill them all
    # Per device connection, IoT Core's limits: messages a second (after a burst of as many), bytes a second, state
    # updates a second. A device over a limit is slowed, not refused.
    device_messages_per_s: float = 100.0
    device_bytes_per_s: float = 512 * 1024
    device_state_per_s: float = 1.0
    workdir: str = ""  # the service writes service-stats.json here; the front's /healthz reads it
    # The HTTP device bridge (iotbridge/bridge/http_bridge.py), TLS on front_host with the front's certificate;
    # 0 = off.
    http_port: int = 0
    health_port: int = 0  # HTTP /healthz on front_host for load balancer and auto-healing checks; 0 = off
    # How far ahead this host's liveness record runs (renewed every third of it); `iotctl hosts sweep` deletes the
    # subscription of a host whose record ran out. Tests shorten it to see a killed host swept within seconds.
    host_alive_s: float = HOST_ALIVE_S
    firestore_database: str = "(default)"
    # "cloud": the front writes the connected-devices gauge to Cloud Monitoring (iotbridge/bridge/metrics.py);
    # "log": it only logs the count (local).
    connected_devices_metric: str = "log"
    # "module:callable" returning the bridge service's Pub/Sub PublisherClient. Empty (production): the client
    # library's own. Tests name a stand-in that refuses what real Pub/Sub refuses (the emulator checks no limits).
    publisher_factory: str = ""
    # Mosquitto's max_queued_messages / max_queued_bytes (see MAX_QUEUED_MESSAGES); tests make them small.
    max_queued_messages: int = MAX_QUEUED_MESSAGES
    max_queued_bytes: int = MAX_QUEUED_BYTES
    device_auth: str = "front"
    auth_socket: str = ""

    def __post_init__(self) -> None:
        _check_device_auth(self)
        if self.connected_devices_metric not in ("cloud", "log"):
            raise ValueError(f"connected_devices_metric must be cloud or log, got {self.connected_devices_metric!r}")
        if self.max_queued_messages < 1 or self.max_queued_bytes < 1:
            raise ValueError("max_queued_messages and max_queued_bytes must be positive: 0 means unbounded")
        if len(os.fsencode(self.broker_socket)) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(f"broker_socket must be at most {MAX_UNIX_SOCKET_PATH} bytes (a Unix socket address), "
                             f"got {len(os.fsencode(self.broker_socket))}: {self.broker_socket}")
        if len(self.routes) > MAX_ROUTES:
            raise ValueError(f"at most {MAX_ROUTES} subfolder routes, got {len(self.routes)}")
        for name in ("auth_failures_per_s", "auth_failure_burst", "max_pending_connects", "max_pending_per_address",
                     "device_messages_per_s",
                     "device_bytes_per_s", "device_state_per_s", "host_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> BridgeSettings:
        raw = json.loads(Path(path).read_text())
        raw["routes"] = tuple(Route(**r) for r in raw.get("routes", ()))
        if raw.pop("fanout_subscriptions", None):
            raise ValueError(f"{path}: fanout_subscriptions is retired: the service creates its own delivery "
                             "subscription, {prefix}-device-commands-{host_id}; remove the key")
        return cls(**raw)

    def secrets(self) -> dict[str, str]:
        return load_secrets(Path(self.secrets_file))


# Who authenticates devices (``BridgeSettings.device_auth``):
# - "front": the TLS front (iotbridge/bridge/front.py) terminates TLS on front_port, authenticates each device and
#   relays its session to the loopback Mosquitto as user ``front``. Every feature (gateways, the HTTP bridge,
#   client certificates, heartbeat records, config acks, per-device rate slowing).
# - "mosquitto": Mosquitto itself terminates TLS on front_port, and the plugin ``iotbridge_auth.so`` admits a device
#   on the answer of the auth daemon (``python -m iotbridge.bridge authd``) over the Unix socket ``auth_socket``.
#   No front process; a fraction of the front's CPU and memory per connection (docs/broker-scaling.md, "Devices
#   authenticated by Mosquitto"), without the features the front alone has.
DEVICE_AUTH_MODES = spec.DEVICE_AUTH_MODES
# Settings of features only the front has: refused (one line naming the setting) in "mosquitto" mode.
FRONT_ONLY_SETTINGS = {
    "http_port": "the HTTP bridge runs in the front",
    "client_ca": "device client certificates are checked by the front",
}


def _check_device_auth(settings: BridgeSettings) -> None:
    if settings.device_auth not in DEVICE_AUTH_MODES:
        raise ValueError(f"device_auth must be one of {', '.join(DEVICE_AUTH_MODES)}, got {settings.device_auth!r}")
    if settings.device_auth == "front":
        return
    for name, why in FRONT_ONLY_SETTINGS.items():
        if getattr(settings, name):
            raise ValueError(f"{name} must be unset with device_auth mosquitto ({why}, which this mode does not "
                             f"run), got {getattr(settings, name)!r}")
    if not settings.auth_socket:
        raise ValueError("auth_socket is required with device_auth mosquitto: the Unix socket where the auth daemon "
                         "answers Mosquitto's plugin")
    if len(os.fsencode(settings.auth_socket)) > MAX_UNIX_SOCKET_PATH:
        raise ValueError(f"auth_socket must be at most {MAX_UNIX_SOCKET_PATH} bytes (a Unix socket address), "
                         f"got {len(os.fsencode(settings.auth_socket))}: {settings.auth_socket}")


def new_secrets() -> dict[str, str]:
    return {user: secrets.token_urlsafe(24) for user in BACKEND_USERS}


def write_secrets(path: Path, values: dict[str, str]) -> None:
    _write_private(path, json.dumps(values))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_secrets(path: Path) -> dict[str, str]:
    values = json.loads(path.read_text())
    missing = [u for u in BACKEND_USERS if u not in values]
    if missing:
        raise ValueError(f"{path}: missing passwords for {missing}")
    return values


PBKDF2_ITERATIONS = 101


def _pbkdf2(password: str, salt: bytes) -> tuple[str, str]:
    """(base64 salt, base64 PBKDF2-SHA512 digest) as Mosquitto 2.0 stores them."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return base64.b64encode(salt).decode(), base64.b64encode(digest).decode()


def mosquitto_password_line(user: str, password: str, salt: bytes | None = None) -> str:
    """A ``password_file`` line in Mosquitto 2.0's PBKDF2-SHA512 format (what ``mosquitto_passwd`` writes)."""
    b64_salt, b64_digest = _pbkdf2(password, salt or secrets.token_bytes(12))
    return f"{user}:$7${PBKDF2_ITERATIONS}${b64_salt}${b64_digest}"


def backend_client_id(settings: BridgeSettings) -> str:
    """The one client id the ``backend`` user may connect with."""
    return f"iotbridge:backend:{settings.host_id}"


def dynamic_security_config(settings: BridgeSettings, password: str, salt: bytes | None = None) -> dict[str, object]:
    """The dynamic security plugin's file: ``backend`` with its password and its one client id, no roles (its
    topics are the ACL file's), and nothing allowed by default."""
    b64_salt, b64_digest = _pbkdf2(password, salt or secrets.token_bytes(12))
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                             "unsubscribe": True},
        "clients": [{"username": "backend", "textname": "backend publisher (configs and commands)",
                     "clientid": backend_client_id(settings), "password": b64_digest, "salt": b64_salt,
                     "iterations": PBKDF2_ITERATIONS, "roles": []}],
        "groups": [],
        "roles": [],
    }


def dynsec_plugin_path() -> str:
    for d in DYNSEC_PLUGIN_DIRS:
        path = Path(d) / DYNSEC_PLUGIN
        if path.exists():
            return str(path)
    raise FileNotFoundError(f"{DYNSEC_PLUGIN} not found in {', '.join(DYNSEC_PLUGIN_DIRS)}: Debian's mosquitto "
                            "package ships it; without it the backend user could take any client id")


ACL = """\
# Devices reach this listener only through the TLS front, as user `front` with client id = their
# authenticated device id (%c). Device ids cannot contain '+', '#' or '/', so %c cannot widen a pattern.
pattern write /devices/%c/events
pattern write /devices/%c/events/#
pattern write /devices/%c/state
pattern read /devices/%c/config
pattern read /devices/%c/commands
pattern read /devices/%c/commands/#
pattern read /devices/%c/errors
# A gateway's session (client id = the gateway's id) republishes what it sends for an attached device here; the
# bridge service reads the gateway's id from the topic (the gatewayId attribute), which %c makes the session's own.
pattern write iotbridge/gateway/%c/devices/+/events
pattern write iotbridge/gateway/%c/devices/+/events/#
pattern write iotbridge/gateway/%c/devices/+/state

user bridge
topic read /devices/+/events
topic read /devices/+/events/#
topic read /devices/+/state
topic readwrite /devices/+/config
topic readwrite /devices/+/commands
topic readwrite /devices/+/commands/#
topic readwrite iotbridge/sync
topic read iotbridge/gateway/+/devices/+/events
topic read iotbridge/gateway/+/devices/+/events/#
topic read iotbridge/gateway/+/devices/+/state
# The HTTP bridge (in the front's process, client id iotbridge:http:{host}) publishes what an authenticated HTTP
# device sends, on that device's own topics, after the front's checks.
topic write /devices/+/events
topic write /devices/+/events/#
topic write /devices/+/state
# The broker's notices (a client's queue full) and store size: the service turns them into metrics and log lines.
topic read $SYS/broker/log/N
topic read $SYS/broker/store/messages/count
topic read $SYS/broker/store/messages/bytes
topic read $SYS/broker/publish/messages/dropped

user backend
topic write /devices/+/config
topic write /devices/+/commands
topic write /devices/+/commands/#
"""


def mosquitto_config(settings: BridgeSettings, workdir: Path, run_as_root: bool = True,
                     user: str | None = None, plugin_path: Path | None = None) -> str:
    """Write the password and ACL files into ``workdir`` and return the mosquitto.conf text.

    With ``device_auth`` "mosquitto", Mosquitto also listens for devices (TLS on ``front_host:front_port``) and
    loads the device plugin at ``plugin_path`` (``python -m iotbridge.bridge build-plugin`` builds it): the lines
    are ``iotbridge.bridge.plugin.mosquitto_lines``'s."""
    device_lines: list[str] = []
    if settings.device_auth == "mosquitto":
        if plugin_path is None:
            raise ValueError("device_auth mosquitto: the device plugin's path is required (mosquitto-config --plugin "
                             "PATH; build it with python -m iotbridge.bridge build-plugin --out DIR)")
        from iotbridge.bridge.plugin import mosquitto_lines

        device_lines = mosquitto_lines(settings, plugin_path)
    workdir.mkdir(parents=True, exist_ok=True)
    pw = settings.secrets()
    passwd = workdir / "passwd"
    # device_auth mosquitto runs no front: its user would only be a password that works with any client id.
    users = [u for u in PASSWORD_FILE_USERS if u != "front" or settings.device_auth == "front"]
    _write_private(passwd, "\n".join(mosquitto_password_line(u, pw[u]) for u in users) + "\n")
    dynsec = workdir / "dynamic-security.json"
    _write_private(dynsec, json.dumps(dynamic_security_config(settings, pw["backend"]), indent=2))
    (workdir / "acl").write_text(ACL)
    (workdir / "data").mkdir(exist_ok=True)
    lines = [
        "# Generated by iotbridge.bridge.settings.mosquitto_config; devices never reach the loopback listeners."
        if settings.device_auth == "front" else
        "# Generated by iotbridge.bridge.settings.mosquitto_config; devices reach only the TLS listener of the device "
        "plugin (device_auth mosquitto), the loopback listeners are the host's own.",
        *([f"user {user}"] if user else ["user root"] if run_as_root else []),
        "per_listener_settings false",
        f"listener {settings.broker_port} {settings.broker_host}",
        # The front's device sessions (one a device): no ephemeral port each (BridgeSettings.broker_socket).
        *([f"listener 0 {settings.broker_socket}"] if settings.broker_socket else []),
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {workdir / 'acl'}",
        # device_auth mosquitto: the devices' TLS listener and the device plugin (its options follow it), ahead of the
        # dynamic security plugin: it answers every device client itself and defers every other (plugin.py).
        *device_lines,
        # Users not in the password file (backend) are the dynamic security plugin's: their password and their one
        # client id.
        f"plugin {dynsec_plugin_path()}",
        f"plugin_opt_config_file {dynsec}",
        # Bounded per client (0 would let one stalled subscriber grow the broker until the host dies); a client
        # over the bound loses messages, which the broker announces on $SYS/broker/log/N (log_dest topic) and the
        # bridge service reports.
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_queued_bytes {settings.max_queued_bytes}",
        "sys_interval 5",
        # The bridge acknowledges a message only after Pub/Sub accepted it; a large window keeps many in flight.
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        # Retained configs and the bridge's persistent session (queued QoS 1 messages) survive a restart.
        "persistence true",
        f"persistence_location {workdir / 'data'}/",
        "autosave_interval 5",
        "retain_available true",
        # The front does not follow MQTT 5 topic aliases; advertising none keeps conforming clients off them.
        "max_topic_alias 0",
        # Device payload limits are enforced by the front (256 KB events); this bounds anything else.
        "max_packet_size 1048576",
        "allow_duplicate_messages false",
        "set_tcp_nodelay true",  # docs/broker-scaling.md "Nagle on the host's loopback connections"
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_dest topic",
        "",
    ]
    return "\n".join(lines)

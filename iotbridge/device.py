"""A small device SDK speaking Cloud IoT Core's MQTT protocol (docs/device-protocol.md), on paho-mqtt 2.x.

Written the way IoT Core's own samples were: client id ``projects/{p}/locations/{r}/registries/{reg}/devices/{d}``,
username ``unused``, a JWT password signed with the device's private key (RS256 or ES256, ``aud`` = project),
TLS with a CA file, ``/devices/{d}/...`` topics. A device moving off IoT Core changes only host, port and CA.

    dev = Device(DeviceIdentity(project, region, registry, "pump-1", key_pem, "ES256"), host, port, ca_file)
    dev.connect()
    dev.subscribe_config()
    dev.publish_event(b'{"ts": 1764252000000, "metrics": {"rpm": 1200}}').wait_for_publish()
    dev.configs.get(timeout=10)      # bytes of the latest config
    dev.disconnect()

A token expires (the bridge closes the session at ``exp``): ``connect()`` again mints a fresh one.

A gateway (a device created with ``gateway_type`` GATEWAY) speaks for the devices bound to it::

    gw.subscribe_errors()
    gw.attach("sensor-1", token=create_jwt(project, sensor_key, "ES256"))   # token per the gateway's auth method
    gw.subscribe_config(device_id="sensor-1")
    gw.publish_event(b"...", device_id="sensor-1").wait_for_publish()
    gw.configs_of("sensor-1").get(timeout=10); gw.errors.get(timeout=10)
    gw.detach("sensor-1")

``HttpDevice`` speaks IoT Core's HTTP bridge instead (``publish_event``, ``set_state``, ``get_config``).
"""

from __future__ import annotations

import base64
import json
import queue
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal

import jwt
import paho.mqtt.client as paho
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from iotbridge import spec

Algorithm = Literal["RS256", "ES256"]


class ConnectError(ConnectionError):
    """The bridge refused the connection (``reason`` is the CONNACK reason) or it timed out."""

    def __init__(self, message: str, reason: Any = None):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeviceIdentity:
    project: str
    region: str
    registry_id: str
    device_id: str
    private_key_pem: bytes
    algorithm: Algorithm

    @property
    def client_id(self) -> str:
        return (f"projects/{self.project}/locations/{self.region}/registries/{self.registry_id}"
                f"/devices/{self.device_id}")


def generate_key(algorithm: Algorithm) -> tuple[bytes, str]:
    """A new device key: (private key PEM, public key PEM) — register the public one as RSA_PEM / ES256_PEM."""
    key: Any = (rsa.generate_private_key(65537, 2048) if algorithm == "RS256"
                else ec.generate_private_key(ec.SECP256R1()))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def create_jwt(project: str, private_key_pem: bytes, algorithm: str, lifetime_s: int = 3600,
               now: float | None = None) -> str:
    """IoT Core's device JWT: ``iat``, ``exp`` and ``aud`` = project id."""
    iat = int(now if now is not None else time.time())
    return jwt.encode({"iat": iat, "exp": iat + lifetime_s, "aud": project}, private_key_pem, algorithm=algorithm)


class Device:
    def __init__(self, identity: DeviceIdentity, host: str, port: int, ca_certs: str | None,
                 token_lifetime_s: int = 3600, protocol: MQTTProtocolVersion = paho.MQTTv311, max_inflight: int = 100,
                 client_cert: str | None = None, client_key: str | None = None, keepalive: int = 60,
                 bind_address: str = ""):
        self.identity = identity
        self.bind_address = bind_address  # the local address to connect from ("" = the system's choice)
        self.host, self.port = host, port
        self.token_lifetime_s = token_lifetime_s
        self.keepalive = keepalive
        self.configs: queue.Queue[bytes | None] = queue.Queue()  # None: no more configs, a reader's cue to stop
        self.commands: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.errors: queue.Queue[dict[str, Any]] = queue.Queue()  # a gateway's errors topic, parsed
        self._attached_configs: dict[str, queue.Queue[bytes | None]] = {}
        self._attached_commands: dict[str, queue.Queue[tuple[str, bytes]]] = {}
        self._connected = threading.Event()
        self._connack: Any = None
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity.client_id,
                                  protocol=protocol, reconnect_on_failure=False)
        # With client_cert/client_key the device may authenticate by mTLS instead: connect(use_jwt=False).
        self.client.tls_set(ca_certs=ca_certs, certfile=client_cert, keyfile=client_key,
                            tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.max_queued_messages_set(0)
        # QoS 1 messages awaiting PUBACK; paho's default of 20 caps a device at 20 round trips' worth.
        self.client.max_inflight_messages_set(max_inflight)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def config_topic(self) -> str:
        return spec.device_topic(self.identity.device_id, spec.CONFIG)

    @property
    def commands_topic(self) -> str:
        return spec.device_topic(self.identity.device_id, spec.COMMANDS, "#")

    def events_topic(self, sub_folder: str | None = None, device_id: str | None = None) -> str:
        return spec.device_topic(device_id or self.identity.device_id, spec.EVENTS, sub_folder or "")

    @property
    def state_topic(self) -> str:
        return spec.device_topic(self.identity.device_id, spec.STATE)

    # ---------------------------------------------------------------------------------- connection

    def connect(self, timeout: float = 15.0, password: str | None = None, use_jwt: bool = True) -> None:
        """Connect with a freshly minted JWT (or ``password`` as given, or none with ``use_jwt=False`` for mTLS);
        ConnectError when refused."""
        ident = self.identity
        if not use_jwt:
            token = None
        elif password is not None:
            token = password
        else:
            token = create_jwt(ident.project, ident.private_key_pem, ident.algorithm, self.token_lifetime_s)
        self.client.username_pw_set("unused", token)
        self._connected.clear()
        self._connack = None
        self.client.connect(self.host, self.port, keepalive=self.keepalive, bind_address=self.bind_address)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.client.loop_stop()
            raise ConnectError(f"{ident.device_id}: no CONNACK within {timeout}s")
        if self._connack is None or self._connack.is_failure:
            self.client.loop_stop()
            raise ConnectError(f"{ident.device_id}: connection refused ({self._connack})", self._connack)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def is_connected(self) -> bool:
        return self.client.is_connected()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connack = reason_code
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.disconnects.put(reason_code)
        self._connected.set()  # unblock a connect() waiting on a connection closed before CONNACK

    # ---------------------------------------------------------------------------------- messages

    def publish_event(self, payload: bytes, sub_folder: str | None = None, qos: int = 1,
                      device_id: str | None = None) -> paho.MQTTMessageInfo:
        """This device's event; a gateway passes ``device_id`` to publish for an attached device."""
        return self.client.publish(self.events_topic(sub_folder, device_id), payload, qos=qos)

    def publish_state(self, payload: bytes, qos: int = 1, device_id: str | None = None) -> paho.MQTTMessageInfo:
        return self.client.publish(spec.device_topic(device_id or self.identity.device_id, spec.STATE), payload,
                                   qos=qos)

    def subscribe_config(self, qos: int = 1, timeout: float = 10.0, device_id: str | None = None) -> None:
        if device_id is not None:
            self._attached_configs.setdefault(device_id, queue.Queue())
        self._subscribe(spec.device_topic(device_id or self.identity.device_id, spec.CONFIG), qos, timeout)

    def subscribe_commands(self, qos: int = 1, timeout: float = 10.0, device_id: str | None = None) -> None:
        if device_id is not None:
            self._attached_commands.setdefault(device_id, queue.Queue())
        self._subscribe(spec.device_topic(device_id or self.identity.device_id, spec.COMMANDS, "#"), qos, timeout)

    # ---------------------------------------------------------------------------------- gateway

    def attach(self, device_id: str, token: str | None = None, qos: int = 1) -> paho.MQTTMessageInfo:
        """Attach a device bound to this gateway; ``token`` is the device's own JWT, which the gateway's auth
        methods DEVICE_AUTH_TOKEN_ONLY and ASSOCIATION_AND_DEVICE_AUTH_TOKEN require."""
        payload = json.dumps({"authorization": token}).encode() if token else b"{}"
        return self.client.publish(spec.device_topic(device_id, spec.ATTACH), payload, qos=qos)

    def detach(self, device_id: str, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(spec.device_topic(device_id, spec.DETACH), b"{}", qos=qos)

    def subscribe_errors(self, timeout: float = 10.0) -> None:
        """The gateway's errors topic (QoS 0): refusals of what it did for attached devices land in ``errors``."""
        self._subscribe(spec.device_topic(self.identity.device_id, spec.ERRORS), 0, timeout)

    def configs_of(self, device_id: str) -> queue.Queue[bytes | None]:
        """Configs received for an attached device (after ``subscribe_config(device_id=...)``)."""
        return self._attached_configs.setdefault(device_id, queue.Queue())

    def commands_of(self, device_id: str) -> queue.Queue[tuple[str, bytes]]:
        return self._attached_commands.setdefault(device_id, queue.Queue())

    def _subscribe(self, topic: str, qos: int, timeout: float) -> None:
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
            granted.extend(reason_codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=qos)
        if not done.wait(timeout):
            raise ConnectError(f"no SUBACK for {topic} within {timeout}s")
        if any(rc.is_failure for rc in granted):
            raise ConnectError(f"subscription to {topic} refused: {granted}")

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        parsed = spec.parse_device_topic(msg.topic)
        payload = bytes(msg.payload)
        if parsed is not None and parsed[0] != self.identity.device_id:
            device_id, kind, _ = parsed
            if kind == spec.CONFIG:
                self.configs_of(device_id).put(payload)
            else:
                self.commands_of(device_id).put((msg.topic, payload))
        elif msg.topic == self.config_topic:
            self.configs.put(payload)
        elif parsed is not None and parsed[1] == spec.ERRORS:
            try:
                self.errors.put(json.loads(payload))
            except ValueError:
                self.errors.put({"description": payload.decode(errors="replace")})
        else:
            self.commands.put((msg.topic, payload))


class HttpError(Exception):
    """The HTTP bridge refused a request: ``code`` (HTTP status), ``status`` (e.g. UNAUTHENTICATED), message."""

    def __init__(self, code: int, status: str, message: str):
        super().__init__(f"{code} {status}: {message}")
        self.code, self.status = code, status


class HttpDevice:
    """A device on IoT Core's HTTP bridge: each request carries a fresh JWT; standard library only.

    ``base_url`` replaces ``https://cloudiotdevice.googleapis.com`` (``http_bridge_url`` of the stack)."""

    def __init__(self, identity: DeviceIdentity, base_url: str, ca_certs: str | None, token_lifetime_s: int = 3600,
                 timeout: float = 30.0):
        self.identity = identity
        self.base_url = base_url.rstrip("/")
        self.token_lifetime_s = token_lifetime_s
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_certs)
        self._token: tuple[float, str] | None = None

    def _path(self, verb: str) -> str:
        return f"{self.base_url}/v1/{self.identity.client_id}{verb}"

    def _jwt(self) -> str:
        now = time.time()
        if self._token is None or self._token[0] - now < 60:  # reused until a minute before it expires
            ident = self.identity
            self._token = (now + self.token_lifetime_s,
                           create_jwt(ident.project, ident.private_key_pem, ident.algorithm, self.token_lifetime_s))
        return self._token[1]

    def _request(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"authorization": f"Bearer {self._jwt()}", "cache-control": "no-cache"}
        if data is not None:
            headers["content-type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                err = {"status": "UNKNOWN", "message": str(exc)}
            raise HttpError(exc.code, str(err.get("status")), str(err.get("message"))) from None

    def publish_event(self, payload: bytes, sub_folder: str | None = None) -> None:
        body: dict[str, Any] = {"binary_data": base64.b64encode(payload).decode()}
        if sub_folder:
            body["sub_folder"] = sub_folder
        self._request(self._path(":publishEvent"), body)

    def set_state(self, payload: bytes) -> None:
        self._request(self._path(":setState"), {"state": {"binary_data": base64.b64encode(payload).decode()}})

    def get_config(self, local_version: int = 0) -> tuple[int, bytes | None]:
        """(latest version, its data), or (version, None) when ``local_version`` is already the latest."""
        query = urllib.parse.urlencode({"local_version": local_version})
        out = self._request(self._path(f"/config?{query}"))
        data = out.get("binaryData")
        return int(out.get("version", 0)), base64.b64decode(data) if data is not None else None

"""A device fleet speaking the device protocol (docs/device-protocol.md), for ``iotctl simulate`` and ``make demo``.

Each simulated device is a :class:`iotbridge.device.Device` — the same SDK a real device uses — with its own
key, generated and registered on first use and kept under the key folder (private keys never leave it). Devices
send telemetry (``ts``, ``metrics``, ``seq``: docs/messages.md) at QoS 1, subscribe to their config and commands,
and answer each config by publishing their state (``{"config_sha256": ...}``), as IoT Core devices did.

Signals are realistic rather than random: temperature follows a slow daily-like wave plus noise; rpm hovers
around a set point; every ``drift_every``-th device heats up steadily until it crosses ``drift_to`` so that the
pipeline's threshold rule fires during a short run. Devices obey their config: ``{"fan": "max"}`` (what the
pipeline's rule asks for) cools the device back towards its resting temperature — the closed loop.

The fleet speaks one of three ways (``mode``): ``mqtt``, each device on its own connection; ``gateway``, one
gateway (``{prefix}-gw``, created as a GATEWAY when missing) with the fleet's devices bound to it, attaching each
and speaking for it on one connection; ``http``, each device on IoT Core's HTTP bridge (events and state by
``publishEvent``/``setState``, its config polled with ``config?local_version``; HTTP devices get no commands).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iotbridge.device import Algorithm, ConnectError, Device, DeviceIdentity, HttpDevice, HttpError, generate_key
from iotbridge.ml.runner import ModelRunner

Progress = Callable[[int, int], None]  # (sent, acknowledged)
Mode = Literal["mqtt", "gateway", "http"]
HTTP_CONFIG_POLL_S = 2.0


class _Done:
    """What an HTTP request leaves behind, shaped like paho's MQTTMessageInfo: answered 200 or not."""

    def __init__(self, ok: bool):
        self.ok = ok

    def is_published(self) -> bool:
        return self.ok

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None


class AttachedLink:
    """A device spoken for by a gateway: the Device methods the fleet uses, through the gateway's connection."""

    def __init__(self, gateway: Device, identity: DeviceIdentity):
        self.gateway, self.identity = gateway, identity
        self.configs = gateway.configs_of(identity.device_id)
        self.commands = gateway.commands_of(identity.device_id)

    def connect(self) -> None:
        self.gateway.attach(self.identity.device_id).wait_for_publish(30)
        self.gateway.subscribe_config(device_id=self.identity.device_id)
        self.gateway.subscribe_commands(device_id=self.identity.device_id)

    def publish_event(self, payload: bytes, sub_folder: str | None = None) -> Any:
        return self.gateway.publish_event(payload, sub_folder, device_id=self.identity.device_id)

    def publish_state(self, payload: bytes) -> Any:
        return self.gateway.publish_state(payload, device_id=self.identity.device_id)

    def is_connected(self) -> bool:
        return self.gateway.is_connected()

    def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.gateway.detach(self.identity.device_id)


class HttpLink:
    """A device on the HTTP bridge: the Device methods the fleet uses, each a request; configs polled."""

    def __init__(self, http: HttpDevice):
        self.http, self.identity = http, http.identity
        self.configs: Any = queue.Queue()
        self.commands: Any = queue.Queue()  # stays empty: the HTTP bridge has no commands
        self._stop = threading.Event()

    def connect(self) -> None:
        threading.Thread(target=self._poll, daemon=True, name=f"poll-{self.identity.device_id}").start()

    def _poll(self) -> None:
        version = 0
        while not self._stop.is_set():
            with contextlib.suppress(HttpError, OSError):
                latest, data = self.http.get_config(version)
                if data is not None:
                    version = latest
                    self.configs.put(data)
            self._stop.wait(HTTP_CONFIG_POLL_S)

    def _send(self, fn: Callable[[], None]) -> _Done:
        try:
            fn()
            return _Done(True)
        except (HttpError, OSError):
            return _Done(False)

    def publish_event(self, payload: bytes, sub_folder: str | None = None) -> _Done:
        return self._send(lambda: self.http.publish_event(payload, sub_folder))

    def publish_state(self, payload: bytes) -> _Done:
        return self._send(lambda: self.http.set_state(payload))

    def is_connected(self) -> bool:
        return not self._stop.is_set()

    def disconnect(self) -> None:
        self._stop.set()


@dataclass
class SimDevice:
    device: Any  # a Device (mqtt), an AttachedLink (gateway) or an HttpLink (http)
    index: int
    drifting: bool
    seq: int = 0
    base_temp: float = 21.0
    configs: list[bytes] = field(default_factory=list)
    commands: list[tuple[str, bytes]] = field(default_factory=list)
    # The edge model: loaded from a config that points at one, run on every reading, reported to events/logs.
    runner: ModelRunner | None = None
    # The device's fan, as its config sets it ({"fan": "max"}: full speed, the device cools; anything else: auto).
    fan: str = "auto"
    fan_since: float | None = None  # seconds into the run when the fan went to max
    temp_at_fan: float | None = None  # the temperature then, where the cooling starts from
    last_temp: float | None = None

    @property
    def id(self) -> str:
        return self.device.identity.device_id


@dataclass
class FleetResult:
    devices: int
    sent: int
    acknowledged: int
    unacknowledged: int
    duration_s: float
    configs: dict[str, list[bytes]]
    commands: dict[str, list[tuple[str, bytes]]]
    records: list[dict[str, Any]]  # every message sent: device_id, seq, ts (ms), metrics

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices, "sent": self.sent, "acknowledged": self.acknowledged,
            "unacknowledged": self.unacknowledged, "duration_s": round(self.duration_s, 2),
            "rate_msg_s": round(self.sent / self.duration_s, 1) if self.duration_s else 0.0,
            "configs_received": sum(len(v) for v in self.configs.values()),
            "commands_received": sum(len(v) for v in self.commands.values()),
        }


def load_or_create_key(key_dir: Path, device_id: str, algorithm: Algorithm) -> tuple[bytes, str, bool]:
    """(private PEM, public PEM, created). The private key file is written 0600 and never printed."""
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = key_dir / f"{device_id}.key.pem", key_dir / f"{device_id}.pub.pem"
    if priv_path.exists() and pub_path.exists():
        return priv_path.read_bytes(), pub_path.read_text(), False
    private, public = generate_key(algorithm)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_text(public)
    return private, public, True


class Fleet:
    def __init__(self, *, project: str, region: str, registry, host: str, port: int, ca_certs: str | None,
                 key_dir: Path, devices: int, prefix: str = "sim", drift_every: int = 5, drift_to: float = 95.0,
                 seed: int = 7, cooling_s: float = 4.0, mode: Mode = "mqtt", http_url: str = "") -> None:
        if devices < 1:
            raise ValueError("--devices must be at least 1")
        if mode == "http" and not http_url:
            raise ValueError("this target has no HTTP bridge (http_bridge_url)")
        self.mode = mode
        self.gateway: Device | None = None
        self.gateway_id = f"{prefix}-gw"
        if mode == "gateway":
            private, _public, _ = load_or_create_key(key_dir / registry.registry_id, self.gateway_id, "ES256")
            self.gateway = Device(DeviceIdentity(project, region, registry.registry_id, self.gateway_id, private,
                                                 "ES256"), host, port, ca_certs)
        self.project, self.region, self.registry = project, region, registry
        self.host, self.port, self.ca_certs = host, port, ca_certs
        self.key_dir = key_dir
        self.drift_to = drift_to
        self.cooling_s = cooling_s  # time constant of a device cooling at full fan
        self.t0 = time.monotonic()  # the run's start; run() resets it
        self.rng = random.Random(seed)
        self.members: list[SimDevice] = []
        for i in range(devices):
            device_id = f"{prefix}-{i:04d}"
            # Half the fleet on each algorithm, as a mixed IoT Core fleet would be.
            algorithm: Algorithm = "ES256" if i % 2 == 0 else "RS256"
            private, _public, _ = load_or_create_key(key_dir / registry.registry_id, device_id, algorithm)
            ident = DeviceIdentity(project, region, registry.registry_id, device_id, private, algorithm)
            device: Any
            if self.gateway is not None:
                device = AttachedLink(self.gateway, ident)
            elif mode == "http":
                device = HttpLink(HttpDevice(ident, http_url, ca_certs))
            else:
                device = Device(ident, host, port, ca_certs)
            self.members.append(SimDevice(device, i, drifting=drift_every > 0 and i % drift_every == 0,
                                          base_temp=20.0 + self.rng.uniform(-2, 3),
                                          runner=ModelRunner.for_device(device)))

    # ---------------------------------------------------------------------------------- set-up
    def ensure_registered(self) -> int:
        """Register devices the registry does not know yet (in gateway mode, the gateway too, and bind every device
        to it); returns how many were registered."""
        from iotbridge.registry import Credential, DeviceNotFound, GatewayConfig

        made = 0
        if self.gateway is not None:
            try:
                self.registry.get_device(self.gateway_id)
            except DeviceNotFound:
                pub = (self.key_dir / self.registry.registry_id / f"{self.gateway_id}.pub.pem").read_text()
                self.registry.create_device(self.gateway_id, [Credential("ES256_PEM", pub)],
                                            metadata={"simulated": "true"},
                                            gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
                made += 1
        for m in self.members:
            try:
                self.registry.get_device(m.id)
            except DeviceNotFound:
                pub = (self.key_dir / self.registry.registry_id / f"{m.id}.pub.pem").read_text()
                fmt = "ES256_PEM" if m.device.identity.algorithm == "ES256" else "RSA_PEM"
                self.registry.create_device(m.id, [Credential(fmt, pub)], metadata={"simulated": "true"})
                made += 1
            if self.gateway is not None:
                self.registry.bind_device_to_gateway(self.gateway_id, m.id)
        return made

    def connect(self) -> None:
        if self.gateway is not None:
            self.gateway.connect()
            self.gateway.subscribe_errors()
        for m in self.members:
            m.device.connect()
            if isinstance(m.device, Device):
                m.device.subscribe_config()
                m.device.subscribe_commands()
            threading.Thread(target=self._answer_configs, args=(m,), daemon=True,
                             name=f"config-{m.id}").start()

    def _answer_configs(self, m: SimDevice) -> None:
        dev = m.device
        while True:
            data = dev.configs.get()
            if data is None:
                return
            m.configs.append(data)
            self.apply_fan(m, data)
            if m.runner is not None:
                m.runner.apply_config(data)  # a config without a model pointer leaves the model as it is
            state = json.dumps({"config_sha256": hashlib.sha256(data).hexdigest(), "seq": m.seq}).encode()
            if dev.is_connected():
                dev.publish_state(state)

    def apply_fan(self, m: SimDevice, data: bytes, elapsed: float | None = None) -> None:
        """A config's ``fan``: ``max`` starts the cooling from the device's current temperature; a config without
        it (a config is the device's whole desired state) puts the fan back to auto."""
        try:
            doc = json.loads(data)
        except ValueError:
            return  # not a JSON config: nothing this firmware understands
        fan = str(doc.get("fan", "auto")) if isinstance(doc, dict) else "auto"
        if fan == m.fan:
            return
        if fan == "max":
            m.temp_at_fan = m.last_temp
            m.fan_since = elapsed if elapsed is not None else time.monotonic() - self.t0
        m.fan = fan

    # ---------------------------------------------------------------------------------- signals
    def reading(self, m: SimDevice, elapsed: float, duration: float) -> dict[str, float]:
        temp = m.base_temp + 3 * math.sin(elapsed / 30 + m.index) + self.rng.gauss(0, 0.3)
        if m.fan == "max" and m.fan_since is not None and m.temp_at_fan is not None:
            # Full fan: from where it was, the temperature falls exponentially towards the device's resting one.
            start = m.temp_at_fan - m.base_temp
            temp += start * math.exp(-max(0.0, elapsed - m.fan_since) / self.cooling_s)
        elif m.drifting:
            # Crosses drift_to two thirds of the way into the run, then stays above it.
            temp += max(0.0, (self.drift_to + 5 - m.base_temp)) * min(1.0, elapsed / max(duration * 2 / 3, 1))
        m.last_temp = temp
        rpm = 1200 + 40 * math.sin(elapsed / 7 + m.index) + self.rng.gauss(0, 10)
        vibration = 0.02 + 0.002 * (temp - 20) + abs(self.rng.gauss(0, 0.003))
        return {"temperature": round(temp, 3), "rpm": round(rpm, 1), "vibration": round(vibration, 5)}

    # ---------------------------------------------------------------------------------- run
    def run(self, rate: float, duration: float, progress: Progress | None = None,
            ack_timeout: float = 60.0) -> FleetResult:
        if rate <= 0 or duration <= 0:
            raise ValueError("--rate and --duration must be positive")
        total = max(1, int(rate * duration))
        infos = []
        records: list[dict[str, Any]] = []
        t0 = self.t0 = time.monotonic()
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing to the requested rate
            m = self.members[i % len(self.members)]
            m.seq += 1
            now_ms = int(time.time() * 1000)
            metrics = self.reading(m, time.monotonic() - t0, duration)
            payload = json.dumps({"ts": now_ms, "metrics": metrics, "seq": m.seq}, separators=(",", ":")).encode()
            infos.append(m.device.publish_event(payload))
            if m.runner is not None:
                m.runner.observe({"ts": now_ms, "metrics": metrics, "seq": m.seq})
            records.append({"device_id": m.id, "seq": m.seq, "ts": now_ms, "metrics": metrics})
            if progress and (i % 25 == 0 or i == total - 1):
                progress(i + 1, sum(1 for x in infos if x.is_published()))
        deadline = time.monotonic() + ack_timeout
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Not queued (disconnected): counted as unacknowledged below.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=remaining)
        acked = sum(1 for x in infos if x.is_published())
        if progress:
            progress(total, acked)
        duration_s = time.monotonic() - t0
        return FleetResult(devices=len(self.members), sent=total, acknowledged=acked,
                           unacknowledged=total - acked, duration_s=duration_s,
                           configs={m.id: list(m.configs) for m in self.members},
                           commands={m.id: list(m.commands) for m in self.members}, records=records)

    def drain_commands(self) -> None:
        for m in self.members:
            while not m.device.commands.empty():
                m.commands.append(m.device.commands.get_nowait())

    def close(self) -> None:
        for m in self.members:
            m.device.configs.put(None)  # stops the config thread
            with contextlib.suppress(Exception):  # best effort on shutdown
                m.device.disconnect()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.disconnect()


__all__ = ["ConnectError", "Fleet", "FleetResult", "load_or_create_key"]

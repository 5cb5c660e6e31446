"""The auth daemon of ``device_auth: mosquitto``: what the TLS front decides about a device, decided for Mosquitto's
plugin (``mosquitto_plugin/iotbridge_auth.c``), beside it on the broker host.

The plugin asks on a Unix socket (``BridgeSettings.auth_socket``, mode 0660, group = Mosquitto's), in lines:

- ``AUTH <request id> <client id>\\n<peer address>\\n<password>\\n`` -> ``<request id> OK <deadline unix seconds>
  <session id>\\n`` or ``<request id> NO <reason>\\n`` (the reason names no secret and is at most ``REASON_MAX``
  characters; the plugin logs it). One connection of the plugin, one request at a time: Mosquitto waits for the
  answer (at most a second: a later answer is discarded by its request id, and one that admitted is reported gone),
  so nothing here reads the registry for a CONNECT. Session ids grow with every admission and across restarts
  (they start at the daemon's start time in microseconds).
- On its other connection: ``EVENTS <highest session id the plugin was given>\\n``, ``LIVE <session id> <deadline>
  <client id>\\n`` per session it holds (streamed; other lines may come between), ``SYNCED\\n``; ``GONE <session
  id>\\n`` once per admitted CONNECT that ended; ``SUBSCRIBED <session id>\\n`` when the device subscribed to its
  config. At ``SYNCED`` the daemon ends its sessions up to the EVENTS line's id that the list lacks (a later one was
  admitted after the list began, unless the auth connection it came on has closed: a restarted Mosquitto), adopts
  the listed ones it does not hold (after a restart of either), and checks every session against the map (a
  revocation while no events connection existed is not lost); after the first, this host's presence records of
  devices without a session here are removed. The daemon writes ``KICK <session id>\\n`` there:
  the plugin ends that session if Mosquitto still holds it.

What a CONNECT is judged on, in this order: the device map is fresh (a change-feed round succeeded within
``2 * recheck_interval_s``; admitting on stale credentials would admit a revoked device), the source address has
failed attempts to spare (``auth_failures_per_s``, ``auth_failure_burst``), the client id names this registry and a
device the map holds, the JWT is signed by one of its unexpired credentials (``auth.verify_jwt``), the device is not
blocked, is not a gateway (gateways keep ``device_auth: front``), and its registry has MQTT on. A failed proof costs
the address a token, as at the front.

The map holds every device of the registry, read at start (paged) and kept current by the registry's change feed
(``Registry.changed_since``, with the overlap of ``regcache``, whose docstring says why no change is missed): each
round re-reads the devices changed since the previous round's start. A session whose device a round finds blocked,
deleted (or created again), without the credential it authenticated with, or whose registry turned MQTT off, is
kicked (``KICK``; the plugin ends it without its will). The plugin itself ends a session at its deadline.

Around the sessions, what the front does: the presence record of each session (batched writes, removed when it
ends), the config sync request at connect and the "gone" when the host's last session of a device ends
(``iotbridge/sync``, read by the bridge service), the connected-devices gauge and ``/healthz`` on ``health_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge.bridge import fanout, metrics, regcache
from iotbridge.bridge.auth import AuthError, parse_client_id, verify_jwt
from iotbridge.bridge.front import (
    MAX_TRACKED_ADDRESSES,
    SYNC_GONE,
    SYNC_TOPIC,
    address_key,
    no_delay,
    printable,
    revoked_reason,
    session_deadline,
    sync_payload,
)
from iotbridge.bridge.plugin import client_id_prefix
from iotbridge.bridge.ratelimit import KeyedBuckets
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.registry import (
    CHANGE_STAMP_KEEP_S,
    Device,
    Registry,
    RegistryNotFound,
    RegistrySettings,
    grant_of,
    signed_by_one_of,
)

log = logging.getLogger("iotbridge.authd")

PAGE = 1000  # devices a page when the map is read whole
MAX_LINE = 128 * 1024  # longest request line (a password is at most 65,535 bytes in MQTT)
REGISTRY_WORKERS = 4
REASON_MAX = 200  # the refusal reasons' length on the wire (an attacker-sized JWT header is echoed in some)
SERVICE_SILENT_S = 10.0  # the bridge service's stats older than this: the host is not healthy
# Presence records written within this share one commit, and their sync requests reach the bridge service together
# (see _present). Mosquitto asks one CONNECT at a time, so they arrive spread out: with the front's 5 ms
# (regcache.WRITE_BATCH_S) a burst of 300 connects/s made commits of about 5 and the service one batched config read
# per 5 sync requests, against 12 behind the front (bench.profile_front pyspy-plugin).
PRESENCE_BATCH_S = 0.025
# A session's /subscribed sync requests: at most one this often (the rest are counted, not sent).
SUBSCRIBED_MIN_INTERVAL_S = 1.0


def load_devices(registry: Registry, page: int = PAGE) -> dict[str, Device]:
    """Every device of the registry, in pages of ``page``, kept without state and metadata (no CONNECT reads them)."""
    devices: dict[str, Device] = {}
    last = None
    while True:
        batch = registry.list_devices(limit=page, start_after=last)
        devices |= {d.id: _slim(d) for d in batch}
        if len(batch) < page:
            return devices
        last = batch[-1].id


def _slim(device: Device) -> Device:
    return dataclasses.replace(device, state=None, metadata={})


@dataclass(eq=False)
class Session:
    """One CONNECT the daemon admitted (or, ``adopted``, one the plugin listed that the daemon had not seen: its
    credential is unknown, so only its device's deletion or blocking and the registry's MQTT switch revoke it)."""

    sid: int
    client_id: str
    device_id: str
    num_id: str = ""
    credential_pem: str = ""
    expires_at: datetime | None = None
    adopted: bool = False
    via: object = None  # the plugin's auth connection it was admitted on
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    presence: asyncio.Task[Any] | None = None
    subscribed_at: float = -math.inf  # time.monotonic() of its last /subscribed request


class Refused(Exception):
    """A CONNECT refused; the message is the reason sent to the plugin (no secret in it)."""


class AuthDaemon:
    def __init__(self, settings: BridgeSettings, registry: Registry, control_password: str | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        if settings.registry_id != registry.registry_id:
            raise ValueError("the registry must be the settings' registry_id")
        self.settings = settings
        self.registry = registry
        self.prefix = client_id_prefix(settings)
        self._monotonic = monotonic
        self.devices: dict[str, Device] = {}
        self.registry_settings = RegistrySettings()
        self._round_start: datetime | None = None  # host clock at the start of the last successful round
        self._fresh_since: float | None = None  # monotonic clock at that start
        self.sessions: dict[int, Session] = {}  # session id -> the session
        self._next_sid = time.time_ns() // 1000  # above every id an earlier daemon of this host gave
        self._holders: Counter[str] = Counter()  # device id -> sessions on this host
        self._failures = KeyedBuckets(settings.auth_failures_per_s, settings.auth_failure_burst, MAX_TRACKED_ADDRESSES)
        self._events: set[asyncio.StreamWriter] = set()
        self._synced: set[asyncio.StreamWriter] = set()  # events connections whose LIVE list was reconciled
        self._swept = False  # this host's presence records checked against the first LIVE list
        self._connections: set[asyncio.StreamWriter] = set()
        self._pool = ThreadPoolExecutor(REGISTRY_WORKERS, thread_name_prefix="authd-registry")
        self._presence = regcache.Batcher(self._pool, fanout.mark_connected_many, PRESENCE_BATCH_S)
        self._absence = regcache.WriteBatcher(self._pool, fanout.mark_disconnected_many)
        self._control_password = control_password
        self._control: paho.Client | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------------------------------------ the map

    def fresh(self) -> bool:
        return self._fresh_since is not None and \
            self._monotonic() - self._fresh_since < 2 * self.settings.recheck_interval_s

    async def _registry(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _read_settings(self) -> RegistrySettings:
        try:
            return self.registry.get_settings()
        except RegistryNotFound:
            return RegistrySettings()

    async def refresh(self) -> None:
        """One round: the whole registry at the first round (or after rounds failed for half the change stamps'
        lifetime), else the devices changed since the previous round's start; then the registry's settings; then
        the sessions the changes revoke are kicked. Raises when the registry cannot be read (nothing changes)."""
        start, fresh_since = datetime.now(UTC), self._monotonic()
        whole = self._round_start is None or start - self._round_start >= timedelta(seconds=CHANGE_STAMP_KEEP_S / 2)
        if whole:
            devices = await self._registry(load_devices, self.registry)
            changed = set(devices) | set(self.devices)
        else:
            assert self._round_start is not None
            since = self._round_start - timedelta(seconds=regcache.OVERLAP_S)
            changed = set(await self._registry(self.registry.changed_since, since))
            read = await self._registry(self.registry.get_devices, sorted(changed)) if changed else {}
            devices = dict(self.devices)
            for device_id in changed:
                if device_id in read:
                    devices[device_id] = _slim(read[device_id])
                else:
                    devices.pop(device_id, None)
        registry_settings = await self._registry(self._read_settings)
        mqtt_turned_off = self.registry_settings.mqtt_enabled and not registry_settings.mqtt_enabled
        self.devices, self.registry_settings = devices, registry_settings
        self._round_start, self._fresh_since = start, fresh_since
        self.stats["rounds"] += 1
        self.stats["changed"] += len(changed) if not whole else 0
        everything = mqtt_turned_off or not registry_settings.mqtt_enabled
        self._revoke([s for s in self.sessions.values() if everything or s.device_id in changed])

    def _revoked(self, s: Session, now: datetime) -> str:
        """Why session ``s`` may no longer stay; "" when it may."""
        device = self.devices.get(s.device_id)
        if not self.registry_settings.mqtt_enabled:
            return "MQTT disabled for the registry"
        if not s.adopted:
            return revoked_reason(s.num_id, s.credential_pem, grant_of(device) if device else None, now)
        if device is None or device.num_id != s.num_id:
            return "device deleted"
        return "device blocked" if device.blocked else ""

    def _revoke(self, sessions: list[Session]) -> None:
        now = datetime.now(UTC)
        for s in sessions:
            reason = self._revoked(s, now)
            if reason:
                log.warning("kicking %s: %s", s.device_id, reason)
                self.stats["kicked"] += 1
                self._send_events(f"KICK {s.sid}\n")

    async def _rounds(self) -> None:
        while True:
            await asyncio.sleep(self.settings.recheck_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the registry briefly unreachable: the next round asks again
                self.stats["rounds_failed"] += 1
                log.warning("registry round failed: %s", exc)

    # ------------------------------------------------------------------------------------ one CONNECT

    def check(self, client_id: str, address: str, password: str) -> tuple[Device, datetime, str]:
        """(the device, its session's deadline, the credential it proved) or ``Refused``."""
        if not self.fresh():
            raise Refused("registry not fresh (no change-feed round succeeded lately)")
        key = address_key(address) if address else "unknown"
        if self._failures.exhausted(key, self._monotonic()):
            self.stats["address_limited"] += 1
            raise Refused(f"too many failed connects from {key}; retry later")

        def bad(reason: str) -> Refused:
            self._failures.charge(key, self._monotonic())
            return Refused(reason)

        s = self.settings
        try:
            device_id = parse_client_id(client_id, s.project, s.region, s.registry_id)
        except AuthError as exc:
            raise bad(str(exc)) from None
        device = self.devices.get(device_id)
        if device is None:
            raise bad("unknown device")
        now = datetime.now(UTC)
        try:
            token = verify_jwt(password, device.credentials, audience=s.project, now=now)
        except AuthError as exc:
            raise bad(str(exc)) from None
        credential = token.credential
        if (self.registry_settings.ca_certificates and credential.format.endswith("_X509_PEM")
                and not signed_by_one_of(credential.public_key_pem, self.registry_settings.ca_certificates)):
            raise bad("certificate not signed by any of the registry's CA certificates")
        if device.blocked:
            raise Refused("device is blocked")
        if device.gateway_config.is_gateway:
            raise Refused("device is a gateway: gateways connect through the TLS front (device_auth front)")
        if not self.registry_settings.mqtt_enabled:
            raise Refused(f"MQTT is disabled for registry {s.registry_id}")
        return device, session_deadline(now, token.expires_at, credential.expiration_time), credential.public_key_pem

    def authenticate(self, client_id: str, address: str, password: str, via: object = None) -> str:
        """The answer to an AUTH request (``OK <deadline> <session id>`` or ``NO <reason>``, without the request id
        and newline) that came on connection ``via``; an admitted session is recorded, its presence written."""
        try:
            device, deadline, credential_pem = self.check(client_id, address, password)
        except Refused as exc:
            self.stats["refused"] += 1
            log.info("refused %s from %s: %s", printable(client_id), printable(address), exc)
            return f"NO {printable(str(exc), REASON_MAX)}"
        self._next_sid += 1
        session = Session(self._next_sid, client_id, device.id, device.num_id, credential_pem, deadline, via=via)
        self._admit(session)
        self.stats["accepted"] += 1
        log.info("device %s connected from %s (until %s)", device.id, printable(address), deadline.isoformat())
        return f"OK {math.floor(deadline.timestamp())} {session.sid}"

    def _admit(self, session: Session) -> None:
        self.sessions[session.sid] = session
        self._holders[session.device_id] += 1
        if session.expires_at is not None:
            item = (self.registry.registry_id, session.device_id, self.settings.host_id, session.id,
                    session.expires_at)
            session.presence = self._spawn(self._present(session, item))

    async def _present(self, session: Session, item: tuple[str, str, str, str, datetime]) -> Any:
        """The session's presence record (its update time), then its config sync request, as the front orders them:
        the requests of a reconnect storm reach the bridge service in bursts (one a presence commit), which it
        reads together (``service.SYNC_BATCH``), instead of one by one at Mosquitto's pace. A session that ended
        meanwhile asks nothing (its "gone" went first)."""
        try:
            return await self._presence.submit(self.registry.client, id(self.registry.client), item)
        except Exception as exc:  # noqa: BLE001 - presence only serves command senders; the device stays
            log.warning("presence of %s not recorded: %s", session.device_id, exc)
            return None
        finally:
            if not session.adopted and self.sessions.get(session.sid) is session:
                self._publish_sync(sync_payload(session.device_id))

    def subscribed(self, sid: int) -> None:
        """The plugin's SUBSCRIBED: the device subscribed to its config; as the front, the bridge service is asked
        for it (an empty latest config reaches only the subscribers of the moment)."""
        session = self.sessions.get(sid)
        if session is None:
            return
        now = time.monotonic()
        # At most one a second per session: each is a registry read and maybe a republish in the bridge service, and
        # one SUBSCRIBE packet may name the config N times (the front's subscribe limit has no plugin counterpart).
        if now - session.subscribed_at < SUBSCRIBED_MIN_INTERVAL_S:
            self.stats["subscribed_coalesced"] += 1
            return
        session.subscribed_at = now
        self._publish_sync(sync_payload(session.device_id, subscribed=True))

    def gone(self, sid: int) -> None:
        """The plugin's GONE: that session ended."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self.stats["gone"] += 1
        left = self._holders[session.device_id] - 1
        if left > 0:
            self._holders[session.device_id] = left
        else:
            del self._holders[session.device_id]
            self._publish_sync((session.device_id + SYNC_GONE).encode())
        if session.presence is not None:
            self._spawn(self._remove_presence(session))
        log.info("device %s disconnected", session.device_id)

    async def _remove_presence(self, session: Session) -> None:
        assert session.presence is not None
        try:
            update_time = await session.presence
            if update_time is not None:  # None: a later session of the same commit holds the record
                await self._absence.write(self.registry.client,
                                          (self.registry.registry_id, session.device_id, update_time))
        except Exception as exc:  # noqa: BLE001 - presence only serves command senders; the host record answers
            log.warning("presence of %s not removed: %s", session.device_id, exc)

    def reconcile(self, live: dict[int, tuple[int, str]], listed_up_to: int) -> None:
        """The plugin's LIVE list (session id -> its deadline and client id), begun when the highest session id it
        had been given was ``listed_up_to``. The daemon's sessions up to that id that the list lacks have ended
        (their GONE was lost with an earlier connection); later ones were admitted after the list began, unless the
        auth connection they came on has closed (a Mosquitto that restarted: its plugin was given no id yet). Listed
        sessions the daemon does not hold (it restarted) are adopted: recorded without a credential, their presence
        written. Then every session is checked against the map."""
        for sid in [sid for sid, s in self.sessions.items()
                    if sid not in live and (sid <= listed_up_to or s.via not in self._connections)]:
            self.gone(sid)
        for sid, (deadline, client_id) in live.items():
            if sid in self.sessions:
                continue
            device_id = client_id.removeprefix(self.prefix)
            device = self.devices.get(device_id)
            self.stats["adopted"] += 1
            self._admit(Session(sid, client_id, device_id, device.num_id if device else "",
                                expires_at=datetime.fromtimestamp(deadline, UTC), adopted=True))
        self._revoke(list(self.sessions.values()))

    async def _sweep_presence(self) -> None:
        """Once, after the first LIVE list: this host's presence records of devices without a session here (their
        sessions ended while no daemon of this host ran) are removed and their "gone" published, as their GONE
        would have. A record a newer session replaced meanwhile stays (the removal's precondition)."""
        reg = self.registry.registry_id
        try:
            records = await self._registry(fanout.presence_of_host, self.registry.client, reg, self.settings.host_id)
            stale = [(device_id, t) for device_id, t in records if device_id not in self._holders]
            await asyncio.gather(*(self._absence.write(self.registry.client, (reg, device_id, update_time))
                                   for device_id, update_time in stale))
            for device_id, _ in stale:
                self._publish_sync((device_id + SYNC_GONE).encode())
            self.stats["presence_swept"] += len(stale)
        except Exception as exc:  # noqa: BLE001 - presence only serves command senders; the records expire
            log.warning("this host's stale presence records not removed: %s", exc)

    # ------------------------------------------------------------------------------------ the socket

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        live: dict[int, tuple[int, str]] | None = None
        listed_up_to = 0
        self._connections.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    return
                verb, _, arg = line[:-1].decode("utf-8", "replace").partition(" ")
                if verb == "AUTH":
                    rid, _, client_id = arg.partition(" ")
                    address, password = await reader.readline(), await reader.readline()
                    if not password.endswith(b"\n") or not rid.isdigit():
                        return
                    answer = self.authenticate(client_id, address[:-1].decode("utf-8", "replace"),
                                               password[:-1].decode("utf-8", "replace"), writer)
                    writer.write(f"{rid} {answer}\n".encode())
                    continue
                try:  # a line of the events connection the daemon cannot read is skipped, not the connection: ending
                    # it would leave kicks going nowhere until the plugin connects again
                    if verb == "GONE":
                        self.gone(int(arg))
                        if live is not None:
                            live.pop(int(arg), None)
                    elif verb == "SUBSCRIBED":
                        self.subscribed(int(arg))
                    elif verb == "EVENTS":
                        self._events.add(writer)
                        self._synced.discard(writer)
                        live, listed_up_to = {}, int(arg)
                    elif verb == "LIVE" and live is not None:
                        sid, deadline, client_id = arg.split(" ", 2)
                        live[int(sid)] = (int(deadline), client_id)
                    elif verb == "SYNCED" and live is not None:
                        self.reconcile(live, listed_up_to)
                        self._synced.add(writer)
                        live = None
                        if not self._swept:
                            self._swept = True
                            self._spawn(self._sweep_presence())
                except ValueError:
                    self.stats["bad_lines"] += 1
                    log.warning("an events line not understood, skipped: %s", printable(verb))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):  # ValueError: a line over MAX_LINE
            pass
        finally:
            self._events.discard(writer)
            self._synced.discard(writer)
            self._connections.discard(writer)
            writer.close()

    def _send_events(self, line: str) -> None:
        for w in list(self._events):
            w.write(line.encode())

    # ------------------------------------------------------------------------------ config sync, health

    def _publish_sync(self, payload: bytes) -> None:
        if self._control is not None:
            self._control.publish(SYNC_TOPIC, payload, qos=1)

    def _connect_control(self, password: str) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:authd:{s.host_id}",
                             clean_session=True)
        client.username_pw_set("bridge", password)
        client.max_queued_messages_set(0)
        client.on_socket_open = no_delay  # a burst's sync requests are small writes one after another
        client.connect_async(s.broker_host, s.broker_port, keepalive=30)
        client.loop_start()
        return client

    async def healthy(self) -> tuple[bool, str]:
        """Mosquitto accepts connections, the map is fresh, and the bridge service reported lately."""
        s = self.settings
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(s.broker_host, s.broker_port), 2)
            w.close()
        except (OSError, TimeoutError):
            return False, "broker unreachable"
        if not self.fresh():
            return False, "device map not fresh"
        if not self._synced:  # kicks would go nowhere, CONNECTs are not Mosquitto's with this daemon
            return False, "no events connection from Mosquitto's plugin"
        if s.workdir:
            try:
                age = time.time() - (Path(s.workdir) / "service-stats.json").stat().st_mtime
            except OSError:
                return False, "bridge service has not reported"
            if age > SERVICE_SILENT_S:
                return False, f"bridge service silent for {age:.0f}s"
        return True, "ok"

    async def _health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await metrics.answer_health(reader, writer, self.healthy, self.counters)

    def connected_devices(self) -> int:
        return len(self._holders)

    def counters(self) -> dict[str, int]:
        return {**self.stats, "connected": self.connected_devices(), "devices": len(self.devices),
                "fresh": int(self.fresh()), "presence_commits": self._presence.batches,
                "absence_commits": self._absence.commits}

    # ---------------------------------------------------------------------------------- lifecycle

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self, group: str | None = None) -> None:
        """Read the registry, listen on ``auth_socket`` (mode 0660, ``group``'s), start the rounds, the gauge and
        the health port. Raises when the registry cannot be read at start."""
        s = self.settings
        await self.refresh()
        if self._control_password is not None:
            self._control = self._connect_control(self._control_password)
        path = Path(s.auth_socket)
        path.unlink(missing_ok=True)
        self._servers.append(await asyncio.start_unix_server(self._serve, str(path), limit=MAX_LINE))
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        path.chmod(0o660)
        if s.health_port:
            self._servers.append(await asyncio.start_server(self._health, s.front_host, s.health_port))
        self._spawn(self._rounds())
        self._spawn(metrics.connected_devices_loop(s.project, s.registry_id, s.host_id, s.connected_devices_metric,
                                                   self.connected_devices, log))
        log.info("auth daemon listening on %s: %d devices of registry %s", path, len(self.devices), s.registry_id)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for w in list(self._connections):
            w.close()  # their handlers see the end and return
        for _ in range(10):
            if not self._connections:
                break
            await asyncio.sleep(0.01)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._control is not None:
            self._control.loop_stop()
            self._control.disconnect()
        with contextlib.suppress(OSError):
            Path(self.settings.auth_socket).unlink()

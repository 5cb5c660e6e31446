"""The bridge service: Mosquitto ⇄ Pub/Sub, at least once (the message formats: docs/messages.md).

Device → cloud. A privileged MQTT client (user ``bridge``, client id ``iotbridge:bridge:{host}``) keeps a
persistent session (clean session off, QoS 1) on the loopback listener, subscribed to ``/devices/+/events/#``
(which also matches ``/devices/+/events``) and ``/devices/+/state``. Each message is published to Pub/Sub —
telemetry to the telemetry topic or the first matching subfolder route, state to the state topic — with IoT
Core's attributes taken from the topic's device id, which the broker's ACL guarantees is the authenticated
device. Messages are batched per topic (:mod:`iotbridge.bridge.batching`); the broker gets each message's PUBACK
(paho manual ack) only after the Pub/Sub publish request holding it succeeded; a request that failed for a
passing reason is retried until it succeeds. Killed mid-stream, the bridge loses nothing: Mosquitto redelivers every
unacknowledged message to the persistent session when it reconnects (duplicates possible, counted downstream).

A message Pub/Sub can never accept (an attribute over its limits, :mod:`iotbridge.bridge.limits`) is not retried:
it would hold its batch mates and, redelivered by the persistent session, the broker's in-flight window forever.
Such a message is checked before it joins any publish request, and a message Pub/Sub refuses anyway
(INVALID_ARGUMENT, isolated from its batch mates by the batcher) is treated alike: it goes to the stack's
``dead-letter`` topic with its data untouched, its attributes cut to fit, and the reason as ``error`` /
``errorDetail`` / ``failedBy`` / ``mqttTopic`` attributes — and is acknowledged to the broker only once the
dead-letter topic has it. Should the dead-letter topic refuse that copy too, it gets the record without the data
(``dataDroppedBytes``); only if it refuses even that is the message acknowledged with nothing but an error line.

Cloud → device. Configs and commands arrive on the ``device-commands`` topic, addressed to the host that holds the
device (``hostId``); each host's bridge reads it through a subscription of its own (``{prefix}-device-commands-{host}``)
filtered on its host id, created at start, deleted at a clean stop, and kept alive by a liveness record
(:mod:`iotbridge.bridge.fanout`), locally and in the cloud alike.
Configs are published retained at QoS 1 on ``/devices/{id}/config`` (latest version only: a version not newer
than the one this bridge last published is skipped); commands at QoS 1, not retained, on
``/devices/{id}/commands[/{subfolder}]`` — Mosquitto delivers them only to a connected subscriber, and device
sessions are clean, so nothing is stored. The front asks for a config sync (``iotbridge/sync``) whenever a
device connects, which covers hosts that joined after the config was fanned out and a broker that lost state.
Sync requests waiting next to each other in the config queue (a reconnect storm) are read together, up to
``SYNC_BATCH`` at a time: one batched read of the device index and two per registry (devices, then their configs)
instead of three reads each; they are still applied one by one in queue order, and a config delivery or a
forgotten device queued between two of them splits the batch, so each device sees its work in the order it came.

Registry activity (last event / state) is coalesced and written every few seconds, not per message.

The broker's queues are bounded (``max_queued_messages`` / ``max_queued_bytes``): during a long Pub/Sub outage the
bridge's own session is the one that fills, and Mosquitto then drops messages it has already acknowledged to
devices. The service follows the broker's ``$SYS`` tree: ``broker_stored_messages`` / ``broker_stored_bytes``
(the fill level; a warning once they pass half the bound), ``broker_dropped_messages`` (Mosquitto's own counter)
and, for each "Outgoing messages are being dropped for client X" notice, an error line naming the client and the
``broker_queue_full`` counter — in ``service-stats.json`` and the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as paho
from google.cloud import pubsub_v1
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge import spec
from iotbridge.bridge import fanout, limits, registrar
from iotbridge.bridge.batching import Batch, Batcher, raw_message
from iotbridge.bridge.front import SYNC_AGAIN, SYNC_GONE, SYNC_SUBSCRIBED, SYNC_TOPIC, no_delay
from iotbridge.bridge.settings import DROPPING_NOTICE, BridgeSettings
from iotbridge.registry import (
    ConfigVersion,
    DeviceNotFound,
    Registry,
    RegistrySettings,
    registries_of,
    registry_of,
    validate_device_id,
)

log = logging.getLogger("iotbridge.bridge")

FANOUT_KIND_CONFIG = spec.FANOUT_KIND_CONFIG
FANOUT_KIND_COMMAND = spec.FANOUT_KIND_COMMAND
DEVICE_CACHE_TTL_S = 300.0
REGISTRY_FLUSH_S = 2.0
RETRY_MAX_S = 30.0
# The longest wait between two attempts at making this host's delivery subscription again (and pulling from it).
RESUBSCRIBE_MAX_S = 60.0
STATS_EVERY_S = 0.5
COMMAND_MAX_AGE_S = 60.0
# Config sync requests and deliveries read together at most (the reads of a batch cost 0.28-0.33 ms CPU per device at
# 64, against 1.6-1.7 ms one at a time); a batch waits for nothing: it is what already sits in the queue.
SYNC_BATCH = 64
PUBLISH_TIMEOUT_S = 30.0  # a batch's retained configs acknowledged by the broker within this, or failed
SYS_LOG_NOTICE = "$SYS/broker/log/N"
SYS_GAUGES = {
    "$SYS/broker/store/messages/count": "broker_stored_messages",
    "$SYS/broker/store/messages/bytes": "broker_stored_bytes",
    "$SYS/broker/publish/messages/dropped": "broker_dropped_messages",
}
QUEUE_WARN_FRACTION = 0.5
DEAD_LETTERED_BY = "bridge"
PUBSUB_REFUSED = "pubsub_invalid_argument"


SETTINGS_TTL_S = 30.0  # a registry's routes changed through the admin API apply within this


@dataclass(frozen=True)
class Who:
    """The numeric id and registry of the device a message came from."""

    num_id: str
    registry_id: str


NOBODY = Who("", "")


@dataclass(frozen=True)
class SyncRequest:
    """A device's config sync request (``iotbridge/sync``), as queued for the config worker."""

    device_id: str
    mid: int
    qos: int
    gen: int
    subscribed: bool = False
    again: bool = False


@dataclass(frozen=True)
class ConfigDelivery:
    """A config version this host's delivery subscription handed it for a device, as queued for the config worker;
    ``message`` (the Pub/Sub message) is acked once the broker has the config (or the device is unknown), nacked
    (redelivered) when the read or the publish failed."""

    device_id: str
    version: int
    data: bytes
    message: Any  # noqa: ANN401 - a pubsub_v1 Message


@dataclass(frozen=True)
class ConfigPublish:
    """A retained config publish of a batch, sent and not yet known to be acknowledged by the broker."""

    device_id: str
    version: int
    info: paho.MQTTMessageInfo


# What a sync read found for a device: its latest config, None (no config), or why there is no answer
# (DeviceNotFound, or the read's failure).
SyncRead = ConfigVersion | None | Exception
ConfigRead = SyncRequest | ConfigDelivery  # work that reads a device's latest config: batched (_apply_configs)
ConfigWork = tuple[str, Callable[[], None] | ConfigRead]


@dataclass(frozen=True)
class Parsed:
    device_id: str
    kind: str  # "events" | "state"
    sub_folder: str
    gateway_id: str = ""  # the gateway that published it for the device (a relayed topic), else ""


def parse_topic(topic: str) -> Parsed | None:
    """A device's events or state topic, or the relayed topic of a gateway's (iotbridge.spec's topic layout)."""
    relayed = spec.parse_relayed_topic(topic)
    if relayed is not None:
        gateway_id, device_id, kind, sub_folder = relayed
    else:
        plain = spec.parse_device_topic(topic)
        if plain is None:
            return None
        gateway_id, (device_id, kind, sub_folder) = "", plain
    if kind not in spec.DEVICE_PUBLISHES:
        return None
    return Parsed(device_id, kind, sub_folder, gateway_id)


class BridgeService:
    def __init__(self, settings: BridgeSettings, registry: Registry, password: str,
                 publisher: pubsub_v1.PublisherClient | None = None,
                 subscriber: pubsub_v1.SubscriberClient | None = None):
        self.s = settings
        self.registry = registry
        project = settings.project
        self.publisher = publisher or pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.005))
        self.subscriber = subscriber or pubsub_v1.SubscriberClient()
        self.telemetry_topic = self.publisher.topic_path(project, spec.topic_name(settings.prefix, "telemetry"))
        self.state_topic = self.publisher.topic_path(project, spec.topic_name(settings.prefix, "state"))
        self.routes = {r.sub_folder: self.publisher.topic_path(project, r.topic) for r in settings.routes}
        self.fanout_topic = self.publisher.topic_path(project, spec.topic_name(settings.prefix, "device-commands"))
        self.dead_letter_topic = self.publisher.topic_path(project, spec.topic_name(settings.prefix, "dead-letter"))
        self.fanout_sub = ""  # this host's own delivery subscription, created (or reused) in start()
        # How long the next making-again waits: doubled (to RESUBSCRIBE_MAX_S) each time a pull ends again before a
        # message came, so a pull refused until a new subscriber grant applies does not call the registrar every
        # second; back to 0 once a message arrives.
        self._resubscribe_delay = 0.0
        self._alive_time: Any = None  # the update time of this host's last liveness write (mark_host_gone needs it)
        self._devices: dict[str, tuple[float, Who]] = {}  # device id -> (fetched at, its numeric id and registry)
        self._registries: dict[str, Registry] = {settings.registry_id: registry}
        self._state_topics = {self.state_topic}  # every topic a state went to (dead letters name the MQTT topic)
        self._settings: dict[str, tuple[float, RegistrySettings | None]] = {}  # registry id -> (fetched at, settings)
        self._devices_lock = threading.Lock()
        self._work: queue.Queue[tuple[paho.MQTTMessage, int] | None] = queue.Queue()
        # Bumped on every broker (re)connect. An ack for a message received on an earlier connection is not
        # sent: the broker redelivers that message with the same packet id, which could by then name another
        # message — acking it before Pub/Sub accepted it would break at-least-once.
        self._generation = 0
        self._config_work: queue.Queue[ConfigWork | None] = queue.Queue()
        self._published_config: dict[str, int] = {}
        self._activity_lock = threading.Lock()
        self._events_seen: dict[str, tuple[str, datetime]] = {}  # device id -> (registry id, when)
        self._states_seen: dict[str, tuple[str, bytes, datetime]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pull_future = None
        self.stats_lock = threading.Lock()
        self.stats = {"received": 0, "forwarded": 0, "acked": 0, "publish_errors": 0, "configs": 0, "commands": 0,
                      # messages this host's delivery subscription handed it, and those of them for another host
                      "delivery_received": 0, "delivery_foreign": 0, "delivery_resubscribed": 0,
                      "dead_lettered": 0, "dead_letter_refused": 0, "broker_queue_full": 0,
                      "broker_stored_messages": 0, "broker_stored_bytes": 0, "broker_dropped_messages": 0,
                      # batched config reads, and the sync requests and deliveries they served
                      "sync_reads": 0, "sync_batch_items": 0}
        self._queue_warned = False
        self.mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:bridge:{settings.host_id}",
                                clean_session=False, manual_ack=True)
        self.mqtt.username_pw_set("bridge", password)
        self.mqtt.max_inflight_messages_set(1000)
        self.mqtt.max_queued_messages_set(0)
        # paho annotates the delays as int, but any number of seconds works: it adds them to time.monotonic().
        self.mqtt.reconnect_delay_set(cast(int, 0.2), 5)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_socket_open = no_delay
        # Device → cloud publishing: raw protobuf batches, the broker acked per batch (see batching.py).
        self.batcher = Batcher(self.publisher.api.publish, self._on_batch_sent, self._on_batch_failed,
                               self._on_batch_rejected)

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self, workers: int = 2) -> None:
        self._claim_delivery()
        self._thread(self._alive_loop, "alive")
        for i in range(workers):
            self._thread(self._forward_loop, f"forward-{i}")
        self._thread(self._config_loop, "configs")
        self._thread(self._activity_loop, "registry")
        if self.s.workdir:
            self._thread(self._stats_loop, "stats")
        if self.s.connected_devices_metric == "cloud":
            self._thread(self._metrics_loop, "metrics")
        self.mqtt.connect_async(self.s.broker_host, self.s.broker_port, keepalive=30)
        self.mqtt.loop_start()
        self._subscribe()
        log.info("bridge %s started: broker %s:%d, telemetry %s", self.s.host_id, self.s.broker_host,
                 self.s.broker_port, self.telemetry_topic)

    def stop(self) -> None:
        self._stop.set()
        if self._pull_future is not None:
            self._pull_future.cancel()
        if self.fanout_sub:
            # A clean stop leaves nothing behind: no subscription, no liveness record (the sweep's job otherwise).
            try:
                if self.s.registrar_url:
                    registrar.RegistrarClient(self.s.registrar_url).release()
                else:
                    fanout.delete_host_subscription(self.subscriber, self.s.project, self.s.prefix, self.s.host_id)
                fanout.mark_host_gone(self.registry.client, self.s.registry_id, self.s.host_id, self._alive_time)
                log.info("deleted delivery subscription %s", self.fanout_sub)
            except Exception as exc:  # noqa: BLE001 - the expiration policy and the sweep remove it anyway
                log.warning("delivery subscription %s not deleted: %s", self.fanout_sub, exc)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        self.batcher.stop()
        for _ in self._threads:
            self._work.put(None)
            self._config_work.put(None)
        self._flush_activity()

    def _claim_delivery(self) -> None:
        """This host's liveness record, and its own filtered delivery subscription (created, or reused)."""
        self._alive_time = fanout.mark_host_alive(self.registry.client, self.s.registry_id, self.s.host_id,
                                                  self.s.host_alive_s)
        if self.s.registrar_url:
            self.fanout_sub = registrar.RegistrarClient(self.s.registrar_url).claim()
        else:
            self.fanout_sub = fanout.ensure_host_subscription(self.subscriber, self.s.project, self.s.prefix,
                                                              self.s.host_id)
        log.info("delivery subscription %s (filter %s)", self.fanout_sub, spec.host_filter(self.s.host_id))

    def _subscribe(self) -> None:
        self._pull_future = future = self.subscriber.subscribe(
            self.fanout_sub, self._on_fanout, flow_control=pubsub_v1.types.FlowControl(max_messages=100))
        future.add_done_callback(self._pull_ended)

    def _pull_ended(self, future: Any) -> None:  # noqa: ANN401 - a StreamingPullFuture
        """The delivery pull stopped while the service runs: its subscription was deleted (a sweep that judged this
        host dead while Firestore was out of its reach, an operator) or Pub/Sub ended the stream for good. The host
        makes its subscription again and reads on; configs published meanwhile are delivered by the config sync when
        their devices next subscribe, and a command published meanwhile went to no subscriber."""
        if self._stop.is_set() or future.cancelled():
            return
        delay, self._resubscribe_delay = self._resubscribe_delay, min(max(2 * self._resubscribe_delay, 1.0),
                                                                      RESUBSCRIBE_MAX_S)
        log.warning("delivery subscription %s: pull ended (%s); making it again in %.0f s", self.fanout_sub,
                    future.exception(), delay)
        threading.Thread(target=self._resubscribe, args=(delay,), name="resubscribe", daemon=True).start()

    def _resubscribe(self, after_s: float = 0.0) -> None:
        self._stop.wait(after_s)
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._claim_delivery()
                self._subscribe()
                with self.stats_lock:
                    self.stats["delivery_resubscribed"] += 1
                return
            except Exception as exc:  # noqa: BLE001 - Pub/Sub or Firestore away: try again, backing off
                log.warning("delivery subscription not made again (%s); retrying in %.0f s", exc, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, RESUBSCRIBE_MAX_S)

    def _thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _alive_loop(self) -> None:
        while not self._stop.wait(self.s.host_alive_s / 3):
            try:
                self._alive_time = fanout.mark_host_alive(self.registry.client, self.s.registry_id,
                                                          self.s.host_id, self.s.host_alive_s)
            except Exception as exc:  # noqa: BLE001 - Firestore briefly away: the record still has two thirds to run
                log.warning("liveness record not renewed: %s", exc)

    # ---------------------------------------------------------------------------------- device → cloud

    def _on_connect(self, client: paho.Client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.error("broker refused the bridge: %s", reason_code)
            return
        # A restarted broker may have lost retained configs: let the next sync republish them.
        self._published_config.clear()
        self._generation += 1
        relayed = spec.relayed_topic("+", "+", spec.EVENTS)
        client.subscribe([("/devices/+/events/#", 1), ("/devices/+/state", 1), (SYNC_TOPIC, 1),
                          (relayed + "/#", 1), (spec.relayed_topic("+", "+", spec.STATE), 1),
                          # QoS 0: the broker's own reports are not worth queueing for a later session.
                          (SYS_LOG_NOTICE, 0), *((t, 0) for t in SYS_GAUGES)])
        log.info("bridge connected to broker (session present: %s)", flags.session_present)

    def _on_message(self, client: paho.Client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        if msg.topic.startswith("$SYS/"):
            self._on_broker_report(msg.topic, msg.payload.decode(errors="replace"))
            return
        if msg.topic == SYNC_TOPIC:
            text = msg.payload.decode(errors="replace")
            mid, qos, gen = msg.mid, msg.qos, self._generation
            if text.endswith(SYNC_GONE):
                gone = text.removesuffix(SYNC_GONE)
                self._config_work.put((gone, lambda: self._forget_config(gone, mid, qos, gen)))
                return
            device_id = text.removesuffix(SYNC_SUBSCRIBED).removesuffix(SYNC_AGAIN)
            subscribed, again = text.endswith(SYNC_SUBSCRIBED), text.endswith(SYNC_AGAIN)
            self._config_work.put((device_id, SyncRequest(device_id, mid, qos, gen, subscribed, again)))
            return
        gen = self._generation
        parsed = parse_topic(msg.topic)
        who = self._cached_who(parsed.device_id) if parsed is not None else NOBODY
        if who is None:
            # Needs a registry read, which must not stall the MQTT network thread: a worker does it.
            self._work.put((msg, gen))
            return
        # Known device: forwarded right here, without a hand-over to another thread (the queue
        # hop was a sixth of the service's CPU per message).
        with self.stats_lock:
            self.stats["received"] += 1
        try:
            self._forward(msg, gen, parsed, who)
        except Exception:  # paho would stop its loop; the message stays unacked and is redelivered
            log.exception("forwarding %s failed", msg.topic)

    def _on_broker_report(self, topic: str, text: str) -> None:
        if topic == SYS_LOG_NOTICE:
            _, found, client = text.partition(DROPPING_NOTICE)
            if found:
                with self.stats_lock:
                    self.stats["broker_queue_full"] += 1
                # Mosquitto says it once per episode, until that client's queue has room again.
                log.error("broker queue full: Mosquitto is dropping queued QoS 1 messages for client %r "
                          "(max_queued_messages %d, max_queued_bytes %d); for the bridge's own session these are "
                          "device messages the devices already had their PUBACK for",
                          client.strip().rstrip("."), self.s.max_queued_messages, self.s.max_queued_bytes)
            return
        key = SYS_GAUGES.get(topic)
        if key is None or not text.strip().isdigit():
            return
        with self.stats_lock:
            self.stats[key] = int(text)
            messages, size = self.stats["broker_stored_messages"], self.stats["broker_stored_bytes"]
        fill = max(messages / self.s.max_queued_messages, size / self.s.max_queued_bytes)
        if fill >= QUEUE_WARN_FRACTION and not self._queue_warned:
            log.warning("broker holds %d messages (%d bytes): %.0f%% of a client's queue bound; at 100%% the bridge's "
                        "session loses messages (Pub/Sub unreachable?)", messages, size, 100 * fill)
        self._queue_warned = fill >= QUEUE_WARN_FRACTION

    def _cached_who(self, device_id: str) -> Who | None:
        with self._devices_lock:
            hit = self._devices.get(device_id)
        if hit and time.monotonic() - hit[0] < DEVICE_CACHE_TTL_S:
            return hit[1]
        return None

    def registry_for(self, registry_id: str) -> Registry:
        """One of the deployment's registries, sharing the Firestore client."""
        if registry_id not in self._registries:
            self._registries[registry_id] = Registry(self.s.project, registry_id, self.s.region,
                                                     client=self.registry.client, deployment=self.s.registry_id)
        return self._registries[registry_id]

    def device_registry(self, device_id: str) -> Registry:
        """The registry a device id belongs to (docs/admin-api.md: device ids are unique across registries)."""
        cached = self._cached_who(device_id)
        if cached is not None and cached.registry_id:
            return self.registry_for(cached.registry_id)
        return self.registry_for(registry_of(self.registry.client, self.s.registry_id, device_id)
                                 or self.s.registry_id)

    def _who(self, device_id: str) -> Who:
        cached = self._cached_who(device_id)
        if cached is not None:
            return cached
        now = time.monotonic()
        with self._devices_lock:
            hit = self._devices.get(device_id)
        try:
            try:  # most devices are in the deployment's own registry: one read, as with a single registry
                who = Who(self.registry.get_device(device_id).num_id, self.s.registry_id)
            except DeviceNotFound:
                registry = self.registry_for(registry_of(self.registry.client, self.s.registry_id, device_id)
                                             or self.s.registry_id)
                who = Who(registry.get_device(device_id).num_id, registry.registry_id)
        except DeviceNotFound:
            # Authenticated when it was published, deleted since: still forwarded, never dropped.
            who = hit[1] if hit else Who("", self.s.registry_id)
        with self._devices_lock:
            self._devices[device_id] = (now, who)
        return who

    def _registry_settings(self, registry_id: str) -> RegistrySettings | None:
        """A registry's routes, re-read at most every ``SETTINGS_TTL_S``; None when unreadable or absent."""
        hit = self._settings.get(registry_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < SETTINGS_TTL_S:
            return hit[1]
        try:
            settings: RegistrySettings | None = self.registry_for(registry_id).get_settings()
        except Exception as exc:  # noqa: BLE001 - routes fall back to the stack's until the registry is readable
            log.debug("settings of registry %s: %s", registry_id, exc)
            settings = hit[1] if hit else None
        self._settings[registry_id] = (now, settings)
        return settings

    def _topic_of(self, registry_id: str, kind: str, sub_folder: str) -> str:
        """Where a device message goes: its registry's ``stateNotificationConfig`` / ``eventNotificationConfigs``
        (the subfolder's route, else the one without ``subfolderMatches``); the stack's topics and routes for a
        registry that names none."""
        settings = self._registry_settings(registry_id)
        if kind == "state":
            topic = settings.state_topic if settings is not None and settings.state_topic else self.state_topic
            self._state_topics.add(topic)
            return topic
        routed = settings.event_topic(sub_folder) if settings is not None and settings.event_routes else None
        return routed or self.routes.get(sub_folder, self.telemetry_topic)

    def _forward_loop(self) -> None:
        while True:
            items = [self._work.get()]
            # Take what else is queued in one go: one stats update per chunk instead of per message.
            while len(items) < 500:
                try:
                    items.append(self._work.get_nowait())
                except queue.Empty:
                    break
            work = [i for i in items if i is not None]
            with self.stats_lock:
                self.stats["received"] += len(work)
            for msg, gen in work:
                try:
                    parsed = parse_topic(msg.topic)
                    self._forward(msg, gen, parsed, self._who(parsed.device_id) if parsed else NOBODY)
                except Exception:  # keep the worker alive; the message stays unacked and is redelivered
                    log.exception("forwarding %s failed", msg.topic)
            if len(work) < len(items):
                return

    def _forward(self, msg: paho.MQTTMessage, gen: int, parsed: Parsed | None, who: Who) -> None:
        if parsed is None:
            log.warning("unexpected topic %r acknowledged without forwarding", msg.topic)
            self._ack(msg.mid, msg.qos, gen)
            return
        attrs = {
            "deviceId": parsed.device_id,
            "deviceNumId": who.num_id,
            "deviceRegistryId": who.registry_id or self.s.registry_id,
            "deviceRegistryLocation": self.s.region,
            "projectId": self.s.project,
        }
        if parsed.gateway_id:
            attrs["gatewayId"] = parsed.gateway_id
        topic = self._topic_of(attrs["deviceRegistryId"], parsed.kind, parsed.sub_folder)
        if parsed.kind != "state" and parsed.sub_folder:
            attrs["subFolder"] = parsed.sub_folder
        payload = bytes(msg.payload)
        token = (msg.mid, msg.qos, gen)
        refused = limits.message_violation(payload, attrs)
        if refused is not None:
            self._dead_letter(payload, attrs, msg.topic, refused, token)
            return
        now = datetime.now(UTC)
        with self._activity_lock:
            if parsed.kind == "state":
                self._states_seen[parsed.device_id] = (attrs["deviceRegistryId"], payload, now)
            else:
                self._events_seen[parsed.device_id] = (attrs["deviceRegistryId"], now)
        self.batcher.add(topic, raw_message(payload, attrs), token)

    def _dead_letter(self, data: bytes, attrs: dict[str, str], mqtt_topic: str, why: tuple[str, str],
                     token: tuple[int, int, int]) -> None:
        """Send a message Pub/Sub cannot take to the dead-letter topic, in a form it can take; the broker gets the
        PUBACK once the dead-letter topic has it (``_on_batch_sent``)."""
        reason, detail = why
        cap = limits.MAX_ATTRIBUTE_VALUE_BYTES
        out = {limits.clip_utf8(k, limits.MAX_ATTRIBUTE_KEY_BYTES): limits.clip_utf8(v, cap)
               for k, v in list(attrs.items())[:limits.MAX_ATTRIBUTES - 5]}
        out.update(error=reason, errorDetail=limits.clip_utf8(detail, cap), failedBy=DEAD_LETTERED_BY,
                   mqttTopic=limits.clip_utf8(mqtt_topic, cap))
        room = limits.MAX_MESSAGE_BYTES - sum(len(k.encode()) + len(v.encode()) for k, v in out.items()) - 64
        if len(data) > room:
            out["dataTruncatedFrom"] = str(len(data))
            data = data[:room]
        with self.stats_lock:
            self.stats["dead_lettered"] += 1
        log.warning("message of device %s on %.120r dead-lettered: %s (%s)", attrs.get("deviceId", "?"),
                    mqtt_topic, reason, detail)
        self.batcher.add(self.dead_letter_topic, raw_message(data, out, cache=False), token)

    def _on_batch_rejected(self, batch: Batch, exc: BaseException) -> None:
        """Pub/Sub refused this one message for good (its batch mates went on without it)."""
        message, token = batch.messages[0], batch.tokens[0]
        if batch.topic == self.dead_letter_topic:
            if message.data:
                # Refused for what it carries: keep the record of it (who, where, why, how much) without the data.
                attrs = {**message.attributes, "dataDroppedBytes": str(len(message.data)),
                         "dataDroppedBecause": limits.clip_utf8(str(exc), limits.MAX_ATTRIBUTE_VALUE_BYTES)}
                self.batcher.add(self.dead_letter_topic, raw_message(b"", attrs, cache=False), token)
                return
            # Even the bare record was refused: nothing left to retry; say so loudly and release the broker.
            log.error("dead-letter topic refused the record of a message of device %s (%s); acknowledged without "
                      "forwarding", message.attributes.get("deviceId", "?"), exc)
            with self.stats_lock:
                self.stats["dead_letter_refused"] += 1
            self._ack(*token)
            return
        attrs = dict(message.attributes)
        device = attrs.get("deviceId", "")
        if batch.topic in self._state_topics:
            mqtt_topic = spec.device_topic(device, spec.STATE)
        else:
            mqtt_topic = spec.device_topic(device, spec.EVENTS, attrs.get("subFolder", ""))
        self._dead_letter(bytes(message.data), attrs, mqtt_topic, (PUBSUB_REFUSED, str(exc)), token)

    def _on_batch_sent(self, batch: Batch) -> None:
        for mid, qos, gen in batch.tokens:
            self._ack(mid, qos, gen, count=False)
        with self.stats_lock:
            self.stats["forwarded"] += len(batch.tokens)
            self.stats["acked"] += len(batch.tokens)

    def _on_batch_failed(self, batch: Batch, exc: BaseException) -> None:
        with self.stats_lock:
            self.stats["publish_errors"] += len(batch.tokens)
        if self._stop.is_set() or all(gen != self._generation for _, _, gen in batch.tokens):
            return  # unacked: the broker redelivers it to this session or the next one
        delay = min(RETRY_MAX_S, 0.5 * 2 ** batch.attempt)
        batch.attempt += 1
        log.warning("Pub/Sub publish of %d messages failed (%s); retrying in %.1fs", len(batch.tokens),
                    type(exc).__name__, delay)
        timer = threading.Timer(delay, self.batcher.send, (batch,))
        timer.daemon = True
        timer.start()

    def _ack(self, mid: int, qos: int, gen: int, count: bool = True) -> None:
        if qos > 0 and gen == self._generation:
            self.mqtt.ack(mid, qos)
        if count:
            with self.stats_lock:
                self.stats["acked"] += 1

    # ---------------------------------------------------------------------------------- registry activity

    def _activity_loop(self) -> None:
        while not self._stop.wait(REGISTRY_FLUSH_S):
            self._flush_activity()

    def _stats_loop(self) -> None:
        """Counters for operators and fault tests: ``{workdir}/service-stats.json``, rewritten every second."""
        path = Path(self.s.workdir) / "service-stats.json"
        while not self._stop.wait(STATS_EVERY_S):
            with self.stats_lock:
                data = json.dumps({**self.stats, "time": time.time(), "pending": self._work.qsize()})
            tmp = path.with_suffix(".tmp")
            tmp.write_text(data)
            tmp.replace(path)

    def _metrics_loop(self) -> None:
        """The broker's queue gauges to Cloud Monitoring, once a minute (iotbridge.bridge.metrics)."""
        from iotbridge.bridge import metrics

        try:
            reporter = metrics.BrokerQueueReporter(metrics.ConnectedDevicesReporter(
                self.s.project, self.s.registry_id, self.s.host_id, metrics.gce_instance_labels()))
        except Exception as exc:  # noqa: BLE001 - not on Compute Engine, or no credentials
            log.warning("broker queue gauges go to service-stats.json and the log only: %s", exc)
            return
        while not self._stop.wait(metrics.INTERVAL_S):
            with self.stats_lock:
                stats = dict(self.stats)
            try:
                reporter.report(stats)
            except Exception as exc:  # noqa: BLE001 - a lost point must not stop the bridge
                log.warning("broker queue gauges not written: %s", exc)

    def _flush_activity(self) -> None:
        with self._activity_lock:
            events, self._events_seen = self._events_seen, {}
            states, self._states_seen = self._states_seen, {}
        for device_id, (registry_id, when) in events.items():
            try:
                self.registry_for(registry_id).record_event(device_id, when)
            except Exception as exc:  # noqa: BLE001 - activity timestamps are best effort, like IoT Core's
                log.debug("record_event %s: %s", device_id, exc)
        for device_id, (registry_id, data, when) in states.items():
            try:
                self.registry_for(registry_id).record_state(device_id, data, when)
            except Exception as exc:  # noqa: BLE001 - the same for the last state
                log.debug("record_state %s: %s", device_id, exc)

    # ---------------------------------------------------------------------------------- cloud → device

    def _on_fanout(self, message) -> None:  # noqa: ANN001 - pubsub_v1 Message
        self._resubscribe_delay = 0.0  # the pull works
        with self.stats_lock:
            self.stats["delivery_received"] += 1
        try:
            fan = spec.FanoutMessage.from_attributes(dict(message.attributes))
        except spec.MessageError as exc:
            log.warning("fan-out message dropped: %s", exc)
            message.ack()
            return
        if fan.host_id and fan.host_id != self.s.host_id:
            # For another host: Pub/Sub's filter keeps these out of this host's subscription; an unfiltered one (the
            # Pub/Sub emulator stores a filter without applying it) still hands them over, and the device is not here.
            with self.stats_lock:
                self.stats["delivery_foreign"] += 1
            message.ack()
            return
        kind, device_id, sub_folder, version = fan.kind, fan.device_id, fan.sub_folder, fan.version
        if kind == FANOUT_KIND_CONFIG:
            self._config_work.put((device_id, ConfigDelivery(device_id, version, bytes(message.data), message)))
        elif kind == FANOUT_KIND_COMMAND:
            age = (datetime.now(UTC) - message.publish_time).total_seconds()
            if age > COMMAND_MAX_AGE_S:
                # IoT Core's commands were live-only: a command found in a backlog is not delivered late.
                log.warning("command for %s dropped: %.0fs old", device_id, age)
                message.ack()
                return
            topic = spec.device_topic(device_id, spec.COMMANDS, sub_folder)
            info = self.mqtt.publish(topic, bytes(message.data), qos=1, retain=False)
            info.wait_for_publish(timeout=30)
            with self.stats_lock:
                self.stats["commands"] += 1
            message.ack()

    def _config_loop(self) -> None:
        item: ConfigWork | None = self._config_work.get()
        while item is not None:
            work = item[1]
            if isinstance(work, SyncRequest | ConfigDelivery):
                # The sync requests and deliveries queued right behind this one join its read; the first other item
                # (or the stop mark) ends the batch and runs next, so nothing overtakes anything in the queue.
                batch, after, ended = [work], None, False
                while len(batch) < SYNC_BATCH:
                    try:
                        after = self._config_work.get_nowait()
                    except queue.Empty:
                        break
                    if after is not None and isinstance(after[1], SyncRequest | ConfigDelivery):
                        batch.append(after[1])
                        continue
                    ended = True
                    break
                self._apply_configs(batch)
                item = after if ended else self._config_work.get()
                continue
            try:
                work()
            except Exception:
                log.exception("config delivery for %s failed", item[0])
            item = self._config_work.get()

    def _deliver_config(self, device_id: str, version: int, data: bytes, message) -> None:  # noqa: ANN001
        """One delivery on its own, as a batch of one (the config worker batches those it finds queued together)."""
        self._apply_configs([ConfigDelivery(device_id, version, data, message)])

    def _apply_configs(self, batch: list[ConfigRead]) -> None:
        """Sync requests and deliveries read together, their configs published in queue order without waiting for
        each acknowledgement, then each request acked (and each delivery acked or nacked) in queue order, once.

        Publishing the batch before waiting keeps each device's configs in order:

        - every publish of a batch for a device carries the one version the batch's read found (a delivery its own
          version if that is newer, which cannot be: the read was made after the delivery's registry write);
          different versions of a device go out in different batches, and a batch starts after the broker
          acknowledged every publish of the one before;
        - even so, one connection's QoS 1 publishes reach the retained store in the order they were sent: paho
          sends (and after a reconnect resends) them in that order, Mosquitto handles a connection's packets in
          order;
        - whether a publish is needed is decided on what this batch has already sent (``_published_config`` is set
          when a publish is sent and undone if the broker does not acknowledge it), as one at a time did;
        - a request or delivery is acked only after its publish was acknowledged (or failed), as one at a time:
          a sync request the broker lost with a failed publish is not redelivered, a failed delivery is.
        """
        with self.stats_lock:
            self.stats["sync_reads"] += 1
            self.stats["sync_batch_items"] += len(batch)
        try:
            reads = self._read_configs([w.device_id for w in batch])
        except Exception as exc:  # noqa: BLE001 - an unforeseen failure: every request gets it as its answer
            reads = {w.device_id: exc for w in batch}
        sent: list[tuple[ConfigRead, ConfigPublish | None | Exception]] = []
        inflight: dict[str, ConfigPublish] = {}  # device id -> this batch's last publish for it
        for work in batch:
            try:
                sent.append((work, self._start_config(work, reads[work.device_id], inflight)))
            except Exception as exc:  # noqa: BLE001 - this request or delivery fails alone (logged below)
                sent.append((work, exc))
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        confirmed: dict[int, bool] = {}  # id of a publish -> acknowledged (two requests may rely on one publish)
        for work, outcome in sent:
            if isinstance(outcome, ConfigPublish):
                if id(outcome) not in confirmed:
                    confirmed[id(outcome)] = self._confirmed(outcome, deadline)
                if not confirmed[id(outcome)]:
                    outcome = TimeoutError(f"broker did not acknowledge config v{outcome.version} of {work.device_id}")
            if isinstance(work, SyncRequest):
                if isinstance(outcome, Exception):
                    log.error("config sync for %s failed: %s", work.device_id, outcome, exc_info=outcome)
                self._ack(work.mid, work.qos, work.gen, count=False)
            elif isinstance(outcome, Exception):
                log.error("config delivery for %s failed: %s", work.device_id, outcome, exc_info=outcome)
                work.message.nack()  # redelivered by Pub/Sub
            else:
                work.message.ack()

    def _start_config(self, work: ConfigRead, read: SyncRead,
                      inflight: dict[str, ConfigPublish]) -> ConfigPublish | None:
        """Send what ``work`` needs published, given its device's read: the publish in flight it depends on (its
        own, or the batch's earlier one of the same version), None when nothing is to be published; raises why it
        failed."""
        device_id = work.device_id
        if isinstance(read, DeviceNotFound):
            return None  # a delivery's message is acked: the device is gone
        if isinstance(read, Exception):
            raise read
        if isinstance(work, ConfigDelivery):
            # Pub/Sub does not keep order and a slot may hold a backlog: the registry says what is latest.
            version, data = work.version, work.data
            if read is not None and read.version > version:
                version, data = read.version, read.data
            return self._send_config(device_id, version, data, inflight)
        subscribed, again = work.subscribed or work.again, work.again
        if read is None:
            return None
        if not read.data and not subscribed and device_id not in self._published_config:
            return None  # nothing retained here to replace; the device gets it when it subscribes (below)
        # The broker keeps no empty retained message: a device that subscribes gets an empty latest config from this
        # publish, as IoT Core sent it to every subscriber.
        return self._send_config(device_id, read.version, read.data, inflight,
                                 again=again or (subscribed and not read.data))

    def _send_config(self, device_id: str, version: int, data: bytes, inflight: dict[str, ConfigPublish],
                     again: bool = False) -> ConfigPublish | None:
        """Publish the version retained unless it was published before (``again``: publish it anyway); not waiting
        for the broker's acknowledgement (:meth:`_confirmed`). Published before in this batch: that publish, whose
        acknowledgement decides this request's outcome too."""
        if version <= self._published_config.get(device_id, 0) and not again:
            return inflight.get(device_id)
        info = self.mqtt.publish(spec.device_topic(device_id, spec.CONFIG), data, qos=1, retain=True)
        self._published_config[device_id] = version  # what the batch's next request for the device must see
        inflight[device_id] = ConfigPublish(device_id, version, info)
        return inflight[device_id]

    def _confirmed(self, sent: ConfigPublish, deadline: float) -> bool:
        """Whether the broker acknowledged ``sent`` by ``deadline``; if not, the device counts as not published
        here (its next sync publishes again)."""
        with contextlib.suppress(RuntimeError, ValueError):  # not sent at all (no connection): not published
            sent.info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
        if sent.info.is_published():
            with self.stats_lock:
                self.stats["configs"] += 1
            return True
        if self._published_config.get(sent.device_id) == sent.version:
            self._published_config.pop(sent.device_id, None)  # a reconnect (_on_connect) may have cleared it meanwhile
        return False

    def _forget_config(self, device_id: str, mid: int, qos: int, gen: int) -> None:
        """The device left this host: clear its retained config here, which later versions (sent to the host that
        holds the device) no longer update; if it comes back, the config sync publishes the registry's latest."""
        try:
            if self._published_config.pop(device_id, None) is not None:
                info = self.mqtt.publish(spec.device_topic(device_id, spec.CONFIG), b"", qos=1, retain=True)
                info.wait_for_publish(timeout=30)
        finally:
            self._ack(mid, qos, gen, count=False)

    def _read_configs(self, device_ids: list[str]) -> dict[str, SyncRead]:
        """Each device's latest config, read in batches: the registry of each device not cached, from one read of
        the device index; then each registry's devices together (:meth:`Registry.get_configs`). A failed read
        is the answer of each device it was for."""
        reads: dict[str, SyncRead] = {}
        registry_ids: dict[str, str] = {}
        unknown: list[str] = []
        for device_id in dict.fromkeys(device_ids):
            try:
                validate_device_id(device_id)
            except ValueError as exc:
                reads[device_id] = exc
                continue
            cached = self._cached_who(device_id)
            if cached is not None and cached.registry_id:
                registry_ids[device_id] = cached.registry_id
            else:
                unknown.append(device_id)
        if unknown:
            try:
                indexed = registries_of(self.registry.client, self.s.registry_id, unknown)
                registry_ids.update({d: indexed.get(d) or self.s.registry_id for d in unknown})
            except Exception as exc:  # noqa: BLE001 - each of these syncs fails with it, as its own read would
                reads.update(dict.fromkeys(unknown, exc))
        groups: dict[str, list[str]] = {}
        for device_id, registry_id in registry_ids.items():
            groups.setdefault(registry_id, []).append(device_id)
        for registry_id, ids in groups.items():
            registry = self.registry_for(registry_id)
            try:
                found = registry.get_configs(ids)
            except Exception as exc:  # noqa: BLE001 - the same, for this registry's devices
                reads.update(dict.fromkeys(ids, exc))
                continue
            for device_id in ids:
                reads[device_id] = found[device_id] if device_id in found else DeviceNotFound(
                    f"device {device_id!r} not found in registry {registry_id!r}")
        return reads

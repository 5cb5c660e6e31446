"""Cloud → device: configs and commands through the ``device-commands`` topic, sent to the host that holds the device.

The front writes a device's presence (``registries/{registry}/presence/{device}``: host, session, since, until) on
connect and removes it on disconnect. A config or command is published with that host as the ``hostId`` attribute,
and each broker host's bridge service reads the topic through a subscription of its own whose Pub/Sub filter is
``attributes.hostId = "{host}"`` (:func:`ensure_host_subscription`): a host receives only what its devices need.
Message format (docs/messages.md): data = the payload, untouched; attributes ``iotbridge.spec.FanoutMessage``.

- A config for a device connected nowhere is stored and not published: the device gets the latest version from
  the registry when it next connects (the front's config sync), on whichever host.
- A command for a device connected nowhere is refused (:class:`DeviceNotConnected`), as IoT Core's
  ``sendCommandToDevice`` did. A host that dies leaves its presence documents behind until their ``until`` (the
  token's ``exp``, at most 24 h); once its liveness record has run out (``HOST_ALIVE_S`` after its death) a command
  to such a device is refused too. Within that window it is accepted and not delivered.

Each host's subscription dead-letters what its host could not deliver after ``DELIVERY_ATTEMPTS``
(docs/broker-scaling.md, "What a host cannot deliver"), expires after ``SUBSCRIPTION_TTL_S`` without a subscriber
(the shortest expiration Pub/Sub allows), is deleted by the host on a clean stop, and :func:`sweep` deletes those
of hosts whose liveness record (``registries/{deployment}/bridge_hosts/{host}``, renewed by each running host) has
run out.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from google.cloud import firestore, pubsub_v1

from iotbridge import spec
from iotbridge.bridge.settings import HOST_ALIVE_S
from iotbridge.registry import ConfigVersion, Registry, validate_device_id
from iotbridge.registry import push_config as push_config_path

KIND_CONFIG = spec.FANOUT_KIND_CONFIG
KIND_COMMAND = spec.FANOUT_KIND_COMMAND
MAX_COMMAND_BYTES = 256 * 1024
# A presence record runs out with its session's token (IoT Core's JWTs live at most 24 h, plus its clock skew): a
# liveness record that ran out longer ago than this is named by no presence record and can go.
HOST_RECORD_KEEP_S = 24 * 3600 + 600


class DeviceNotConnected(RuntimeError):
    """A command was sent to a device that is not connected to any broker host."""


SUBSCRIPTION_TTL_S = 24 * 3600  # Pub/Sub's minimum expiration: a host gone this long loses its subscription
# A config or command its host cannot hand to Mosquitto is nacked (or its lease runs out) and redelivered, backing off
# from RETRY_BACKOFF_S[0] to RETRY_BACKOFF_S[1] seconds (Pub/Sub allows 0..600 each); after DELIVERY_ATTEMPTS
# (Pub/Sub allows 5..100) Pub/Sub forwards it to the stack's dead-letter topic instead of redelivering it for the
# message retention's 7 days. Ten attempts span about 40 minutes: longer than a Mosquitto restart, shorter than a
# week of one poison message holding its place. Nothing is lost that the registry holds: a config is its latest
# version there, sent again when the device next connects; a command was live-only and goes stale in minutes.
DELIVERY_ATTEMPTS = 10
RETRY_BACKOFF_S = (10, 600)


def _topic(publisher: pubsub_v1.PublisherClient, project: str, prefix: str) -> str:
    return topic_path(project, prefix)


def topic_path(project: str, prefix: str) -> str:
    return f"projects/{project}/topics/{spec.topic_name(prefix, 'device-commands')}"


def host_subscription(prefix: str, host_id: str) -> str:
    """The name of a host's own delivery subscription."""
    return f"{spec.topic_name(prefix, 'device-commands')}-{spec.validate_host_id(host_id)}"


def dead_letter_topic_path(project: str, prefix: str) -> str:
    """Where Pub/Sub forwards what a host's subscription could not deliver: the stack's dead-letter topic."""
    return f"projects/{project}/topics/{spec.topic_name(prefix, 'dead-letter')}"


def host_subscription_request(project: str, prefix: str, host_id: str) -> dict[str, Any]:
    """A host's delivery subscription as created: its filter, its expiration, its retries and dead-letter policy."""
    return {"name": f"projects/{project}/subscriptions/{host_subscription(prefix, host_id)}",
            "topic": topic_path(project, prefix), "filter": spec.host_filter(host_id), "ack_deadline_seconds": 60,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_TTL_S}},
            "retry_policy": {"minimum_backoff": {"seconds": RETRY_BACKOFF_S[0]},
                             "maximum_backoff": {"seconds": RETRY_BACKOFF_S[1]}},
            "dead_letter_policy": {"dead_letter_topic": dead_letter_topic_path(project, prefix),
                                   "max_delivery_attempts": DELIVERY_ATTEMPTS}}


def _made_as_requested(subscription: Any, request: dict[str, Any]) -> bool:  # noqa: ANN401 - a pubsub_v1 Subscription
    """Whether an existing subscription has what cannot be changed in place (its filter) and what the host may not
    change (its dead-letter policy: ``subscriptions.update`` is not the host's)."""
    dead_letter = request["dead_letter_policy"]
    return (subscription.filter == request["filter"]
            and subscription.dead_letter_policy.dead_letter_topic == dead_letter["dead_letter_topic"]
            and subscription.dead_letter_policy.max_delivery_attempts == dead_letter["max_delivery_attempts"])


def publish_config(publisher: pubsub_v1.PublisherClient, project: str, prefix: str, device_id: str,
                   config: ConfigVersion, host_id: str, timeout: float = 60.0, registry_id: str = "") -> str:
    """Send a stored config version to the host that holds the device; returns the Pub/Sub message id."""
    message = spec.FanoutMessage(KIND_CONFIG, validate_device_id(device_id), config.version, registry_id=registry_id,
                                 host_id=host_id)
    future = publisher.publish(_topic(publisher, project, prefix), config.data, **message.attributes())
    return future.result(timeout=timeout)


def push_config(registry: Registry, publisher: pubsub_v1.PublisherClient, prefix: str, device_id: str,
                data: bytes, version_to_update: int = 0, min_interval_s: float = 1.0) -> ConfigVersion:
    """Store a new config version in the registry, then fan it out (the registry is the source of truth): the
    config-push function's path (``iotbridge.registry.push_config``) with the fan-out as the delivery."""

    def deliver(device_id: str, version: int, data: bytes) -> None:
        host = registry.connected_host(device_id)
        if host is None:
            return  # stored; delivered from the registry when the device next connects
        publish_config(publisher, registry.project, prefix, device_id,
                       ConfigVersion(version, data, datetime.now(UTC)), host, registry_id=registry.registry_id)

    return push_config_path(registry, device_id, data, deliver, version_to_update=version_to_update,
                            min_interval_s=min_interval_s).config


def _presence(client: firestore.Client, registry_id: str, device_id: str) -> Any:
    return client.collection("registries").document(registry_id).collection("presence").document(device_id)


def mark_connected(client: firestore.Client, registry_id: str, device_id: str, host: str, session: str,
                   until: datetime) -> Any:
    """Returns the write's update time, which ``mark_disconnected`` needs."""
    result = _presence(client, registry_id, device_id).set(
        {"host": host, "session": session, "since": datetime.now(UTC), "until": until})
    return result.update_time


def mark_connected_many(client: firestore.Client, items: list[tuple[str, str, str, str, datetime]]) -> list[Any]:
    """``mark_connected`` for many sessions ((registry, device, host, session, until) each) in one commit (at most
    500, Firestore's limit): a reconnect storm costs a commit per few milliseconds, not one per device. Returns the
    update times in order. A device twice in one commit (a session taken over within milliseconds) is written once,
    for its last session; the earlier one gets None (no record of its own to remove: the two writes would share an
    update time, and the earlier session's end would remove the later one's record)."""
    batch = client.batch()
    since = datetime.now(UTC)
    last = {(registry_id, device_id): i for i, (registry_id, device_id, *_) in enumerate(items)}
    written = sorted(last.values())
    for i in written:
        registry_id, device_id, host, session, until = items[i]
        batch.set(_presence(client, registry_id, device_id),
                  {"host": host, "session": session, "since": since, "until": until})
    times = dict(zip(written, (r.update_time for r in batch.commit()), strict=True))
    return [times.get(i) for i in range(len(items))]


def presence_of_host(client: firestore.Client, registry_id: str, host: str) -> list[tuple[str, Any]]:
    """The presence records a host holds: (device id, update time) each, for ``mark_disconnected``."""
    query = client.collection("registries").document(registry_id).collection("presence").where(
        filter=firestore.FieldFilter("host", "==", host))
    return [(snap.id, snap.update_time) for snap in query.stream()]


def mark_disconnected(client: firestore.Client, registry_id: str, device_id: str, update_time: Any) -> None:
    """Remove the presence document unless a newer session of the device has replaced it."""
    from google.api_core import exceptions as gexc

    with contextlib.suppress(gexc.FailedPrecondition, gexc.NotFound):
        _presence(client, registry_id, device_id).delete(option=client.write_option(last_update_time=update_time))


def mark_disconnected_many(client: firestore.Client, items: list[tuple[str, str, Any]]) -> list[None]:
    """``mark_disconnected`` for many sessions ((registry, device, update time) each) in one commit (at most 500):
    a commit fails whole when one record was replaced by a newer session meanwhile, and then each is removed on its
    own, as ``mark_disconnected`` does."""
    from google.api_core import exceptions as gexc

    keys = {(registry_id, device_id) for registry_id, device_id, _ in items}
    if len(keys) == len(items):  # one write per document and commit
        batch = client.batch()
        for registry_id, device_id, update_time in items:
            batch.delete(_presence(client, registry_id, device_id),
                         option=client.write_option(last_update_time=update_time))
        try:
            batch.commit()
            return [None] * len(items)
        except (gexc.FailedPrecondition, gexc.NotFound):
            pass
    for registry_id, device_id, update_time in items:
        mark_disconnected(client, registry_id, device_id, update_time)
    return [None] * len(items)



def is_connected(client: firestore.Client, registry_id: str, device_id: str) -> bool:
    snap = _presence(client, registry_id, device_id).get()
    if not snap.exists:
        return False
    until = (snap.to_dict() or {}).get("until")
    return until is not None and until > datetime.now(UTC)


def send_command(registry: Registry, publisher: pubsub_v1.PublisherClient, prefix: str, device_id: str,
                 data: bytes, sub_folder: str | None = None, timeout: float = 60.0) -> str:
    """Send a command to a connected device (not stored); DeviceNotConnected otherwise — also when the host its
    presence record names has died (its liveness record, under the registry's deployment, ran out): that host's
    subscription has no reader left, and the command would be lost."""
    device_id = validate_device_id(device_id)
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {len(data)} bytes; at most {MAX_COMMAND_BYTES}")
    if sub_folder is not None and (not sub_folder or any(c in sub_folder for c in "+#\x00")):
        raise ValueError(f"invalid command subfolder {sub_folder!r}")
    registry.get_device(device_id)  # DeviceNotFound for an unknown device
    host = registry.connected_host(device_id)
    if host is None:
        raise DeviceNotConnected(f"device {device_id!r} is not connected")
    if host_gone(registry.client, registry.deployment, host):
        raise DeviceNotConnected(f"device {device_id!r} is not connected (its broker host {host} is gone)")
    attrs = spec.FanoutMessage(KIND_COMMAND, device_id, sub_folder=sub_folder or "",
                               registry_id=registry.registry_id, host_id=host).attributes()
    return publisher.publish(_topic(publisher, registry.project, prefix), data, **attrs).result(timeout=timeout)


# ------------------------------------------------------------------------------------------ hosts' subscriptions


def ensure_host_subscription(subscriber: pubsub_v1.SubscriberClient, project: str, prefix: str,
                             host_id: str) -> str:
    """Create this host's filtered delivery subscription (``host_subscription_request``), or reuse it (a restart of
    the same host); its path.

    A filter cannot be changed after creation: a subscription of this name with another filter (or none), or
    without this dead-letter policy (one made by an earlier version), is deleted and made anew, so a host never
    reads another host's messages and never redelivers a poison message for a week."""
    from google.api_core import exceptions as gexc

    request = host_subscription_request(project, prefix, host_id)
    path = request["name"]
    try:
        subscriber.create_subscription(request=request)
        return path
    except gexc.AlreadyExists:
        pass
    if not _made_as_requested(subscriber.get_subscription(request={"subscription": path}), request):
        subscriber.delete_subscription(request={"subscription": path})
        subscriber.create_subscription(request=request)
    return path


def delete_host_subscription(subscriber: pubsub_v1.SubscriberClient, project: str, prefix: str,
                             host_id: str) -> None:
    from google.api_core import exceptions as gexc

    with contextlib.suppress(gexc.NotFound):
        subscriber.delete_subscription(
            request={"subscription": subscriber.subscription_path(project, host_subscription(prefix, host_id))})


def _host_ref(client: firestore.Client, deployment: str, host_id: str) -> Any:
    return client.collection("registries").document(deployment).collection("bridge_hosts").document(host_id)


def mark_host_alive(client: firestore.Client, deployment: str, host_id: str, seconds: float = HOST_ALIVE_S) -> Any:
    """Renew the host's liveness record; returns the write's update time, which :func:`mark_host_gone` needs."""
    return _host_ref(client, deployment, host_id).set(
        {"until": datetime.now(UTC) + timedelta(seconds=seconds)}).update_time


def mark_host_gone(client: firestore.Client, deployment: str, host_id: str, update_time: Any) -> bool:
    """A clean stop: the record stays, run out now, so that a command to a device whose presence record still names
    this host (its front could not remove every one while stopping) is refused rather than published to a
    subscription that no longer exists. :func:`sweep` removes the record once no presence can name it any more.

    Only when the record is still the one this host last wrote (``update_time``): another process that renewed it
    since under the same host id (a replacement VM with the instance's name) keeps its record. True when marked."""
    from google.api_core import exceptions as gexc

    try:
        _host_ref(client, deployment, host_id).update(
            {"until": datetime.now(UTC), "stopped": True}, option=client.write_option(last_update_time=update_time))
    except (gexc.FailedPrecondition, gexc.NotFound):
        return False
    return True


def host_gone(client: firestore.Client, deployment: str, host_id: str, now: datetime | None = None) -> bool:
    """True when the host's liveness record has run out: it died without a clean stop (which deletes the record).
    A host without a record is not judged here: its bridge service has yet to start (a stopped host keeps its
    record, run out, until the sweep removes it)."""
    snap = _host_ref(client, deployment, host_id).get()
    until = (snap.to_dict() or {}).get("until") if snap.exists else None
    return until is not None and until <= (now or datetime.now(UTC))


def live_hosts(client: firestore.Client, deployment: str, now: datetime | None = None) -> set[str]:
    now = now or datetime.now(UTC)
    docs = client.collection("registries").document(deployment).collection("bridge_hosts").stream()
    return {d.id for d in docs if (until := (d.to_dict() or {}).get("until")) is not None and until > now}


def sweep(subscriber: pubsub_v1.SubscriberClient, publisher: pubsub_v1.PublisherClient, client: firestore.Client,
          project: str, prefix: str, deployment: str) -> list[str]:
    """Delete the delivery subscriptions of hosts with no live liveness record; the names deleted. Liveness records
    that ran out more than ``HOST_RECORD_KEEP_S`` ago go too: no presence record can name their host any more.

    Only a subscription a host made for itself is touched: one named ``host_subscription(prefix, host)`` whose
    filter is that host's. Anything else on the topic (an operator's own subscription) is left alone."""
    from google.api_core import exceptions as gexc

    now = datetime.now(UTC)
    hosts = client.collection("registries").document(deployment).collection("bridge_hosts")
    for doc in hosts.where(filter=firestore.FieldFilter(
            "until", "<", now - timedelta(seconds=HOST_RECORD_KEEP_S))).stream():
        doc.reference.delete()
    alive = live_hosts(client, deployment, now)
    stem = f"{spec.topic_name(prefix, 'device-commands')}-"
    deleted = []
    for path in publisher.list_topic_subscriptions(request={"topic": _topic(publisher, project, prefix)}):
        name = path.rsplit("/", 1)[-1]
        host = name.removeprefix(stem)
        if host == name or host in alive or not spec.HOST_ID_RE.fullmatch(host):
            continue
        try:
            if subscriber.get_subscription(request={"subscription": path}).filter != spec.host_filter(host):
                continue
            subscriber.delete_subscription(request={"subscription": path})
        except gexc.NotFound:
            continue
        deleted.append(name)
    return deleted

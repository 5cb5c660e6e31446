"""Cloud → device: configs and commands through the ``device-commands`` fan-out topic, and device presence.

Every broker host's bridge service has its own subscription to ``device-commands``, so a message published
here reaches whichever host the device is connected to. Message format (docs/messages.md):

- data = the config or command payload, untouched;
- attributes: ``iotbridge.spec.FanoutMessage`` (``kind``, ``deviceId``, ``version`` or ``subFolder``,
  ``registryId``).

Presence (``registries/{registry}/presence/{device}``: host, session, since, until) is written by the front on
connect and removed on disconnect; ``send_command`` refuses a device that is not connected, as IoT Core's
``sendCommandToDevice`` did. A host that dies leaves its presence documents behind until their ``until``
(the token's ``exp``, at most 24 h), so a command to such a device is accepted and then not delivered.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from google.cloud import firestore, pubsub_v1

from iotbridge import spec
from iotbridge.registry import ConfigVersion, Registry, validate_device_id
from iotbridge.registry import push_config as push_config_path

KIND_CONFIG = spec.FANOUT_KIND_CONFIG
KIND_COMMAND = spec.FANOUT_KIND_COMMAND
MAX_COMMAND_BYTES = 256 * 1024


class DeviceNotConnected(RuntimeError):
    """A command was sent to a device that is not connected to any broker host."""


def _topic(publisher: pubsub_v1.PublisherClient, project: str, prefix: str) -> str:
    return publisher.topic_path(project, spec.topic_name(prefix, "device-commands"))


def publish_config(publisher: pubsub_v1.PublisherClient, project: str, prefix: str, device_id: str,
                   config: ConfigVersion, timeout: float = 60.0, registry_id: str = "") -> str:
    """Fan a stored config version out to every host; returns the Pub/Sub message id."""
    message = spec.FanoutMessage(KIND_CONFIG, validate_device_id(device_id), config.version, registry_id=registry_id)
    future = publisher.publish(_topic(publisher, project, prefix), config.data, **message.attributes())
    return future.result(timeout=timeout)


def push_config(registry: Registry, publisher: pubsub_v1.PublisherClient, prefix: str, device_id: str,
                data: bytes, version_to_update: int = 0, min_interval_s: float = 1.0) -> ConfigVersion:
    """Store a new config version in the registry, then fan it out (the registry is the source of truth): the
    config-push function's path (``iotbridge.registry.push_config``) with the fan-out as the delivery."""

    def deliver(device_id: str, version: int, data: bytes) -> None:
        publish_config(publisher, registry.project, prefix, device_id,
                       ConfigVersion(version, data, datetime.now(UTC)), registry_id=registry.registry_id)

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


def mark_disconnected(client: firestore.Client, registry_id: str, device_id: str, update_time: Any) -> None:
    """Remove the presence document unless a newer session of the device has replaced it."""
    from google.api_core import exceptions as gexc

    with contextlib.suppress(gexc.FailedPrecondition, gexc.NotFound):
        _presence(client, registry_id, device_id).delete(option=client.write_option(last_update_time=update_time))


def is_connected(client: firestore.Client, registry_id: str, device_id: str) -> bool:
    snap = _presence(client, registry_id, device_id).get()
    if not snap.exists:
        return False
    until = (snap.to_dict() or {}).get("until")
    return until is not None and until > datetime.now(UTC)


def send_command(registry: Registry, publisher: pubsub_v1.PublisherClient, prefix: str, device_id: str,
                 data: bytes, sub_folder: str | None = None, timeout: float = 60.0) -> str:
    """Send a command to a connected device (not stored); DeviceNotConnected otherwise."""
    device_id = validate_device_id(device_id)
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {len(data)} bytes; at most {MAX_COMMAND_BYTES}")
    if sub_folder is not None and (not sub_folder or any(c in sub_folder for c in "+#\x00")):
        raise ValueError(f"invalid command subfolder {sub_folder!r}")
    registry.get_device(device_id)  # DeviceNotFound for an unknown device
    if not is_connected(registry.client, registry.registry_id, device_id):
        raise DeviceNotConnected(f"device {device_id!r} is not connected")
    attrs = spec.FanoutMessage(KIND_COMMAND, device_id, sub_folder=sub_folder or "",
                               registry_id=registry.registry_id).attributes()
    return publisher.publish(_topic(publisher, registry.project, prefix), data, **attrs).result(timeout=timeout)

"""Gateways, as Cloud IoT Core defined them (docs/device-protocol.md, "Gateways"), in the TLS front.

A gateway is a device whose ``gateway_config.gateway_type`` is ``GATEWAY``. It connects as itself, then attaches
devices bound to it by publishing ``/devices/{device}/attach`` (with ``{"authorization": "<the device's JWT>"}``
when its ``gateway_auth_method`` asks for one) and speaks for each attached device on that device's own topics:
events and state out, config and commands in; ``/devices/{device}/detach`` ends it. What the front refuses for an
attached device reaches the gateway on ``/devices/{gateway}/errors`` (QoS 0) instead of closing the gateway's
connection: one misbehaving sensor does not cut off its neighbours.

Everything the front enforces for a device holds per attached device: only a device bound to this gateway, not
blocked, not itself a gateway, and (per auth method) proving itself with its own JWT, may be attached; its events
and state are held to the device's size limits and charged to the device's own rate-limit buckets (the same as its
direct MQTT or HTTP traffic); the re-check rounds detach it when it is blocked, deleted, re-created or unbound.

The gateway's loopback session is user ``bridge`` (its ACL reads every device's config and commands), and the
front filters what the broker sends it: only the gateway's own topics and those of its attached devices pass. Its
events and states are republished under :func:`iotbridge.spec.relayed_topic`, which the Mosquitto ACL lets a
session write only under its own client id (the gateway's id), so the bridge service's ``gatewayId`` attribute
always names the gateway that authenticated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from iotbridge import spec
from iotbridge.bridge import fanout, limits, mqtt
from iotbridge.bridge.ratelimit import TokenBucket
from iotbridge.bridge.settings import EVENTS_MAX_BYTES, STATE_MAX_BYTES
from iotbridge.registry import DEVICE_ID_RE, DeviceNotFound, Grant

if TYPE_CHECKING:
    from iotbridge.bridge.front import Front, Session

log = logging.getLogger("iotbridge.gateway")

MAX_ATTACHED = 500  # devices one gateway session may have attached at once
# What the front may hold unsent for a gateway (its PUBACKs and errors): a gateway that stops reading its socket
# while it keeps publishing is disconnected, not buffered for until the host runs out of memory.
MAX_UNSENT_BYTES = 1024 * 1024
# Auth methods that ask the attach message for the device's own JWT.
TOKEN_METHODS = frozenset({"DEVICE_AUTH_TOKEN_ONLY", "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"})
# IoT Core's error types on the errors topic.
ATTACHMENT_ERROR = "GATEWAY_ATTACHMENT_ERROR"
DEVICE_NOT_ATTACHED = "GATEWAY_DEVICE_NOT_FOUND"
INVALID_MQTT_TOPIC = "GATEWAY_INVALID_MQTT_TOPIC"
PAYLOAD_TOO_LARGE = "GATEWAY_PAYLOAD_TOO_LARGE"
DETACHED = "GATEWAY_DEVICE_DETACHED"


@dataclass
class Attached:
    device_id: str
    num_id: str
    credential_pem: str  # "" for ASSOCIATION_ONLY: the binding is the grant
    limits: dict[str, TokenBucket]
    presence_time: Any = None
    registry: Any = None  # the gateway's Registry, which its bound devices belong to


@dataclass
class GatewaySession:
    """What the front keeps for a connected gateway, beside its :class:`Session`."""

    gateway_id: str
    auth_method: str
    device_writer: Any  # the gateway's TLS stream: PUBACKs of consumed packets and errors go here
    broker_writer: Any  # the loopback session: PUBACKs of configs/commands the filter drops go here
    attached: dict[str, Attached] = field(default_factory=dict)
    warned: float = float("-inf")  # when an error of this gateway was last logged (at most once a LIMIT_REPORT_S)


def encode_publish(topic: str, payload: bytes, level: int) -> bytes:
    """A QoS 0 PUBLISH the front sends a gateway (its errors)."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (b"\x00" if level == mqtt.MQTT_5 else b"") + payload
    return bytes([mqtt.PUBLISH << 4]) + mqtt.encode_varint(len(body)) + body


def puback(packet_id: int) -> bytes:
    """PUBACK, success (MQTT 3.1.1 and 5 alike: a remaining length of 2 means reason 0)."""
    return bytes([mqtt.PUBACK << 4, 2]) + packet_id.to_bytes(2, "big")


def retopic(first: int, body: bytes, topic: str) -> bytes:
    """The same PUBLISH (packet id, properties, payload: all follow the topic unchanged) on another topic, retain
    cleared."""
    t = topic.encode()
    old_len = int.from_bytes(body[:2], "big")
    new_body = len(t).to_bytes(2, "big") + t + body[2 + old_len:]
    return bytes([first & ~0x01]) + mqtt.encode_varint(len(new_body)) + new_body


def error_payload(error_type: str, device_id: str, description: str, message_id: int | None = None) -> bytes:
    out: dict[str, Any] = {"error_type": error_type, "device_id": device_id, "description": description}
    if message_id is not None:
        out["message_id"] = message_id
    return json.dumps(out).encode()


class GatewayRelay:
    """The front's gateway logic; one per :class:`Front`."""

    def __init__(self, front: Front):
        self.front = front

    # ---------------------------------------------------------------------------------- checks

    def may_subscribe(self, session: Session, topic_filter: str) -> bool:
        """A gateway may subscribe to its own errors, and to the config and commands of any device id: what the
        broker sends for a device that is not attached is dropped by :meth:`delivers`."""
        from iotbridge.bridge.front import subscription_allowed

        gw = session.gateway
        if gw is None:
            return False
        if topic_filter == spec.device_topic(gw.gateway_id, spec.ERRORS):
            return True
        parsed = spec.parse_device_topic(topic_filter.removesuffix("/#"))
        return (parsed is not None and DEVICE_ID_RE.fullmatch(parsed[0]) is not None
                and subscription_allowed(topic_filter, parsed[0]))

    def delivers(self, session: Session, topic: str) -> bool:
        """Whether a PUBLISH the broker sends the gateway's session may reach the gateway."""
        gw = session.gateway
        parsed = spec.parse_device_topic(topic)
        return gw is None or (parsed is not None and (parsed[0] == gw.gateway_id or parsed[0] in gw.attached))

    def drop_delivery(self, session: Session, first: int, body: bytes) -> None:
        """Acknowledge to the broker a QoS 1 message the gateway may not have (so it is not redelivered)."""
        gw = session.gateway
        if gw is not None and (first >> 1) & 0x03 == 1:
            p = mqtt.parse_publish(first, body, session.level)
            if p.packet_id is not None:
                gw.broker_writer.write(puback(p.packet_id))

    # ---------------------------------------------------------------------------------- gateway → broker

    async def publish(self, session: Session, first: int, body: bytes, raw: bytes) -> tuple[bytes, float] | None:
        """A gateway's PUBLISH on another device's topic: the bytes to forward (``b""`` when consumed) and how long
        to wait first; None when the topic is not another device's (the front's own checks then apply)."""
        gw = session.gateway
        p = mqtt.parse_publish(first, body, session.level)
        parsed = spec.parse_device_topic(p.topic)
        if gw is None or parsed is None or parsed[0] == gw.gateway_id:
            return None
        from iotbridge.bridge.front import Dropped

        # The gateway's own limits count every packet it sends, whichever device it names (as for a device's own).
        now = time.monotonic()
        own = max(session.limits["bytes"].take(len(raw), now), session.limits["messages"].take(1, now))
        if p.qos > 1:
            raise Dropped(f"QoS {p.qos} publish")
        if p.topic_alias is not None:
            raise Dropped("topic aliases are not supported")
        device_id, kind, sub_folder = parsed
        if not DEVICE_ID_RE.fullmatch(device_id):
            # Not echoed: the id is the gateway's text, of any length.
            self.error(session, INVALID_MQTT_TOPIC, "", "not a valid device id", p.packet_id)
        elif kind == spec.ATTACH:
            await self._attach(session, gw, device_id, body[p.payload_offset:], p.packet_id)
        elif kind == spec.DETACH:
            await self.detach(session, device_id, "detached by the gateway", p.packet_id, report=False)
        elif kind not in spec.DEVICE_PUBLISHES:
            self.error(session, INVALID_MQTT_TOPIC, device_id, f"a gateway may not publish to a device's {kind} topic",
                       p.packet_id)
        elif device_id not in gw.attached:
            self.error(session, DEVICE_NOT_ATTACHED, device_id,
                       f"device {device_id!r} is not attached to gateway {gw.gateway_id!r}", p.packet_id)
        else:
            limit = STATE_MAX_BYTES if kind == spec.STATE else EVENTS_MAX_BYTES
            violation = limits.event_topic_violation(p.topic, device_id) if kind == spec.EVENTS else None
            if p.payload_len > limit:
                self.error(session, PAYLOAD_TOO_LARGE, device_id,
                           f"{kind} payload of {p.payload_len} bytes exceeds {limit}", p.packet_id)
            elif violation is not None:
                self.error(session, INVALID_MQTT_TOPIC, device_id, f"{violation[0]}: {violation[1]}", p.packet_id)
            else:
                buckets = gw.attached[device_id].limits
                wait = max(own, buckets["messages"].take(1, now), buckets["bytes"].take(len(raw), now))
                if kind == spec.STATE:
                    wait = max(wait, buckets["state"].take(1, now))
                topic = spec.relayed_topic(gw.gateway_id, device_id, kind, sub_folder)
                return retopic(first, body, topic), wait
        return b"", own

    def _write(self, session: Session, data: bytes) -> None:
        """Send the gateway a packet of the front's own; end the session instead when the gateway has left more
        than MAX_UNSENT_BYTES unread."""
        gw = session.gateway
        if gw is None or session.closed:
            return
        transport = gw.device_writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > MAX_UNSENT_BYTES:
            log.warning("gateway %s disconnected: it leaves over %d bytes unread", gw.gateway_id, MAX_UNSENT_BYTES)
            session.close(f"refused: gateway leaves over {MAX_UNSENT_BYTES} bytes unread")
            return
        gw.device_writer.write(data)

    def _ack(self, session: Session, packet_id: int | None) -> None:
        if packet_id is not None:
            self._write(session, puback(packet_id))

    def error(self, session: Session, error_type: str, device_id: str, description: str,
              packet_id: int | None = None) -> None:
        """Tell the gateway on its errors topic (QoS 0, when it subscribed) and acknowledge the packet."""
        from iotbridge.bridge.front import LIMIT_REPORT_S, printable

        gw = session.gateway
        if gw is None:
            return
        now = time.monotonic()
        if now - gw.warned >= LIMIT_REPORT_S:  # a gateway repeating a mistake is logged once a minute
            gw.warned = now
            log.warning("gateway %s, device %s: %s", gw.gateway_id, printable(device_id), printable(description))
        errors = spec.device_topic(gw.gateway_id, spec.ERRORS)
        if errors in session.subscriptions:
            self._write(session, encode_publish(errors, error_payload(error_type, device_id, description,
                                                                      packet_id), session.level))
        self._ack(session, packet_id)

    async def _attach(self, session: Session, gw: GatewaySession, device_id: str, payload: bytes,
                      packet_id: int | None) -> None:
        from iotbridge.bridge.front import Refusal

        front = self.front
        if not DEVICE_ID_RE.fullmatch(device_id):
            self.error(session, ATTACHMENT_ERROR, device_id, "not a valid device id", packet_id)
            return
        if device_id in gw.attached:
            self._ack(session, packet_id)  # attaching twice is harmless
            return
        if len(gw.attached) >= MAX_ATTACHED:
            self.error(session, ATTACHMENT_ERROR, device_id, f"at most {MAX_ATTACHED} attached devices", packet_id)
            return
        token = b""
        registry = session.registry or front.registry  # a gateway attaches devices of its own registry
        if payload.strip():
            try:
                doc = json.loads(payload)
                token = str(doc.get("authorization") or "").encode() if isinstance(doc, dict) else b""
            except ValueError:
                self.error(session, ATTACHMENT_ERROR, device_id, "attach payload is not JSON", packet_id)
                return
        try:
            # The gateway's auth method, made stricter by the device's own when it names one; the device's
            # ``gateway_auth_method`` is read first, so that only a bound device's settings can ask for a token.
            device = await front.on_registry(registry.get_device, device_id)
            # The gateway's method as it is now, not as it was when the gateway connected.
            gateway = await front.on_registry(registry.get_device, gw.gateway_id)
            if not gateway.gateway_config.is_gateway:
                raise Refusal(Refusal.BLOCKED, "the gateway is no longer a gateway")
            gw.auth_method = gateway.gateway_config.gateway_auth_method or "ASSOCIATION_ONLY"
            needs_token = bool({gw.auth_method, device.gateway_config.gateway_auth_method} & TOKEN_METHODS)
            if needs_token:
                if not token:
                    raise Refusal(Refusal.BAD_CREDENTIALS, f"{gw.auth_method} needs the device's JWT in "
                                                           '{"authorization": ...}')
                proof = await front.verify_device(device_id, token, None, session.address, registry.registry_id)
                device = proof.device
                credential_pem = proof.credential.public_key_pem
            else:
                credential_pem = ""
                if device.blocked:
                    raise Refusal(Refusal.BLOCKED, "device is blocked")
        except DeviceNotFound:
            self.error(session, ATTACHMENT_ERROR, device_id, "device is not bound to this gateway", packet_id)
            return
        except Refusal as exc:
            # Unknown devices, bad tokens and missing bindings are answered alike: the gateway learns nothing of
            # devices that are not its own.
            reason = ("the device's JWT is missing or invalid, or the device is not bound to this gateway"
                      if exc.kind == Refusal.BAD_CREDENTIALS else exc.reason)
            self.error(session, ATTACHMENT_ERROR, device_id, f"attach refused: {reason}", packet_id)
            return
        except Exception as exc:  # noqa: BLE001 - registry unreachable: the gateway may attach again
            self.error(session, ATTACHMENT_ERROR, device_id, f"registry error {type(exc).__name__}", packet_id)
            return
        # Every auth method asks for the binding (docs/device-protocol.md): a gateway never acts for a device that
        # is not bound to it.
        if gw.gateway_id not in device.bound_gateways or device.gateway_config.is_gateway:
            self.error(session, ATTACHMENT_ERROR, device_id, "device is not bound to this gateway", packet_id)
            return
        att = Attached(device_id, device.num_id, credential_pem, front.device_limits(device_id), registry=registry)
        gw.attached[device_id] = att
        front.hold(device_id)
        s = front.settings
        try:
            att.presence_time = await front.on_registry(
                fanout.mark_connected, registry.client, registry.registry_id, device_id, s.host_id, session.id,
                session.expires_at)
            if gw.attached.get(device_id) is not att:
                # Detached (or the gateway gone) while the record was being written: nothing else will remove it.
                await self._forget_presence(att)
                self._ack(session, packet_id)
                return
            await front.on_registry(registry.record_gateway_access, device_id, gw.gateway_id,
                                    datetime.now(UTC))
        except Exception as exc:  # noqa: BLE001 - presence only serves command senders
            log.warning("presence of %s (through %s) not recorded: %s", device_id, gw.gateway_id, exc)
        # A config topic the gateway subscribed to before attaching got no retained copy (dropped, not attached):
        # the bridge publishes the latest config again.
        front.request_config_sync(device_id, again=spec.device_topic(device_id, spec.CONFIG) in session.subscriptions)
        log.info("gateway %s attached %s (%s)", gw.gateway_id, device_id, gw.auth_method)
        self._ack(session, packet_id)

    async def detach(self, session: Session, device_id: str, reason: str, packet_id: int | None = None,
                     report: bool = True) -> None:
        gw = session.gateway
        if gw is None:
            return
        att = gw.attached.pop(device_id, None)
        if report:
            self.error(session, DETACHED, device_id, reason, packet_id)
        else:
            self._ack(session, packet_id)
        if att is not None:
            log.info("gateway %s: %s detached (%s)", gw.gateway_id, device_id, reason)
            self.front.release(device_id)
            await self._forget_presence(att)

    async def _forget_presence(self, att: Attached) -> None:
        if att.presence_time is None:
            return
        registry = att.registry or self.front.registry
        try:
            await self.front.on_registry(fanout.mark_disconnected, registry.client, registry.registry_id,
                                         att.device_id, att.presence_time)
        except Exception as exc:  # noqa: BLE001 - best effort, as for a direct session
            log.debug("presence of %s not removed: %s", att.device_id, exc)

    async def closed(self, session: Session) -> None:
        """The gateway's session ended: every attached device goes with it."""
        gw = session.gateway
        if gw is None:
            return
        attached, gw.attached = list(gw.attached.values()), {}
        for att in attached:
            self.front.release(att.device_id)
        for att in attached:
            await self._forget_presence(att)

    # ---------------------------------------------------------------------------------- re-check

    def attached_ids(self, session: Session) -> list[str]:
        return list(session.gateway.attached) if session.gateway is not None else []

    async def recheck(self, session: Session, grants: dict[str, Grant], now: datetime,
                      checked: Collection[str] | None = None) -> None:
        """Detach every attached device the registry no longer allows: blocked, deleted, re-created, unbound, or
        (attached with its JWT) its credential removed or expired. ``checked``: the devices the round read grants
        for; one attached while the round ran is left to the next round (its attach has just read it)."""
        from iotbridge.bridge.front import revoked_reason

        gw = session.gateway
        if gw is None:
            return
        for device_id, att in list(gw.attached.items()):
            if checked is not None and device_id not in checked:
                continue
            grant = grants.get(device_id)
            if att.credential_pem:
                reason = revoked_reason(att.num_id, att.credential_pem, grant, now)
            elif grant is None or grant.num_id != att.num_id:
                reason = "device deleted"
            else:
                reason = "device blocked" if grant.blocked else ""
            if not reason and (grant is None or gw.gateway_id not in grant.bound_gateways):
                reason = "device unbound from the gateway"
            if reason:
                await self.detach(session, device_id, reason)

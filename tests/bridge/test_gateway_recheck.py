"""The gateway relay without a running host: a re-check round reads the registry for the devices attached when it
started, so a device attached while it read must not be judged by that read; an attachment that ends while its
presence record is being written does not leave the record behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

from iotbridge.bridge import fanout
from iotbridge.bridge.front import Front, Session
from iotbridge.bridge.gateway import Attached, GatewayRelay, GatewaySession
from iotbridge.registry import Device, GatewayConfig, Grant
from tests.aio import run_in_own_loop


def _gateway_with(*device_ids: str) -> tuple[GatewayRelay, Session, list[str]]:
    released: list[str] = []
    relay = GatewayRelay(cast(Front, SimpleNamespace(release=released.append)))
    now = datetime.now(UTC)
    session = Session(device_id="gw-1", level=4, expires_at=now + timedelta(hours=1), peer="test")
    session.gateway = GatewaySession("gw-1", "ASSOCIATION_ONLY", device_writer=None, broker_writer=None)
    for d in device_ids:
        session.gateway.attached[d] = Attached(d, f"num-{d}", credential_pem="", limits={})
    return relay, session, released


def _grant(device_id: str, gateway: str = "gw-1", blocked: bool = False) -> Grant:
    return Grant(num_id=f"num-{device_id}", blocked=blocked, credentials={}, bound_gateways=(gateway,))


def _recheck(device_ids: tuple[str, ...], grants: dict[str, Grant], read: set[str]) \
        -> tuple[Session, list[str]]:
    async def go() -> tuple[Session, list[str]]:
        relay, session, released = _gateway_with(*device_ids)  # in the loop: a session's close is a future of it
        await relay.recheck(session, grants, datetime.now(UTC), checked=read)
        return session, released

    return run_in_own_loop(go())


def test_a_device_attached_while_the_round_read_the_registry_stays_attached():
    # The round read "old" only; "new" was attached while it read (its grant is absent, not refused).
    session, released = _recheck(("old", "new"), {"old": _grant("old")}, read={"old"})
    assert session.gateway is not None and set(session.gateway.attached) == {"old", "new"}
    assert released == []


def test_a_device_the_round_read_and_found_gone_or_blocked_is_detached():
    grants = {"blocked": _grant("blocked", blocked=True), "fine": _grant("fine")}
    session, released = _recheck(("gone", "blocked", "fine"), grants, read={"gone", "blocked", "fine"})
    assert session.gateway is not None and set(session.gateway.attached) == {"fine"}
    assert sorted(released) == ["blocked", "gone"]  # their retained configs are cleared on this host


def test_a_gateway_that_leaves_while_an_attachment_is_recorded_leaves_no_presence_behind():
    gateway = Device("gw-1", "num-gw", "reg", gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
    device = Device("dev-1", "num-dev", "reg", bound_gateways=("gw-1",))
    registry = SimpleNamespace(registry_id="reg", client=None, record_gateway_access=lambda *a: None,
                               get_device={"gw-1": gateway, "dev-1": device}.__getitem__)
    calls: list[str] = []

    async def go() -> None:
        session = Session(device_id="gw-1", level=4, expires_at=datetime.now(UTC) + timedelta(hours=1), peer="t",
                          registry=registry)
        session.gateway = GatewaySession("gw-1", "ASSOCIATION_ONLY", device_writer=None, broker_writer=None)

        async def on_registry(fn, *args):  # noqa: ANN001, ANN202 - the front's registry threads, here inline
            calls.append(getattr(fn, "__name__", "?"))
            if fn is fanout.mark_connected:
                await relay.closed(session)  # the gateway's session ends while the record is being written
                return "t-1"
            if fn is fanout.mark_disconnected:
                assert args[-1] == "t-1"  # the record this attachment wrote
                return None
            return fn(*args)

        front = SimpleNamespace(registry=registry, on_registry=on_registry, hold=lambda d: None,
                                release=lambda d: None, device_limits=lambda d: {},
                                request_config_sync=lambda *a, **k: None, settings=SimpleNamespace(host_id="host-a"))
        relay = GatewayRelay(cast(Front, front))
        await relay._attach(session, session.gateway, "dev-1", b"", None)

    run_in_own_loop(go())
    assert calls.count("mark_connected") == 1 and calls.count("mark_disconnected") == 1
    assert "record_gateway_access" not in calls

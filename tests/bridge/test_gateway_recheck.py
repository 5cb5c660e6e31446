"""The gateway part of the front's registry re-check, without a running host: a round reads the registry for the
devices attached when it started, so a device attached while it read must not be judged by that read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

from iotbridge.bridge.front import Front, Session
from iotbridge.bridge.gateway import Attached, GatewayRelay, GatewaySession
from iotbridge.registry import Grant
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

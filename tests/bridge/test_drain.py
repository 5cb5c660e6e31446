"""A host being removed drains: the front stops accepting connections (its health check fails with them), then
ends its device sessions spread over ``drain_s``, so the devices reconnect to the other hosts a few at a time."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from iotbridge.bridge.front import DRAIN_TICK_S, Session, drain
from tests.aio import run_in_own_loop
from tests.waiting import wait_for

from .conftest import DeviceFactory, new_stack


def _sessions(n: int) -> list[Session]:
    until = datetime.now(UTC) + timedelta(hours=1)
    return [Session(device_id=f"d{i}", level=4, expires_at=until, peer="test") for i in range(n)]


@pytest.mark.parametrize(("n", "seconds"), [(10, 1.0), (1000, 3.0), (3, 1.0), (7, 0.05)])
def test_sessions_end_evenly_over_the_drain(n, seconds):
    ended_per_tick: list[int] = []
    slept: list[float] = []

    async def go() -> list[Session]:
        sessions = _sessions(n)  # in the loop: a session's close is a future of it

        async def sleep(s: float) -> None:  # the clock of the drain, without waiting for it
            ended_per_tick.append(sum(s.closed for s in sessions))
            slept.append(s)

        await drain(sessions, seconds, sleep=sleep)
        return sessions

    sessions = run_in_own_loop(go())
    assert all(s.closed and s.reason == "host draining" for s in sessions)
    ticks = max(1, round(seconds / DRAIN_TICK_S))
    assert len(slept) == ticks - 1 and sum(slept) == pytest.approx(seconds * (ticks - 1) / ticks)
    # After tick k, the first (k + 1) / ticks of the sessions have ended: the pace never runs ahead or behind.
    assert ended_per_tick == [n * (k + 1) // ticks for k in range(ticks - 1)]


@pytest.mark.emulator
def test_a_stopping_front_refuses_new_connections_and_ends_its_devices_over_the_drain(bridge_env, tmp_path,
                                                                                       registry):
    drain_s = 3.0
    stack = new_stack(tmp_path, bridge_env, drain_s=drain_s)
    try:
        factory = DeviceFactory(registry, stack)
        devices = [factory.connected("ES256") for _ in range(12)]
        gone: dict[int, float] = {}
        stopper = threading.Thread(target=stack.stop_part, args=("front",))
        t0 = time.monotonic()
        stopper.start()
        # The listener closes first: a new connection is refused while devices are still being drained.
        wait_for("the front's listener closed", lambda: _refused(stack.settings.front_port), timeout=10)
        still = sum(d.is_connected() for d in devices)
        while len(gone) < len(devices) and time.monotonic() - t0 < 30:
            for i, d in enumerate(devices):
                if i not in gone and not d.is_connected():
                    gone[i] = time.monotonic() - t0
            time.sleep(0.02)
        stopper.join(30)
        assert len(gone) == len(devices), "every device's session ended"
        assert still > 0, "the listener was closed before the sessions ended"
        spread = max(gone.values()) - min(gone.values())
        # The drain sleeps (ticks - 1) / ticks of drain_s between its first and its last close; a slow machine only
        # widens that.
        assert spread >= drain_s * 0.8, sorted(gone.values())
        # Each ended session removed its presence record before the front's registry threads went.
        assert [registry.connected_host(d.identity.device_id) for d in devices] == [None] * len(devices)
        for d in devices:
            d.disconnect()
    finally:
        stack.stop()


@pytest.mark.emulator
def test_a_front_stopped_at_once_still_removes_every_presence_record(bridge_env, tmp_path, registry):
    stack = new_stack(tmp_path, bridge_env)  # drain_s 0: every session ends at once
    try:
        factory = DeviceFactory(registry, stack)
        devices = [factory.connected("ES256") for _ in range(24)]
        ids = [d.identity.device_id for d in devices]
        wait_for("presence records", lambda: [registry.connected_host(i) for i in ids], all, timeout=15)
        stack.stop_part("front")
        assert [i for i in ids if registry.connected_host(i) is not None] == []
        for d in devices:
            d.disconnect()
    finally:
        stack.stop()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True

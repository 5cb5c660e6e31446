"""The front's registry cache on a real host (front, Mosquitto, the Firestore emulator): a reconnecting device is
authenticated without a registry read, a change made while it was away is not served from the cache, an idle
host's re-check reads no device, and a PINGREQ is recorded at most every HEARTBEAT_RECORD_S."""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime, timedelta

from iotbridge.bridge import regcache
from iotbridge.bridge.front import Front, Session
from iotbridge.bridge.settings import BridgeSettings
from tests.aio import run_in_own_loop
from tests.waiting import wait_for

from .test_attacks import NOT_AUTHORIZED, expect_refused
from .test_hardening import counter


def _rounds(stack, n: int) -> None:  # noqa: ANN001
    """Wait until the front has run ``n`` more re-check rounds."""
    start = counter(stack, "recheck_rounds")
    wait_for(f"{n} re-check rounds", lambda: counter(stack, "recheck_rounds"), lambda r: r >= start + n, timeout=30)


def test_a_reconnecting_device_is_authenticated_from_the_cache(devices, stack):
    device_id, private = devices.register("ES256")
    time.sleep(regcache.CLOCK_SKEW_S + 0.5)  # the CONNECT's read then counts as later than the creation
    dev = devices.device(device_id, private)
    dev.connect()
    _rounds(stack, 2)
    dev.disconnect()
    lookups, hits = counter(stack, "registry_lookups"), counter(stack, "cache_hits")
    dev = devices.device(device_id, private)
    dev.connect()
    assert counter(stack, "registry_lookups") == lookups
    assert counter(stack, "cache_hits") == hits + 1


def test_a_device_blocked_while_away_is_not_let_back_in_from_the_cache(devices, stack, registry):
    device_id, private = devices.register("ES256")
    time.sleep(regcache.CLOCK_SKEW_S + 0.5)
    dev = devices.device(device_id, private)
    dev.connect()
    _rounds(stack, 2)
    dev.disconnect()
    hits = counter(stack, "cache_hits")
    dev = devices.device(device_id, private)
    dev.connect()  # the cache holds the device
    assert counter(stack, "cache_hits") == hits + 1
    dev.disconnect()
    registry.set_blocked(device_id, True)
    _rounds(stack, 2)
    expect_refused(lambda: devices.device(device_id, private).connect(), NOT_AUTHORIZED)


def test_an_idle_hosts_recheck_reads_no_device(devices, stack):
    connected = [devices.connected("ES256") for _ in range(5)]
    # A change (here: the creations) is returned by every round for OVERLAP_S, and re-read while the device's last
    # read was not clearly later than it (CLOCK_SKEW_S): past both, nothing is read.
    time.sleep(regcache.OVERLAP_S + regcache.CLOCK_SKEW_S + 1)
    _rounds(stack, 1)
    reread = counter(stack, "reread")
    _rounds(stack, 4)
    assert counter(stack, "reread") == reread
    assert all(d.is_connected() for d in connected)


def test_a_pingreq_is_recorded_at_most_every_heartbeat_record_interval(registry):
    """The re-check writes a device's first PINGREQ at once and later ones only after HEARTBEAT_RECORD_S."""
    registry.create_device("dev-ping")
    settings = BridgeSettings(project=registry.project, region=registry.region, registry_id=registry.registry_id,
                              prefix="p")
    t0 = datetime.now(UTC).replace(microsecond=0)

    async def go() -> None:  # a Front and its sessions live in an event loop
        front = Front(settings, registry, ssl.create_default_context(), "pw")
        session = Session("dev-ping", 4, t0 + timedelta(hours=1), "peer", registry=registry)
        front.sessions.add(session)

        async def record(ping: datetime) -> datetime | None:
            session.last_ping = ping
            await front._record_heartbeats({"dev-ping": registry})
            return registry.get_device("dev-ping").last_heartbeat_time

        assert await record(t0) == t0
        assert await record(t0 + timedelta(seconds=60)) == t0  # a keep-alive later: not written
        later = t0 + timedelta(seconds=regcache.HEARTBEAT_RECORD_S)
        assert await record(later) == later

    run_in_own_loop(go())

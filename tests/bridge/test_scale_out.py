"""The broker tier scaled out, on real processes: six broker hosts (Mosquitto + TLS front + bridge service each, as
the local stack runs them) behind HAProxy in TCP mode with health checks, the stand-in for the cloud's TCP load
balancer. A fleet connects through HAProxy and spreads over all six; configs and commands go to the host that
holds each device and only that host keeps them; a host killed outright loses its devices to the others, which
get their latest config there; and the sweep removes the dead host's subscription once its liveness record has
run out.

The Pub/Sub emulator stores a subscription's filter but does not apply it: it hands every host every message of
the topic. So "each host's subscription received only its own devices' messages" is checked in the two ways that
can be checked here — what each host's bridge KEPT (``delivery_received - delivery_foreign``) is exactly its own
devices' messages, and Pub/Sub's documented filter grammar (``pubsub_filter.py``, a test-only evaluator) applied to
every published message's attributes selects exactly that host's messages — not by watching a filter work.

One module-scoped tier is shared by the tests below (starting six hosts is most of the wall time); they run in
file order, and the last one kills a host.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.cloud import pubsub_v1

from iotbridge import spec
from iotbridge.bridge import fanout
from iotbridge.device import ConnectError, Device, DeviceIdentity
from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
from iotbridge.local.tls import generate_local_tls
from iotbridge.registry import Registry
from tests.conftest import require
from tests.waiting import wait_for

from .conftest import (
    GENEROUS_ADDRESS_LIMIT,
    PROJECT,
    REGION,
    REGISTRY,
    DeviceFactory,
    PubSubReader,
    create_topics,
    host_subscription_exists,
)
from .pubsub_filter import compile_filter

pytestmark = pytest.mark.emulator

HOSTS = tuple(f"host-{i}" for i in range(6))  # more than the four fan-out slots the tier used to be capped at
DEVICES_PER_HOST = 3
# The hosts' liveness records run this far ahead (renewed every third of it) instead of 90 s: a killed host's record
# runs out within seconds, through the setting the service reads (no clock faked, no 90 s wait).
ALIVE_S = 6.0


@dataclass
class Tier:
    prefix: str
    hosts: dict[str, BridgeStack]
    lb: services.Service
    ca: Path
    registry: Registry
    devices: list[Device] = field(default_factory=list)

    def device(self, device_id: str, private: bytes) -> Device:
        """A device that connects to HAProxy, not to any host."""
        d = Device(DeviceIdentity(PROJECT, REGION, REGISTRY, device_id, private, "ES256"), self.lb.host,
                   self.lb.port, str(self.ca))
        self.devices.append(d)
        return d

    def by_host(self) -> dict[str, list[str]]:
        """Device ids by the host their presence record names."""
        out: dict[str, list[str]] = collections.defaultdict(list)
        for d in self.devices:
            out[str(self.registry.connected_host(d.identity.device_id))].append(d.identity.device_id)
        return dict(out)

    def stats(self, host: str) -> dict[str, float]:
        return self.hosts[host].service_stats()


def _start_hosts(tmp: Path, env: dict[str, str], prefix: str) -> dict[str, BridgeStack]:
    """The six hosts, started side by side; all presenting one certificate, as hosts behind one load balancer do."""
    tls = generate_local_tls(tmp / "tls")

    def start(host: str) -> BridgeStack:
        return start_bridge_stack(tmp / host, PROJECT, REGION, REGISTRY, prefix, env, host_id=host, tls=tls,
                                  host_alive_s=ALIVE_S, **GENEROUS_ADDRESS_LIMIT)

    with ThreadPoolExecutor(len(HOSTS)) as pool:
        futures = {h: pool.submit(start, h) for h in HOSTS}
    started = {h: f.result() for h, f in futures.items() if f.exception() is None}
    failed = {h: f.exception() for h, f in futures.items() if f.exception() is not None}
    if failed:
        for st in started.values():
            st.stop()
        host, exc = next(iter(failed.items()))
        if isinstance(exc, services.MissingPrerequisite):
            pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
        raise AssertionError(f"{host} did not start: {exc}") from exc
    return started


def _connect(d: Device) -> None:
    """Connect through HAProxy and subscribe, retrying while HAProxy still offers a dead host (as firmware would)."""
    def attempt() -> bool:
        try:
            d.connect(timeout=10)
        except (ConnectError, OSError):
            with contextlib.suppress(Exception):
                d.client.loop_stop()
            return False
        return True

    wait_for(f"{d.identity.device_id} connected through the load balancer", attempt, timeout=30, interval=0.2)
    d.subscribe_config()
    d.subscribe_commands()


def _config(d: Device, expected: bytes) -> list[bytes | None]:
    """The configs the device got up to ``expected`` (an empty one may come first, as IoT Core sent it)."""
    seen = [d.configs.get(timeout=30)]
    while seen[-1] != expected:
        seen.append(d.configs.get(timeout=30))
    return seen


@pytest.fixture(scope="module")
def tier(bridge_env, registry, tmp_path_factory) -> Iterator[Tier]:
    tmp = tmp_path_factory.mktemp("scale-out")
    prefix = f"s{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    hosts = _start_hosts(tmp, bridge_env, prefix)
    lb = None
    t = None
    try:
        backends = [services.Backend(h, st.settings.front_port, st.settings.health_port) for h, st in hosts.items()]
        lb = require(services.start_haproxy, services.free_port(), backends, tmp / "haproxy")
        t = Tier(prefix, hosts, lb, tmp / "tls" / "ca.pem", registry)
        factory = DeviceFactory(registry, next(iter(hosts.values())))
        keys = [factory.register() for _ in range(DEVICES_PER_HOST * len(HOSTS))]
        fleet = [t.device(device_id, private) for device_id, private in keys]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(_connect, fleet))
        for d in fleet:
            # The first config a subscriber gets (empty: none pushed yet), out of the way of the tests' own.
            assert d.configs.get(timeout=30) == b""
        wait_for("every device's presence recorded", lambda: all(
            registry.connected_host(d.identity.device_id) for d in fleet), timeout=30)
        yield t
    finally:
        for d in t.devices if t else []:
            with contextlib.suppress(Exception):
                d.disconnect()
        if lb is not None:
            lb.stop()
        with ThreadPoolExecutor(len(hosts)) as pool:  # each clean stop deletes its subscription: side by side
            list(pool.map(BridgeStack.stop, hosts.values()))


def test_the_fleet_spreads_over_all_six_hosts_through_the_load_balancer(tier: Tier) -> None:
    by_host = tier.by_host()
    assert set(by_host) == set(HOSTS), by_host  # each host holds some devices, no device is without a host
    assert sum(len(v) for v in by_host.values()) == DEVICES_PER_HOST * len(HOSTS)
    # The hosts' own fronts agree with the presence records: each holds as many connections as devices it names.
    for h, st in tier.hosts.items():
        assert st.front_stats()["connected"] == len(by_host[h]), h


def test_configs_and_commands_reach_every_host_and_each_host_keeps_only_its_own(tier: Tier) -> None:
    by_host = tier.by_host()
    pub = pubsub_v1.PublisherClient()
    audit = PubSubReader(PROJECT, tier.prefix)  # unfiltered: every message published on the topic
    audit.attach(f"audit{uuid.uuid4().hex[:6]}", ("device-commands",))
    before = {h: tier.stats(h) for h in HOSTS}
    for d in tier.devices:
        device_id = d.identity.device_id
        fanout.push_config(tier.registry, pub, tier.prefix, device_id, f"cfg-{device_id}".encode(), min_interval_s=0)
        fanout.send_command(tier.registry, pub, tier.prefix, device_id, f"cmd-{device_id}".encode())
    for d in tier.devices:
        device_id = d.identity.device_id
        assert _config(d, f"cfg-{device_id}".encode())[:-1] in ([], [b""])
        assert d.commands.get(timeout=30) == (f"/devices/{device_id}/commands", f"cmd-{device_id}".encode())

    total = 2 * len(tier.devices)
    own = {h: 2 * len(by_host[h]) for h in HOSTS}

    def counts() -> dict[str, tuple[float, float]]:
        return {h: (tier.stats(h)["delivery_received"] - before[h]["delivery_received"],
                    tier.stats(h)["delivery_foreign"] - before[h]["delivery_foreign"]) for h in HOSTS}

    # Kept = received - foreign is exactly the host's own devices' messages. Foreign: 0 under real Pub/Sub's
    # filter; the emulator, which does not filter, hands each host the other hosts' messages too, all dropped.
    got = wait_for("each host's deliveries counted", counts, lambda c: all(
        r - f == own[h] and f in (0, total - own[h]) for h, (r, f) in c.items()), timeout=30)
    assert {h: r - f for h, (r, f) in got.items()} == own

    sent = [dict(m.attributes) for m in audit.pull("device-commands", total, settle=1.0)]
    assert len(sent) == total
    for h in HOSTS:
        admitted = collections.Counter(a["deviceId"] for a in sent if compile_filter(spec.host_filter(h))(a))
        assert admitted == {device_id: 2 for device_id in by_host[h]}, h  # a config and a command each


def test_a_killed_hosts_devices_move_get_their_latest_config_and_its_subscription_is_swept(tier: Tier) -> None:
    by_host = tier.by_host()
    victim = HOSTS[2]
    moved = [d for d in tier.devices if d.identity.device_id in by_host[victim]]
    assert moved
    pub, sub = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    for role in ("front", "service", "mosquitto"):  # SIGKILL, no clean stop: its subscription stays behind
        tier.hosts[victim].kill(role)
    for d in moved:
        d.disconnects.get(timeout=30)
        with contextlib.suppress(queue.Empty):
            while True:  # anything received before the kill is not what this test looks for
                d.configs.get_nowait()

    # Configs updated while the devices are away (twice: the latest is what counts). Their presence records still
    # name the dead host until they reconnect, so these go nowhere; the registry keeps them.
    for d in moved:
        device_id = d.identity.device_id
        for n in (2, 3):
            fanout.push_config(tier.registry, pub, tier.prefix, device_id, f"cfg{n}-{device_id}".encode(),
                               min_interval_s=0)
    # Once the dead host's liveness record has run out, a command to its devices is refused, as one to a device
    # connected nowhere (their presence records still name the dead host: without this it would be accepted and
    # lost in a subscription nobody reads).
    assert host_subscription_exists(sub, tier.prefix, victim)
    live = wait_for(f"{victim}'s liveness record to run out", lambda: fanout.live_hosts(
        tier.registry.client, REGISTRY), lambda alive: victim not in alive, timeout=ALIVE_S + 20, interval=0.5)
    assert tier.registry.connected_host(moved[0].identity.device_id) == victim
    with pytest.raises(fanout.DeviceNotConnected, match="gone"):
        fanout.send_command(tier.registry, pub, tier.prefix, moved[0].identity.device_id, b"lost")

    for d in moved:
        _connect(d)
    after = tier.by_host()
    assert victim not in after and set(after) == set(HOSTS) - {victim}, after
    for d in moved:
        device_id = d.identity.device_id
        # The first config on the new host is the latest: nothing stale, nothing missed.
        assert d.configs.get(timeout=30) == f"cfg3-{device_id}".encode()
        # And a command and a config sent now reach the device where it is.
        fanout.send_command(tier.registry, pub, tier.prefix, device_id, b"after-move")
        assert d.commands.get(timeout=30) == (f"/devices/{device_id}/commands", b"after-move")
        fanout.push_config(tier.registry, pub, tier.prefix, device_id, f"cfg4-{device_id}".encode(), min_interval_s=0)
        assert _config(d, f"cfg4-{device_id}".encode()) == [f"cfg4-{device_id}".encode()]

    # The sweep: the dead host's subscription was still there (a SIGKILL deletes nothing, checked above); its
    # liveness record has run out, the others' have not, and the sweep deletes its subscription and only it.
    assert set(HOSTS) - {victim} <= live
    assert set(HOSTS) - {victim} <= fanout.live_hosts(tier.registry.client, REGISTRY)
    deleted = fanout.sweep(sub, pub, tier.registry.client, PROJECT, tier.prefix, REGISTRY)
    assert deleted == [fanout.host_subscription(tier.prefix, victim)]
    assert not host_subscription_exists(sub, tier.prefix, victim)
    assert all(host_subscription_exists(sub, tier.prefix, h) for h in HOSTS if h != victim)

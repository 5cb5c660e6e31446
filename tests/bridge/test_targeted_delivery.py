"""Targeted delivery on real processes: two broker hosts on one stack, each with its own filtered delivery
subscription; configs and commands reach the host that holds the device, and only that host."""

from __future__ import annotations

import json
import queue
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from google.cloud import pubsub_v1

from iotbridge import spec
from iotbridge.bridge import fanout
from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack, start_bridge_stack
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
from .pubsub_filter import FilterSyntaxError, compile_filter

pytestmark = pytest.mark.emulator


def test_a_host_subscription_carries_its_filter_expiration_and_dead_letter_policy(bridge_env):
    """What a host creates: its filter, a 24 h expiration, retries backing off 10 s to 10 min, and after ten
    attempts the stack's dead-letter topic. (The emulator stores the filter but hands the subscription every message
    of the topic — it does not apply filters — so which messages a filter admits is checked with the documented
    grammar below, and the bridge drops another host's messages itself.)"""
    prefix = f"f{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    sub = pubsub_v1.SubscriberClient()
    path = fanout.ensure_host_subscription(sub, PROJECT, prefix, "host-a")
    got = sub.get_subscription(request={"subscription": path})
    assert got.filter == 'attributes.hostId = "host-a"'
    assert cast(timedelta, got.expiration_policy.ttl) == timedelta(hours=24)  # proto-plus gives a timedelta
    assert got.dead_letter_policy.dead_letter_topic == f"projects/{PROJECT}/topics/{prefix}-dead-letter"
    assert got.dead_letter_policy.max_delivery_attempts == 10
    assert (cast(timedelta, got.retry_policy.minimum_backoff), cast(timedelta, got.retry_policy.maximum_backoff)) == (
        timedelta(seconds=10), timedelta(minutes=10))
    assert fanout.ensure_host_subscription(sub, PROJECT, prefix, "host-a") == path  # a restart reuses it
    # One of that name without the filter (made by hand) is replaced: filters cannot be changed in place.
    fanout.delete_host_subscription(sub, PROJECT, prefix, "host-a")
    sub.create_subscription(request={"name": path, "topic": fanout.topic_path(PROJECT, prefix)})
    fanout.ensure_host_subscription(sub, PROJECT, prefix, "host-a")
    assert sub.get_subscription(request={"subscription": path}).filter == 'attributes.hostId = "host-a"'
    # One with the filter but no dead-letter policy (an earlier version's) too: the host may not update it.
    fanout.delete_host_subscription(sub, PROJECT, prefix, "host-a")
    sub.create_subscription(request={"name": path, "topic": fanout.topic_path(PROJECT, prefix),
                                     "filter": spec.host_filter("host-a")})
    fanout.ensure_host_subscription(sub, PROJECT, prefix, "host-a")
    assert sub.get_subscription(request={"subscription": path}).dead_letter_policy.max_delivery_attempts == 10
    fanout.delete_host_subscription(sub, PROJECT, prefix, "host-a")


def test_the_host_filter_admits_its_hosts_messages_only_by_the_documented_grammar():
    """Labelled for what it is: Pub/Sub's filter grammar as documented, evaluated by tests/bridge/pubsub_filter.py,
    not by Pub/Sub (the emulator does not apply filters)."""
    admits = compile_filter(spec.host_filter("host-a"))
    for host, expected in (("host-a", True), ("host-b", False), ("host-ab", False), ("host", False), ("", False)):
        attrs = spec.FanoutMessage(spec.FANOUT_KIND_CONFIG, "dev-xyz", 3, host_id=host).attributes()
        assert admits(attrs) is expected, host
    # The stand-in itself, on the documentation's examples, and refusing what the grammar does not allow.
    assert compile_filter('attributes:name')({"name": ""}) and not compile_filter("NOT attributes:name")({"name": ""})
    assert compile_filter('attributes.name != "com"')({}) and compile_filter('hasPrefix(attributes.name, "co")')(
        {"name": "com"})
    assert compile_filter('(attributes.a = "1" OR attributes.b = "2") AND -attributes:c')({"b": "2"})
    for bad in ('attributes.a = "1" AND attributes.b = "2" OR attributes:c', "attributes.a = 1", "attrs:a",
                'attributes.a == "1"', "x" * 300):
        with pytest.raises(FilterSyntaxError):
            compile_filter(bad)


def test_a_host_id_that_could_break_out_of_the_filter_is_refused():
    for bad in ('a" OR attributes.kind = "config', "a\\b", "", "1host", "x" * 64):
        with pytest.raises(spec.MessageError):
            spec.host_filter(bad)
    assert len(spec.host_filter("h" + "x" * 62).encode()) <= spec.MAX_FILTER_BYTES


def _stats(stack: BridgeStack) -> dict[str, int]:
    path = Path(stack.settings.workdir) / "service-stats.json"
    wait_for(f"{path} written", path.exists, timeout=15)
    return json.loads(path.read_text())


def _host(tmp, env, prefix: str, host_id: str) -> BridgeStack:
    try:
        return start_bridge_stack(tmp / host_id, PROJECT, REGION, REGISTRY, prefix, env, recheck_interval_s=0.5,
                                  host_id=host_id, **GENEROUS_ADDRESS_LIMIT)
    except services.MissingPrerequisite as exc:
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)


def test_two_hosts_each_get_only_their_devices_messages(bridge_env, registry, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    hosts = {h: _host(tmp_path, bridge_env, prefix, h) for h in ("host-a", "host-b")}
    sub, pub = pubsub_v1.SubscriberClient(), pubsub_v1.PublisherClient()
    try:
        for h in hosts:
            assert host_subscription_exists(sub, prefix, h)
        factory = DeviceFactory(registry, hosts["host-a"])
        devs = {}
        for h, st in hosts.items():
            device_id, key = factory.register()
            d = factory.device(device_id, key, stack=st)
            d.connect()
            d.subscribe_config()
            d.subscribe_commands()
            wait_for(f"{device_id} present on {h}", lambda i=device_id: registry.connected_host(i),
                     lambda v, h=h: v == h, timeout=10)
            devs[h] = d
        audit = PubSubReader(PROJECT, prefix)  # an unfiltered subscription: everything published on the topic
        audit.attach("audit", ("device-commands",))
        before = {h: (_stats(st)["delivery_received"], _stats(st)["delivery_foreign"]) for h, st in hosts.items()}
        for h, d in devs.items():
            device_id = d.identity.device_id
            fanout.push_config(registry, pub, prefix, device_id, f"cfg-{h}".encode(), min_interval_s=0)
            fanout.send_command(registry, pub, prefix, device_id, f"cmd-{h}".encode())
        for h, d in devs.items():
            seen = [d.configs.get(timeout=30)]
            while seen[-1] != f"cfg-{h}".encode():  # an empty first config may come before it
                seen.append(d.configs.get(timeout=30))
            assert seen[:-1] in ([], [b""])
            topic, data = d.commands.get(timeout=30)
            assert (topic, data) == (f"/devices/{d.identity.device_id}/commands", f"cmd-{h}".encode())
        # Each host handled exactly its own device's config and command (2 each). What its subscription handed it
        # beyond those were the other host's messages, which real Pub/Sub's filter keeps out and the emulator does
        # not (so they are counted apart, and every one was dropped by the bridge as not its own).
        def counts() -> dict[str, tuple[int, int]]:
            return {h: (_stats(st)["delivery_received"] - before[h][0], _stats(st)["delivery_foreign"] - before[h][1])
                    for h, st in hosts.items()}

        # The other host's messages may come after a host's own (the emulator hands them over in no set order).
        got = wait_for("deliveries counted", counts, lambda c: all(r - f == 2 and f in (0, 2) for r, f in c.values()),
                       timeout=15)
        assert all(f in (0, 2) for _, f in got.values()), got
        sent = [dict(m.attributes) for m in audit.pull("device-commands", 4, settle=1.0)]
        assert len(sent) == 4
        for h in hosts:
            assert sum(compile_filter(spec.host_filter(h))(a) for a in sent) == 2

        # A device connected nowhere: a config is stored, not published; a command is refused.
        lone, _ = factory.register()
        fanout.push_config(registry, pub, prefix, lone, b"later", min_interval_s=0)
        assert registry.get_config(lone).data == b"later"
        with pytest.raises(fanout.DeviceNotConnected):
            fanout.send_command(registry, pub, prefix, lone, b"x")

        # A host that stops cleanly deletes its subscription and runs its liveness record out: a presence record its
        # front could not remove while stopping (written here as one left behind) cannot make a command be lost.
        hosts["host-b"].stop()
        wait_for("host-b's subscription deleted", lambda: host_subscription_exists(sub, prefix, "host-b"),
                 lambda v: not v, timeout=15)
        assert "host-b" not in fanout.live_hosts(registry.client, REGISTRY)
        left_behind, _ = factory.register()
        fanout.mark_connected(registry.client, REGISTRY, left_behind, "host-b", "s-left", datetime.now(UTC)
                              + timedelta(hours=1))
        with pytest.raises(fanout.DeviceNotConnected, match="host-b is gone"):
            fanout.send_command(registry, pub, prefix, left_behind, b"x")

        # A host that dies (SIGKILL: nothing deleted) is swept once its liveness record has run out; a live host's
        # subscription is left alone.
        hosts["host-a"].kill("service")
        assert host_subscription_exists(sub, prefix, "host-a")
        fanout.mark_host_alive(registry.client, REGISTRY, "host-a", seconds=-1)  # as it reads 90 s after the death
        # Its device's presence still names it, but nothing reads its subscription: a command is refused, not lost.
        with pytest.raises(fanout.DeviceNotConnected, match="host-a is gone"):
            fanout.send_command(registry, pub, prefix, devs["host-a"].identity.device_id, b"x")
        fanout.ensure_host_subscription(sub, PROJECT, prefix, "host-c")
        c_alive = fanout.mark_host_alive(registry.client, REGISTRY, "host-c")
        # A record that ran out longer ago than any presence record can last is removed by the sweep; newer ones stay.
        fanout.mark_host_alive(registry.client, REGISTRY, "host-old", seconds=-fanout.HOST_RECORD_KEEP_S - 60)
        deleted = fanout.sweep(sub, pub, registry.client, PROJECT, prefix, REGISTRY)
        assert deleted == [fanout.host_subscription(prefix, "host-a")]
        assert not host_subscription_exists(sub, prefix, "host-a") and host_subscription_exists(sub, prefix, "host-c")
        records = {d.id for d in registry.client.collection("registries").document(REGISTRY)
                   .collection("bridge_hosts").stream()}
        assert "host-old" not in records and {"host-a", "host-b", "host-c"} <= records
        fanout.delete_host_subscription(sub, PROJECT, prefix, "host-c")
        assert fanout.mark_host_gone(registry.client, REGISTRY, "host-c", c_alive)
        for d in devs.values():
            d.disconnect()
    finally:
        for st in hosts.values():
            st.stop()


def test_a_host_whose_subscription_is_deleted_under_it_makes_it_again(bridge_env, registry, tmp_path):
    """A sweep that judged a running host dead (its liveness record ran out while Firestore was out of its reach),
    or an operator, deletes the subscription of a host that still runs: the host makes it again and reads on."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    host = _host(tmp_path, bridge_env, prefix, "host-r")
    sub, pub = pubsub_v1.SubscriberClient(), pubsub_v1.PublisherClient()
    try:
        factory = DeviceFactory(registry, host)
        device_id, key = factory.register()
        dev = factory.device(device_id, key, stack=host)
        dev.connect()
        dev.subscribe_config()
        wait_for("presence", lambda: registry.connected_host(device_id), lambda v: v == "host-r", timeout=10)
        fanout.delete_host_subscription(sub, PROJECT, prefix, "host-r")
        wait_for("the subscription made again", lambda: host.service_stats().get("delivery_resubscribed", 0),
                 lambda v: v >= 1, timeout=60)
        assert host_subscription_exists(sub, prefix, "host-r")
        fanout.push_config(registry, pub, prefix, device_id, b"after", min_interval_s=0)
        def next_config() -> bytes | None:
            try:
                return dev.configs.get(timeout=1)
            except queue.Empty:
                return None

        wait_for("the config through the new subscription", next_config, lambda v: v == b"after", timeout=30)
        dev.disconnect()
    finally:
        host.stop()


def test_a_clean_stop_runs_out_only_the_record_the_stopping_host_last_wrote(registry):
    """Two processes under one host id (a replacement VM that has the instance's name, or test stacks sharing the
    default id): the one stopping must not run out the record the other has renewed since."""
    host = f"host-{uuid.uuid4().hex[:6]}"
    old = fanout.mark_host_alive(registry.client, REGISTRY, host)
    new = fanout.mark_host_alive(registry.client, REGISTRY, host)  # the other process renews the record
    assert not fanout.mark_host_gone(registry.client, REGISTRY, host, old)
    assert host in fanout.live_hosts(registry.client, REGISTRY)
    assert fanout.mark_host_gone(registry.client, REGISTRY, host, new)
    assert host not in fanout.live_hosts(registry.client, REGISTRY)
    assert fanout.host_gone(registry.client, REGISTRY, host)

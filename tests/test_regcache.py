"""The registry's change feed and what a broker host keeps of the registry (iotbridge/bridge/regcache.py): the
stamps every connection-relevant write sets, the re-check rounds that read only what changed, the cache CONNECTs
use while it is fresh, and the batched reads and presence writes. All against the Firestore emulator."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from iotbridge.bridge import fanout, regcache
from iotbridge.device import generate_key
from iotbridge.registry import Credential, GatewayConfig, Registry
from tests.aio import run_in_own_loop

pytestmark = pytest.mark.emulator


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> Registry:
    emulator_env(firestore_emulator)
    return Registry("local-project", f"reg-{uuid.uuid4().hex[:12]}", "europe-west1")


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def _credential() -> Credential:
    return Credential("ES256_PEM", generate_key("ES256")[1])


def _changed_by(registry: Registry, write) -> set[str]:  # noqa: ANN001
    """The devices the change feed reports for what ``write`` did (stamps from before it are excluded)."""
    time.sleep(0.05)
    since = datetime.now(UTC)
    time.sleep(0.05)
    write()
    return set(registry.changed_since(since))


def test_every_write_a_session_rests_on_stamps_the_device_and_no_other_write_does(registry):
    registry.create_device("gw-1", gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
    assert _changed_by(registry, lambda: registry.create_device("dev-1")) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.set_blocked("dev-1", True)) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.set_blocked("dev-1", False)) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.set_credentials("dev-1", [_credential()])) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.add_credential("dev-1", _credential())) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.bind_device_to_gateway("gw-1", "dev-1")) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.unbind_device_from_gateway("gw-1", "dev-1")) == {"dev-1"}
    assert _changed_by(registry, lambda: registry.set_gateway_auth_method(
        "gw-1", "DEVICE_AUTH_TOKEN_ONLY")) == {"gw-1"}
    # Writes that no session rests on leave the feed alone (they are the frequent ones).
    for write in (lambda: registry.record_event("dev-1"), lambda: registry.record_heartbeat("dev-1"),
                  lambda: registry.set_metadata("dev-1", {"k": "v"}), lambda: registry.record_error("dev-1", "x"),
                  lambda: registry.update_config("dev-1", b"{}", min_interval_s=0)):
        assert _changed_by(registry, write) == set()


def test_a_deletion_leaves_a_tombstone_and_stamps_the_devices_bound_to_a_deleted_gateway(registry):
    registry.create_device("gw-2", gateway_config=GatewayConfig("GATEWAY", "ASSOCIATION_ONLY"))
    registry.create_device("dev-2")
    registry.bind_device_to_gateway("gw-2", "dev-2")
    assert _changed_by(registry, lambda: registry.delete_device("gw-2")) == {"gw-2", "dev-2"}
    assert _changed_by(registry, lambda: registry.delete_device("dev-2")) == {"dev-2"}


def test_a_failed_write_stamps_nothing(registry):
    from iotbridge.registry import DeviceNotFound

    def missing() -> None:
        with pytest.raises(DeviceNotFound):
            registry.set_blocked("never-created", True)

    assert _changed_by(registry, missing) == set()


def _round(cache: regcache.RegistryCache, registry: Registry, needed) -> dict:  # noqa: ANN001
    return run_in_own_loop(cache.refresh(registry, needed))


def test_a_round_reads_only_the_changed_devices_and_sees_blocks_credential_changes_and_deletions(registry, pool,
                                                                                                 monkeypatch):
    # A short overlap window, passed before the first round: the creations are not "changes since" it.
    monkeypatch.setattr(regcache, "OVERLAP_S", 0.2)
    ids = [f"dev-{i}" for i in range(20)]
    for d in ids:
        registry.create_device(d, credentials=[_credential()])
    time.sleep(0.3)
    cache = regcache.RegistryCache(30.0, pool)
    first = _round(cache, registry, ids)
    assert set(first) == set(ids) and cache.stats["reread"] == 20  # nothing known yet: all read once
    second = _round(cache, registry, ids)
    assert second == first and cache.stats["reread"] == 20  # nothing changed: nothing read
    registry.set_blocked("dev-3", True)
    registry.set_credentials("dev-4", [_credential()])
    registry.delete_device("dev-5")
    third = _round(cache, registry, ids)
    assert cache.stats["reread"] == 23  # the three changed devices, no other
    assert third["dev-3"].blocked and third["dev-4"].credentials != first["dev-4"].credentials
    assert "dev-5" not in third
    assert {d: g for d, g in third.items() if d not in ("dev-3", "dev-4")} == {
        d: g for d, g in first.items() if d not in ("dev-3", "dev-4", "dev-5")}


def test_a_connect_read_older_than_the_last_round_still_gets_its_missed_change(registry, pool, monkeypatch):
    """The CONNECT's read (sent at r) misses a block committed after it; a round runs before the CONNECT's result
    is put in the cache. The next round must ask from r, not from the previous round's start: with no overlap
    window at all (so only that rule can save it) the block is still seen."""
    monkeypatch.setattr(regcache, "OVERLAP_S", 0.0)
    registry.create_device("dev-late", credentials=[_credential()])
    cache = regcache.RegistryCache(30.0, pool)
    _round(cache, registry, [])
    read_at = datetime.now(UTC)
    device = registry.get_device("dev-late")  # the CONNECT's read: not blocked
    time.sleep(0.05)
    registry.set_blocked("dev-late", True)
    time.sleep(0.05)
    _round(cache, registry, [])  # sees the change, but the cache does not hold the device yet
    cache.learned(registry, device, read_at)  # the CONNECT's result arrives
    grants = _round(cache, registry, ["dev-late"])
    assert grants["dev-late"].blocked


def test_consecutive_rounds_leave_no_gap(registry, pool, monkeypatch):
    """A change committed while a round runs (after its query) is returned by the next round, even without an
    overlap window: each round asks from the previous round's start."""
    monkeypatch.setattr(regcache, "OVERLAP_S", 0.0)
    registry.create_device("dev-gap", credentials=[_credential()])
    time.sleep(0.1)
    cache = regcache.RegistryCache(30.0, pool)
    _round(cache, registry, ["dev-gap"])
    real = registry.changed_since

    def changed_then_block(since: datetime) -> dict[str, datetime]:
        out = real(since)
        registry.set_blocked("dev-gap", True)  # committed after this round's query
        return out

    monkeypatch.setattr(registry, "changed_since", changed_then_block)
    assert not _round(cache, registry, ["dev-gap"])["dev-gap"].blocked
    monkeypatch.setattr(registry, "changed_since", real)
    assert _round(cache, registry, ["dev-gap"])["dev-gap"].blocked


def test_the_cache_serves_a_connect_only_while_fresh_and_not_after_a_change(registry, pool):
    registry.create_device("dev-c", credentials=[_credential()])
    offset = [timedelta(0)]
    cache = regcache.RegistryCache(30.0, pool, now=lambda: datetime.now(UTC) + offset[0])
    device = registry.get_device("dev-c")
    cache.learned(registry, device, datetime.now(UTC))
    assert cache.device(registry, "dev-c") is None  # no round has covered the read yet
    _round(cache, registry, ["dev-c"])
    _round(cache, registry, ["dev-c"])
    cache.learned(registry, device, datetime.now(UTC))
    assert cache.device(registry, "dev-c") == device
    offset[0] = timedelta(seconds=61)  # no round for twice the interval (the registry unreachable, say)
    assert cache.device(registry, "dev-c") is None
    offset[0] = timedelta(0)
    registry.set_blocked("dev-c", True)
    _round(cache, registry, ["dev-c"])
    assert cache.device(registry, "dev-c") is None  # changed: the next CONNECT reads the registry


def test_a_failed_round_changes_nothing_and_the_next_one_asks_from_the_last_good_start(registry, pool, monkeypatch):
    registry.create_device("dev-f", credentials=[_credential()])
    cache = regcache.RegistryCache(30.0, pool)
    _round(cache, registry, ["dev-f"])
    registry.set_blocked("dev-f", True)
    real = registry.changed_since

    def unreachable(since: datetime) -> dict[str, datetime]:
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(registry, "changed_since", unreachable)
    with pytest.raises(ConnectionError):
        _round(cache, registry, ["dev-f"])
    time.sleep(0.1)
    monkeypatch.setattr(registry, "changed_since", real)
    assert _round(cache, registry, ["dev-f"])["dev-f"].blocked


def test_concurrent_connect_reads_share_one_registry_read(registry, pool):
    for d in ("dev-r1", "dev-r2", "dev-r3"):
        registry.create_device(d)
    batcher = regcache.ReadBatcher(pool)

    async def connects():  # noqa: ANN202
        return await asyncio.gather(*(batcher.get(registry, d) for d in ("dev-r1", "dev-r2", "dev-r3", "nobody",
                                                                         "dev-r1")))

    found = run_in_own_loop(connects())
    assert [d.id if d else None for d in found] == ["dev-r1", "dev-r2", "dev-r3", None, "dev-r1"]
    assert batcher.batches == 1


def test_presence_records_of_concurrent_connects_share_one_commit_and_stay_removable(registry, pool):
    batcher = regcache.WriteBatcher(pool, fanout.mark_connected_many)
    until = datetime.now(UTC) + timedelta(hours=1)
    ids = [f"dev-p{i}" for i in range(30)]

    async def connects():  # noqa: ANN202
        return await asyncio.gather(*(batcher.write(registry.client, (registry.registry_id, d, "host-a", f"s-{d}",
                                                                      until)) for d in ids))

    times = run_in_own_loop(connects())
    assert batcher.commits == 1
    assert [registry.connected_host(d) for d in ids] == ["host-a"] * 30
    # Each write's own update time removes its record (the disconnect's precondition), and only its own.
    fanout.mark_disconnected(registry.client, registry.registry_id, "dev-p0", times[0])
    assert registry.connected_host("dev-p0") is None
    fanout.mark_disconnected(registry.client, registry.registry_id, "dev-p1", times[0] - timedelta(seconds=1))
    assert registry.connected_host("dev-p1") == "host-a"


def test_a_stamp_expires_a_week_after_the_change_for_the_ttl_policy(registry):
    before = datetime.now(UTC)
    registry.create_device("dev-ttl")
    after = datetime.now(UTC)
    from iotbridge.registry import CHANGE_STAMP_KEEP_S, CHANGES

    stamp = (registry.client.collection("registries").document(registry.registry_id).collection(CHANGES)
             .document("dev-ttl").get().to_dict() or {})
    keep = timedelta(seconds=CHANGE_STAMP_KEEP_S)
    assert keep == timedelta(days=7)
    assert before + keep <= stamp["expire_at"] <= after + keep


def test_after_rounds_failed_for_half_the_stamps_lifetime_a_round_reads_every_device_again(registry, pool,
                                                                                          monkeypatch):
    """The TTL policy removes stamps CHANGE_STAMP_KEEP_S after their change: a host whose last good round is that
    old may ask for changes the registry no longer records, so it does not trust the feed."""
    from iotbridge.registry import CHANGE_STAMP_KEEP_S

    registry.create_device("dev-old", credentials=[_credential()])
    offset = [timedelta(0)]
    cache = regcache.RegistryCache(30.0, pool, now=lambda: datetime.now(UTC) + offset[0])
    _round(cache, registry, ["dev-old"])
    _round(cache, registry, ["dev-old"])
    read = cache.stats["reread"]
    # A change whose stamp the TTL policy has already removed: the feed no longer reports it.
    registry.set_blocked("dev-old", True)
    registry.client.collection("registries").document(registry.registry_id).collection("changes") \
        .document("dev-old").delete()
    offset[0] = timedelta(seconds=CHANGE_STAMP_KEEP_S / 2 - 60)
    assert not _round(cache, registry, ["dev-old"])["dev-old"].blocked  # still trusted, nothing reported
    assert cache.stats["reread"] == read
    offset[0] = timedelta(seconds=CHANGE_STAMP_KEEP_S)  # no good round for half the lifetime since the last one
    assert _round(cache, registry, ["dev-old"])["dev-old"].blocked
    assert cache.stats["reread"] == read + 1


def test_the_cache_keeps_neither_made_up_registries_nor_a_devices_state_and_metadata(registry, pool):
    cache = regcache.RegistryCache(30.0, pool)
    for i in range(50):  # CONNECTs naming registries nobody created
        assert cache.device(Registry(registry.project, f"made-up-{i}", registry.region), "dev-x") is None
        assert cache.grant(Registry(registry.project, f"made-up-{i}", registry.region), "dev-x") is None
    assert cache._known == {}
    registry.create_device("dev-big", credentials=[_credential()])
    registry.set_metadata("dev-big", {f"k{i}": "v" * 1000 for i in range(50)})
    registry.record_state("dev-big", b"s" * 60_000)
    device = registry.get_device("dev-big")
    assert device.state and device.metadata
    _round(cache, registry, [])
    _round(cache, registry, [])
    cache.learned(registry, device, datetime.now(UTC))
    kept = cache.device(registry, "dev-big")
    assert kept is not None and kept.state is None and kept.metadata == {}
    assert (kept.credentials, kept.num_id, kept.blocked) == (device.credentials, device.num_id, device.blocked)


def test_a_device_twice_in_one_presence_commit_keeps_the_later_sessions_record(registry):
    """A session taken over within the batching window: both writes in one commit would share an update time, and
    the earlier session's end would then remove the later one's record."""
    until = datetime.now(UTC) + timedelta(hours=1)
    times = fanout.mark_connected_many(registry.client, [
        (registry.registry_id, "dev-twice", "host-a", "s-old", until),
        (registry.registry_id, "dev-other", "host-a", "s-x", until),
        (registry.registry_id, "dev-twice", "host-b", "s-new", until)])
    assert times[0] is None and times[1] is not None and times[2] is not None
    assert registry.connected_host("dev-twice") == "host-b"
    # The old session ends: with no update time of its own it removes nothing (the front skips it); the new one's
    # end removes its own record.
    fanout.mark_disconnected(registry.client, registry.registry_id, "dev-twice", times[2])
    assert registry.connected_host("dev-twice") is None and registry.connected_host("dev-other") == "host-a"

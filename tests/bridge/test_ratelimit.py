"""The front's limits as pure bookkeeping on a clock the test moves: buckets, per-address failures, the memory of
unknown devices, and when a connected session must end."""

from __future__ import annotations

from datetime import timedelta

import pytest

from iotbridge.bridge.front import address_key, revoked_reason
from iotbridge.bridge.ratelimit import ExpiringSet, KeyedBuckets, TokenBucket
from iotbridge.registry import Grant


def test_bucket_allows_its_burst_then_holds_the_rate() -> None:
    b = TokenBucket(rate=100, burst=100, now=0.0)
    assert [b.take(1, 0.0) for _ in range(100)] == [0.0] * 100
    # The 101st message at the same instant waits 1/100 s; the next one 2/100 s: held to 100 a second.
    assert b.take(1, 0.0) == pytest.approx(0.01)
    assert b.take(1, 0.0) == pytest.approx(0.02)
    # A caller that waited as told is back within the limit.
    assert b.take(1, 0.03) == pytest.approx(0.0)
    # Idle time refills up to the burst, never beyond it.
    assert b.available(1000.0) == 100


def test_bytes_bucket_charges_by_size() -> None:
    b = TokenBucket(rate=512 * 1024, burst=512 * 1024, now=0.0)
    assert b.take(256 * 1024, 0.0) == 0.0 and b.take(256 * 1024, 0.0) == 0.0
    assert b.take(512 * 1024, 0.0) == pytest.approx(1.0)  # a second's worth over: a second's wait


def test_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 0.0)


def test_an_address_is_cut_off_after_its_failure_burst_and_earns_tokens_back() -> None:
    f = KeyedBuckets(rate=2, burst=20, max_keys=100)
    for _ in range(20):
        assert not f.exhausted("10.0.0.9", 0.0)
        f.charge("10.0.0.9", 0.0)
    assert f.exhausted("10.0.0.9", 0.0)
    assert not f.exhausted("10.0.0.8", 0.0)  # another address is not affected
    for _ in range(1000):  # a flood cannot dig a debt deeper than one burst
        f.charge("10.0.0.9", 0.0)
    assert f.exhausted("10.0.0.9", 10.0)
    assert not f.exhausted("10.0.0.9", 10.5)  # 20 tokens of debt, 2 a second, one token to spare


def test_tracked_addresses_are_bounded() -> None:
    f = KeyedBuckets(rate=1, burst=1, max_keys=3)
    for i in range(10):
        f.charge(f"a{i}", 0.0)
    assert len(f) == 3 and f.exhausted("a9", 0.0) and not f.exhausted("a0", 0.0)


def test_unknown_devices_are_remembered_briefly_and_boundedly() -> None:
    u = ExpiringSet(ttl=10, max_keys=2)
    u.add("ghost-1", 0.0)
    assert u.has("ghost-1", 9.9) and not u.has("ghost-1", 10.0)
    for name in ("g1", "g2", "g3"):
        u.add(name, 0.0)
    assert len(u) == 2 and not u.has("g1", 0.0) and u.has("g3", 0.0)


def test_revoked_reason_for_every_change_of_the_registry(clock) -> None:
    now = clock.now()
    pem, other = "PEM-A", "PEM-B"
    ok = Grant(num_id="1", blocked=False, credentials={pem: None, other: None})
    assert revoked_reason("1", pem, ok, now) == ""
    assert revoked_reason("1", pem, None, now) == "device deleted"
    assert revoked_reason("1", pem, Grant("2", False, {pem: None}), now) == "device deleted"  # created again
    assert revoked_reason("1", pem, Grant("1", True, {pem: None}), now) == "device blocked"
    assert revoked_reason("1", pem, Grant("1", False, {other: None}), now) == "credential removed"  # rotated
    assert revoked_reason("1", pem, Grant("1", False, {pem: now - timedelta(seconds=1)}), now) == \
        "credential expired"
    assert revoked_reason("1", pem, Grant("1", False, {pem: now + timedelta(seconds=1)}), now) == ""


def test_addresses_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("not-an-ip") == "not-an-ip"

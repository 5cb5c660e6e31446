"""Rate limits of the front: token buckets per device session and per source address, and a short-lived memory of
device ids the registry does not know. Pure bookkeeping on a caller-supplied monotonic clock (no I/O, no threads),
so every limit is tested without waiting."""

from __future__ import annotations

from collections import OrderedDict


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. ``take`` may run into debt and says how long the
    caller must wait for the debt to be paid: a caller that waits that long is held to ``rate`` on average."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float):
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate, self.burst, self.tokens, self.last = float(rate), float(burst), float(burst), now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, cost: float, now: float) -> float:
        """Spend ``cost`` tokens; the seconds to wait before going on (0 while within the limit)."""
        self._refill(now)
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a source address), the least recently used forgotten past ``max_keys``
    so that a flood of new keys costs bounded memory."""

    def __init__(self, rate: float, burst: float, max_keys: int):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def exhausted(self, key: str, now: float) -> bool:
        """True while ``key`` has less than one token left (it spent its burst and has not earned one back)."""
        bucket = self._buckets.get(key)
        return bucket is not None and bucket.available(now) < 1.0

    def charge(self, key: str, now: float) -> None:
        bucket = self._bucket(key, now)
        bucket.take(1.0, now)
        bucket.tokens = max(bucket.tokens, -bucket.burst)  # a flood cannot dig a debt deeper than one burst

    def __len__(self) -> int:
        return len(self._buckets)


class ExpiringSet:
    """Keys remembered for ``ttl`` seconds, at most ``max_keys`` of them (the oldest forgotten first)."""

    def __init__(self, ttl: float, max_keys: int):
        self.ttl, self.max_keys = ttl, max_keys
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str, now: float) -> None:
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self.max_keys:
            self._until.popitem(last=False)

    def has(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)

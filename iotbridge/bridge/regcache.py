"""What a broker host knows of the registry: its connected devices' grants, kept current by the change feed; the
devices it authenticated, reused for a reconnect; presence writes and device reads batched.

The front re-checks its connected sessions every ``recheck_interval_s``. Reading every connected device each
round cost a read per device and round (most of an idle host's CPU and of a fleet's registry bill); instead each
round asks the registry which devices changed since the previous one (``Registry.changed_since``: every write a
session rests on stamps the device in the same commit, a deletion leaves a tombstone) and re-reads only those.

Why nothing is missed (the argument docs/broker-scaling.md gives in full):

- A change's stamp is its commit time T. A query whose read time is R sees every commit with T <= R (Firestore
  reads are strongly consistent), and R is not earlier than the moment the query was sent by the host's clock
  minus how far that clock may run ahead of Google's (``CLOCK_SKEW_S``, far above what NTP on Compute Engine keeps).
- Round i starts at p_i (host clock) and asks for stamps >= p_{i-1} - OVERLAP_S. A change round i-1 did not see
  has T > R_{i-1} >= p_{i-1} - CLOCK_SKEW_S >= p_{i-1} - OVERLAP_S, so round i sees it: consecutive rounds leave
  no gap, whatever the order in which concurrent commits get their timestamps.
- What a host learned outside the rounds (a CONNECT's own read at host time r) can be older than the last round:
  such an entry is "unsettled", and the next round's lower bound is moved back to r - OVERLAP_S, so a change the
  read missed (T > r - CLOCK_SKEW_S) is still returned. An entry the next round covered is settled.
- A round that fails changes nothing: the next one asks from the last successful round's start. When no round
  succeeded within ``2 * recheck_interval_s`` the cache is not fresh and a CONNECT reads the registry.

So a revocation committed at T ends the sessions it concerns at the first round that starts after T + the
commit's visibility: within one re-check interval, as when every device was read each round.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from iotbridge import spec
from iotbridge.registry import CHANGE_STAMP_KEEP_S, Device, Grant, Registry, grant_of

CLOCK_SKEW_S = 2.0  # the most a host's clock may run ahead of Google's (NTP on Compute Engine keeps it to ms)
OVERLAP_S = 5.0  # a round asks for the changes since the previous round's start minus this; >= CLOCK_SKEW_S
MAX_CACHED = 50_000  # devices kept for reconnects beyond those connected (least recently used forgotten first)
READ_BATCH_S = 0.002  # CONNECTs arriving within this share one registry read (``get_all``)
WRITE_BATCH_S = 0.005  # presence records written within this share one commit
MAX_BATCH = 500  # Firestore's most writes per commit; get_all is kept to the same size
# IoT Core collected lastHeartbeatTime "periodically; they may be stale by a few minutes": a device's PINGREQ is
# written at most this often.
HEARTBEAT_RECORD_S = spec.HEARTBEAT_RECORD_S


@dataclass
class Known:
    """What the host knows of one device: its grant, its full record when a CONNECT may use it, when it was read
    (host clock) and whether a round has covered that read."""

    grant: Grant | None  # None: the device is gone
    device: Device | None
    read_at: datetime
    settled: bool = False


class RegistryCache:
    """The devices one front knows, per registry, and the change-feed rounds that keep them current."""

    def __init__(self, recheck_interval_s: float, executor: Executor,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.interval_s = recheck_interval_s
        self._executor = executor
        self._now = now
        self._known: dict[str, OrderedDict[str, Known]] = {}  # registry id -> device id -> Known
        self._round_start: dict[str, datetime] = {}  # registry id -> start of its last successful round
        self.stats = {"cache_hits": 0, "cache_misses": 0, "rounds": 0, "changed": 0, "reread": 0}

    def _of(self, registry: Registry) -> OrderedDict[str, Known]:
        return self._known.setdefault(registry.registry_id, OrderedDict())

    def fresh(self, registry: Registry) -> bool:
        """Whether a round of this registry succeeded recently enough for the cache to stand for a read."""
        start = self._round_start.get(registry.registry_id)
        return start is not None and self._now() - start < timedelta(seconds=2 * self.interval_s)

    def device(self, registry: Registry, device_id: str) -> Device | None:
        """The device for a CONNECT without a registry read, when the cache is fresh and holds it."""
        # Not _of(): a CONNECT naming a made-up registry must leave nothing behind here.
        entries = self._known.get(registry.registry_id)
        known = entries.get(device_id) if entries is not None else None
        if entries is None or known is None or known.device is None or not self.fresh(registry):
            self.stats["cache_misses"] += 1
            return None
        entries.move_to_end(device_id)
        self.stats["cache_hits"] += 1
        return known.device

    def learned(self, registry: Registry, device: Device, read_at: datetime) -> None:
        """A CONNECT read ``device`` from the registry, the read sent at ``read_at`` (host clock). Kept without its
        state and metadata (up to 64 KB and 256 KB), which no CONNECT reads."""
        entries = self._of(registry)
        device = dataclasses.replace(device, state=None, metadata={})
        entries[device.id] = Known(grant_of(device), device, read_at)
        entries.move_to_end(device.id)

    def grant(self, registry: Registry, device_id: str) -> Grant | None:
        known = self._known.get(registry.registry_id, {}).get(device_id)
        return known.grant if known is not None else None

    async def refresh(self, registry: Registry, needed: Iterable[str]) -> dict[str, Grant]:
        """One round for ``registry``: the grants of the ``needed`` devices (connected or attached here), current
        as of this round. Raises when the registry cannot be read (nothing is changed then)."""
        loop = asyncio.get_running_loop()
        entries = self._of(registry)
        needed = set(needed)
        start = self._now()
        covered = [(d, k) for d, k in entries.items()]
        last = self._round_start.get(registry.registry_id)
        if last is not None and start - last >= timedelta(seconds=CHANGE_STAMP_KEEP_S / 2):
            # Rounds have failed for so long that the stamps since then may be expiring: read everything again.
            entries.clear()
            covered, last = [], None
        if last is None:
            # No round has covered the CONNECTs' reads yet: what is needed is read now.
            for device_id in [d for d, k in covered if not k.settled]:
                del entries[device_id]
        else:
            since = min([last, *(k.read_at for _, k in covered if not k.settled)]) - timedelta(seconds=OVERLAP_S)
            changed = await loop.run_in_executor(self._executor, registry.changed_since, since)
            self.stats["changed"] += len(changed)
            for device_id, at in changed.items():
                known = entries.get(device_id)
                # A read sent at read_at (host clock) was served at a time >= read_at - CLOCK_SKEW_S: one sent
                # later than the change's commit time plus the skew has seen it (the overlap returns it again).
                if known is not None and at >= known.read_at - timedelta(seconds=CLOCK_SKEW_S):
                    del entries[device_id]  # not for a CONNECT until read again
        missing = [d for d in needed if d not in entries]
        read_at = self._now()
        grants = await loop.run_in_executor(self._executor, registry.session_grants, missing) if missing else {}
        self.stats["reread"] += len(missing)
        for device_id in missing:
            # Read after this round's start: the next round's lower bound covers it.
            entries[device_id] = Known(grants.get(device_id), None, read_at, settled=True)
        for device_id, known in covered:
            if entries.get(device_id) is known:
                known.settled = True
        # Forget what serves neither a session nor a reconnect: gone devices, and the oldest beyond MAX_CACHED.
        for device_id in [d for d, k in entries.items() if d not in needed and (k.device is None or k.grant is None)]:
            del entries[device_id]
        extra = len(entries) - len(needed) - MAX_CACHED
        for device_id in [d for d in entries if d not in needed][:max(0, extra)]:
            del entries[device_id]
        self._round_start[registry.registry_id] = start
        self.stats["rounds"] += 1
        return {d: k.grant for d in needed if (k := entries.get(d)) is not None and k.grant is not None}


class Batcher:
    """Calls gathered for ``wait_s`` and made as one: ``run(owner, items)`` returns one result per item, in order
    (at most ``MAX_BATCH`` items a call). Calls with the same ``key`` share an owner (a registry, a client)."""

    def __init__(self, executor: Executor, run: Callable[[Any, list[Any]], list[Any]], wait_s: float):
        self._executor = executor
        self._run = run
        self._wait_s = wait_s
        self._pending: dict[Any, tuple[Any, list[tuple[Any, asyncio.Future[Any]]]]] = {}
        self.batches = 0

    async def submit(self, owner: Any, key: Any, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = (owner, [])
            loop.call_later(self._wait_s, lambda: asyncio.ensure_future(self._flush(key)))
        pending[1].append((item, future))
        if len(pending[1]) >= MAX_BATCH:
            asyncio.ensure_future(self._flush(key))
        return await future

    async def _flush(self, key: Any) -> None:
        taken = self._pending.pop(key, None)
        if taken is None:
            return
        owner, items = taken
        self.batches += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, owner, [item for item, _ in items])
        except Exception as exc:  # noqa: BLE001 - each caller of the batch gets the error
            for _, f in items:
                if not f.done():
                    f.set_exception(exc)
            return
        for (_, f), result in zip(items, results, strict=True):
            if not f.done():
                f.set_result(result)


def _read_devices(registry: Registry, device_ids: list[str]) -> list[Device | None]:
    found = registry.get_devices(device_ids)
    return [found.get(d) for d in device_ids]


class ReadBatcher:
    """CONNECTs' device reads gathered for ``READ_BATCH_S`` and read in one ``get_all`` per registry: a reconnect
    storm costs a registry round trip per few milliseconds instead of one per device."""

    def __init__(self, executor: Executor):
        self._batcher = Batcher(executor, _read_devices, READ_BATCH_S)

    @property
    def batches(self) -> int:
        return self._batcher.batches

    async def get(self, registry: Registry, device_id: str) -> Device | None:
        """The device, or None when the registry has no such device."""
        return await self._batcher.submit(registry, registry.registry_id, device_id)


class WriteBatcher:
    """Writes gathered for ``WRITE_BATCH_S`` and committed together, one commit per client: ``write`` returns its
    write's update time. ``commit(client, items)`` makes one commit and returns the update times in order."""

    def __init__(self, executor: Executor, commit: Callable[[Any, list[Any]], list[Any]]):
        self._batcher = Batcher(executor, commit, WRITE_BATCH_S)

    @property
    def commits(self) -> int:
        return self._batcher.batches

    async def write(self, client: Any, item: Any) -> Any:
        return await self._batcher.submit(client, id(client), item)

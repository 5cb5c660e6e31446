"""The bench's bookkeeping: what arrived is counted per (device, seq), PUBACKs are counted from what the C
publishers printed, and each figure is compared with the committed reference run."""

from __future__ import annotations

import json
from pathlib import Path

from bench import broker
from bench.__main__ import reference_values, render_markdown, vs_reference
from bench.core import Figure, machine
from bench.loadgen import payload


def test_arrivals_are_counted_per_device_and_sequence() -> None:
    sent = [payload(dev, seq, "r1") for dev in range(3) for seq in range(4)]
    # Device 1's message 2 never arrives, device 0's message 0 arrives twice, another run's message is ignored.
    arrived = [p for p in sent if b'"seq": 2, "dev": 1,' not in p] + [sent[0], payload(0, 0, "r0")]
    seen, dups = broker.count_arrivals(arrived, "r1")
    assert len(seen) == 11 and (1, 2) not in seen
    assert dups == 1


def test_pubacks_are_counted_from_mosquitto_pub_debug_lines() -> None:
    out = (b"Client x sending CONNECT\nClient x received CONNACK (0)\n"
           b"Client x sending PUBLISH (d0, q1, r0, m1, 't', ... (3 bytes))\nClient x received PUBACK (Mid: 1, RC:0)\n"
           b"Client x sending PUBLISH (d0, q1, r0, m2, 't', ... (3 bytes))\nClient x sending DISCONNECT\n")
    assert broker.puback_count(out) == 1  # the second publish was never acknowledged


def test_each_figure_is_compared_with_the_reference(tmp_path: Path) -> None:
    ref = tmp_path / "results.json"
    ref.write_text(json.dumps({"figures": [
        {"section": "bridge", "name": "rate", "value": 1000},
        {"section": "bridge", "name": "zero", "value": 0},
        {"section": "bridge", "name": "missing", "value": None},
    ]}))
    values = reference_values(ref)
    assert values == {("bridge", "rate"): 1000.0, ("bridge", "zero"): 0.0}
    assert vs_reference(Figure("bridge", "rate", 1500, "msg/s", "c"), values) == 1.5
    assert vs_reference(Figure("bridge", "zero", 5, "msg/s", "c"), values) is None
    assert vs_reference(Figure("bridge", "new", 5, "msg/s", "c"), values) is None
    assert reference_values(tmp_path / "none.json") == {}
    info = machine() | {"load_after": {"bridge": [9.5, 7.0, 4.0]}}
    md = render_markdown([Figure("bridge", "rate", 1500, "msg/s", "c")], info, 10.0, values)
    assert "| bridge | rate | 1,500 | msg/s | 1.50× |" in md
    assert "after each section: bridge 9.5/7.0/4.0" in md


def test_the_machine_is_described() -> None:
    m = machine()
    assert m["cores"] >= 1 and m["cpu_model"] and m["memory_gib"] > 0 and len(m["load_at_start"]) == 3


def _setting(config: str, name: str) -> str:
    return next(line.split()[1] for line in config.splitlines() if line.startswith(f"{name} "))


def test_the_raw_broker_gives_its_subscriber_the_window_the_bridge_service_gets(tmp_path: Path) -> None:
    from iotbridge.bridge.settings import BridgeSettings, mosquitto_config, new_secrets, write_secrets

    write_secrets(tmp_path / "secrets.json", new_secrets())
    settings = BridgeSettings(project="p", region="r", registry_id="reg", prefix="pre",
                              secrets_file=str(tmp_path / "secrets.json"))
    bridge = mosquitto_config(settings, tmp_path / "broker")
    raw = broker.broker_config(1883, tmp_path)
    # A smaller window on the raw side lowers the raw limit, and the bridge/raw ratio with it.
    assert _setting(raw, "max_inflight_messages") == _setting(bridge, "max_inflight_messages")


def test_keepalives_keep_their_pace_on_a_loop_that_oversleeps(monkeypatch) -> None:  # noqa: ANN001
    """The load generator's keep-alive pass stays within its period when every sleep overshoots (loaded cores):
    a pass of a sleep per connection took 1.5 keep-alives at 10,000 idle devices, and the broker's keep-alive
    timeout closed the connections at the end of the pass."""
    import asyncio
    import time
    from typing import Any, cast

    from bench import connections

    monkeypatch.setattr(connections, "KEEPALIVE_S", 1.0)  # a pass every 0.8 s; the broker closes after 1.5 s
    real_sleep = asyncio.sleep

    async def oversleep(delay: float) -> None:
        await real_sleep(delay + 0.002)

    monkeypatch.setattr(connections.asyncio, "sleep", oversleep)
    pinged: dict[int, float] = {}

    class Writer:
        def __init__(self, n: int) -> None:
            self.n = n

        def write(self, _data: bytes) -> None:
            pinged.setdefault(self.n, time.monotonic())

    n = 2000
    fleet = connections.Fleet("127.0.0.1", 0, None)
    fleet.conns = [connections.Conn(f"d{i}", cast(Any, None), cast(Any, Writer(i))) for i in range(n)]

    async def one_pass() -> float:
        t0 = time.monotonic()
        task = asyncio.ensure_future(fleet.keepalive())
        while len(pinged) < n and time.monotonic() - t0 < 10:
            await real_sleep(0.05)
        task.cancel()
        return max(pinged.values()) - t0

    took = asyncio.run(one_pass())
    assert len(pinged) == n
    # A sleep per connection would take 2,000 × (0.4 + 2) ms = 4.8 s.
    assert took < 1.2, f"a keep-alive pass over {n} connections took {took:.2f} s, past the 0.8 s period"

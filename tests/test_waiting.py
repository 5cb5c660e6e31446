"""tests/waiting.py: the deadline, the pace, the value returned and what a failed wait says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.waiting import TimedOut, wait_for

T = TypeVar("T")


class FakeTime:
    """A clock that moves only when the code under test sleeps; records every probe's time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self.probed_at: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def probe(self, values: list[T]) -> Callable[[], T]:
        """A probe returning ``values`` in turn, then the last one again and again."""
        def call() -> T:
            self.probed_at.append(self.now)
            return values.pop(0) if len(values) > 1 else values[0]
        return call


def test_returns_the_first_done_value_and_stops_probing():
    t = FakeTime()
    got = wait_for("three", t.probe([None, 0, [], 3, 4]), timeout=10, interval=0.5, clock=t.clock, sleep=t.sleep)
    assert got == 3
    assert t.probed_at == [100.0, 100.5, 101.0, 101.5]
    assert t.sleeps == [0.5, 0.5, 0.5]


def test_done_decides_instead_of_truthiness():
    t = FakeTime()
    assert wait_for("zero", t.probe([5, 2, 0]), lambda v: v == 0, clock=t.clock, sleep=t.sleep) == 0
    assert len(t.probed_at) == 3


def test_times_out_naming_what_was_awaited_with_the_last_value():
    t = FakeTime()
    with pytest.raises(TimedOut) as caught:
        wait_for("the config ack", t.probe([{"acked": 0}, {"acked": 1}]), lambda v: v["acked"] == 2, timeout=1,
                 interval=0.3, clock=t.clock, sleep=t.sleep)
    assert str(caught.value) == "timed out after 1s waiting for the config ack; last value: {'acked': 1}"
    assert caught.value.last == {"acked": 1} and caught.value.what == "the config ack"
    assert isinstance(caught.value, AssertionError)  # pytest reports it as a failed assertion


def test_probes_once_more_at_the_deadline_itself():
    t = FakeTime()
    with pytest.raises(TimedOut):
        wait_for("never", t.probe([False]), timeout=1, interval=0.3, clock=t.clock, sleep=t.sleep)
    assert [round(p - 100, 6) for p in t.probed_at] == [0, 0.3, 0.6, 0.9, 1.0]
    assert round(t.now - 100, 6) == 1.0  # never sleeps past the deadline


def test_a_zero_timeout_probes_once():
    t = FakeTime()
    assert wait_for("now", t.probe([7]), timeout=0, clock=t.clock, sleep=t.sleep) == 7
    with pytest.raises(TimedOut):
        wait_for("now", t.probe([0]), timeout=0, clock=t.clock, sleep=t.sleep)
    assert len(t.probed_at) == 2 and t.sleeps == []


def test_a_failing_probe_fails_the_wait_at_once():
    t = FakeTime()

    def probe() -> object:
        t.probed_at.append(t.now)
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        wait_for("a connection", probe, timeout=10, clock=t.clock, sleep=t.sleep)
    assert len(t.probed_at) == 1


def test_a_long_last_value_is_cut_in_the_message():
    t = FakeTime()
    with pytest.raises(TimedOut) as caught:
        wait_for("a short log", t.probe(["x" * 10_000]), lambda v: len(v) < 10, timeout=0, clock=t.clock,
                 sleep=t.sleep)
    message = str(caught.value)
    assert len(message) < 600 and message.endswith("x…")
    assert caught.value.last == "x" * 10_000  # the value itself is kept whole


def test_negative_timeout_or_interval_is_refused():
    with pytest.raises(ValueError):
        wait_for("x", lambda: True, timeout=-1)
    with pytest.raises(ValueError):
        wait_for("x", lambda: True, interval=-1)


def test_waits_in_real_time_for_another_thread():
    flag = threading.Event()
    threading.Timer(0.3, flag.set).start()
    start = time.monotonic()
    assert wait_for("the flag", flag.is_set, timeout=10, interval=0.05) is True
    assert 0.25 <= time.monotonic() - start < 5

"""Waiting for something another process does: the one way tests poll.

``wait_for("the config ack", lambda: registry.get_config(d).device_ack_time, timeout=15)`` calls the probe until
its value is done (truthy, or what ``done`` says), at most every ``interval`` seconds, and returns that value. At
the deadline it fails with :class:`TimedOut`, naming what was awaited, how long it waited and the last value it
saw, so a failed wait says what the system did instead. The probe runs once more at the deadline itself, and at
least once however short the timeout. An exception from the probe is not a "not yet": it fails the wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LAST_VALUE_CHARS = 500  # how much of the last value a failure shows


class TimedOut(AssertionError):
    """What a test waited for did not happen in time; ``last`` is the probe's last value."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        shown = repr(last)
        if len(shown) > LAST_VALUE_CHARS:
            shown = shown[:LAST_VALUE_CHARS] + "…"
        super().__init__(f"timed out after {timeout:g}s waiting for {what}; last value: {shown}")
        self.what, self.timeout, self.last = what, timeout, last


def wait_for(what: str, probe: Callable[[], T], done: Callable[[T], object] = bool, *, timeout: float = 20.0,
             interval: float = 0.1, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], object] = time.sleep) -> T:
    """The first value of ``probe()`` for which ``done(value)`` is true; :class:`TimedOut` after ``timeout`` s.

    ``what`` names the awaited thing for the failure message ("the config ack"). ``clock`` and ``sleep`` are for
    this module's own tests.
    """
    if timeout < 0 or interval < 0:
        raise ValueError(f"timeout and interval must not be negative, got {timeout} and {interval}")
    deadline = clock() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        left = deadline - clock()
        if left <= 0:
            raise TimedOut(what, timeout, value)
        sleep(min(interval, left))

"""Running a coroutine from a synchronous test."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_own_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on an event loop of its own. Not asyncio.run: that leaves the main thread with no current event
    loop, and the Pulumi mock tests that run later in the session (pulumi's _sync_await) then fail with "There is
    no current event loop"."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()

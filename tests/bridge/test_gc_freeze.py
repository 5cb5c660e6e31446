"""The bridge service and the front take what they hold once started out of the garbage collector's reach
(``iotbridge.bridge.__main__.freeze_startup_objects``): a full collection otherwise walks every object of the Google
client libraries, 30-40 ms of CPU during which the whole service stands still (``bench/profile_latency.py``).

Both parts run here as ``python -m iotbridge.bridge`` runs them, with stand-ins for the service and the front that
make objects while they start and stop themselves at once; no timing is involved: an object is frozen when the
collector no longer lists it (``gc.get_objects`` leaves out the permanent generation).
"""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import Any

import pytest

from iotbridge.bridge import __main__ as bridge_main
from iotbridge.bridge import front, service
from iotbridge.bridge.settings import BridgeSettings, new_secrets, write_secrets
from tests.aio import run_in_own_loop


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a generator fixture
    """Settings for one part, its registry left out; the collector and the signal handlers restored afterwards."""
    gc.unfreeze()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    write_secrets(tmp_path / "secrets.json", new_secrets())
    monkeypatch.setattr(bridge_main, "_registry", lambda settings: None)
    yield BridgeSettings(project="p", region="r", registry_id="reg", prefix="pre",
                         secrets_file=str(tmp_path / "secrets.json"))
    gc.unfreeze()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_service_freezes_what_it_holds_once_started(part: BridgeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class StandIn:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
            self.made_before = [{"client": i} for i in range(3)]

        def start(self) -> None:
            self.made_at_start = [{"channel": i} for i in range(3)]
            seen["tracked_at_start"] = _tracked(self.made_at_start)
            signal.raise_signal(signal.SIGTERM)  # run_service's handler: stop as soon as it waits

        def stop(self) -> None:
            seen["frozen"] = [not _tracked(x) for x in (self, self.made_before, self.made_at_start)]
            seen["after_start"] = [{"message": i} for i in range(3)]
            seen["new_tracked"] = _tracked(seen["after_start"])

    monkeypatch.setattr(service, "BridgeService", StandIn)
    bridge_main.run_service(part)
    assert seen["tracked_at_start"], "nothing frozen before the service started"
    assert seen["frozen"] == [True, True, True], "the service, what it made and what start() made are frozen"
    assert seen["new_tracked"], "objects made later are collected as usual"


def test_front_freezes_what_it_holds_once_started(part: BridgeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class StandIn:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
            self.made_before = [{"client": i} for i in range(3)]

        async def start(self) -> None:
            self.made_at_start = [{"server": i} for i in range(3)]
            seen["tracked_at_start"] = _tracked(self.made_at_start)
            # Once run_front waits for its stop signal (its handlers are on the loop by then).
            asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGTERM)

        async def stop(self, drain_s: float) -> None:
            seen["frozen"] = [not _tracked(x) for x in (self, self.made_before, self.made_at_start)]

    monkeypatch.setattr(front, "Front", StandIn)
    monkeypatch.setattr(front, "server_ssl_context", lambda *args: None)
    # run_front's asyncio.run would leave the main thread with no current event loop for the Pulumi mock tests
    # that run later in the session (tests/aio.py): its coroutine runs on a loop of its own instead.
    monkeypatch.setattr(asyncio, "run", run_in_own_loop)
    bridge_main.run_front(part)
    assert seen["tracked_at_start"], "nothing frozen before the front started"
    assert seen["frozen"] == [True, True, True], "the front, what it made and what start() made are frozen"

"""Shared fixtures: the local services, each started by the test session on a free loopback port, and the
clock that tests of time-dependent logic control.

A service that cannot start because a prerequisite is missing fails the test with the reason and the command
that installs it, everywhere: the suite never passes by skipping. ``make test`` checks the prerequisites before
it starts (``scripts/ensure-system.sh``); ``make test-fast`` deselects the ``emulator`` tier instead.
No test may skip: a skipped test fails the session (``pytest_sessionfinish`` below).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from iotbridge.local import services


def require(start, *args, **kwargs) -> services.Service:
    """Start a local service; a missing prerequisite fails the test with its install command, never skips it."""
    try:
        return start(*args, **kwargs)
    except services.MissingPrerequisite as exc:
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)


# ------------------------------------------------------------------------------------------ the test clock

# Every test of age, expiry, retention or lateness logic runs twice: at today's time, and with its clock moved
# 40 days ahead. The shift goes through the clock the code under test takes (a ``now`` argument, an injected
# clock), never through the process: the Java emulators crawl under faketime. A test that only passes on the day
# it was written fails the second run.
CLOCK_SHIFTS = {"today": timedelta(0), "40-days-ahead": timedelta(days=40)}


@dataclass(frozen=True)
class TestClock:
    """Real time moved by ``shift``: ``now()`` for datetimes, ``time()`` for epoch seconds."""

    __test__ = False  # not a test class
    shift: timedelta

    def now(self) -> datetime:
        return datetime.now(UTC) + self.shift

    def time(self) -> float:
        return self.now().timestamp()


@pytest.fixture(params=list(CLOCK_SHIFTS), ids=list(CLOCK_SHIFTS))
def clock(request: pytest.FixtureRequest) -> TestClock:
    return TestClock(CLOCK_SHIFTS[request.param])


# ------------------------------------------------------------------------------------------ the emulator tier

# A test that reaches a local service through one of these fixtures (directly or through another fixture) is in
# the emulator tier whether or not its module says so, so that `make test-fast` (-m "not emulator") never starts
# a service and never fails for want of one.
SERVICE_FIXTURES = frozenset({"pubsub_emulator", "firestore_emulator", "bigtable_emulator", "bigquery_emulator",
                              "mosquitto"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.emulator)


# ------------------------------------------------------------------------------------------ no pass by skipping

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) skipped; this suite never passes by skipping "
            f"(first: {_skipped[0]})", red=True)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = require(services.start_pubsub, tmp_path_factory.mktemp("pubsub"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = require(services.start_firestore, tmp_path_factory.mktemp("firestore"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = require(services.start_bigtable, tmp_path_factory.mktemp("bigtable"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = require(services.start_bigquery, "local-project", tmp_path_factory.mktemp("bigquery"))
    yield svc
    svc.stop()


@pytest.fixture
def emulator_env(monkeypatch: pytest.MonkeyPatch):
    """Point the Google client libraries at an emulator for one test: ``emulator_env(svc)``."""

    def apply(*svcs: services.Service) -> None:
        for svc in svcs:
            for k, v in svc.env.items():
                monkeypatch.setenv(k, v)

    return apply


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return services.REPO_ROOT


def _main_thread_loop_was_taken() -> bool:
    """True when the main thread's current event loop was set to none (what ``asyncio.run`` leaves behind), after
    which ``asyncio.get_event_loop()`` raises instead of making one."""
    local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    return local is not None and getattr(local, "_set_called", False) and getattr(local, "_loop", 1) is None


@pytest.fixture(autouse=True)
def _main_thread_keeps_its_event_loop() -> Iterator[None]:
    """A test that leaves the main thread without a current event loop fails here, by name, instead of every Pulumi
    mock test after it failing with "There is no current event loop" (use tests.aio.run_in_own_loop)."""
    yield
    if threading.current_thread() is threading.main_thread() and _main_thread_loop_was_taken():
        asyncio.set_event_loop(asyncio.new_event_loop())  # for the tests after this one
        pytest.fail("this test left the main thread with no current event loop (asyncio.run?): run coroutines with "
                    "tests.aio.run_in_own_loop")


"""Shared fixtures: the local services, each started by the test session on a free loopback port.

A service that cannot start because a prerequisite is missing skips the test on a developer's laptop and
fails it in CI (``CI`` set), so that CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotbridge.local import services

IN_CI = bool(os.environ.get("CI"))


def _start_or_skip(start, *args, **kwargs) -> services.Service:
    try:
        return start(*args, **kwargs)
    except services.MissingPrerequisite as exc:
        if IN_CI:
            pytest.fail(f"prerequisite missing in CI: {exc}")
        pytest.skip(f"prerequisite missing: {exc}")


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = _start_or_skip(services.start_pubsub, tmp_path_factory.mktemp("pubsub"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = _start_or_skip(services.start_firestore, tmp_path_factory.mktemp("firestore"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = _start_or_skip(services.start_bigtable, tmp_path_factory.mktemp("bigtable"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    svc = _start_or_skip(services.start_bigquery, "local-project", tmp_path_factory.mktemp("bigquery"))
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

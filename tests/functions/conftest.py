"""Fixtures of the config-push function tests: the function module and a Mosquitto broker."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from iotbridge.local import services
from tests.conftest import require
from tests.functions.served import mosquitto_config

FUNCTION_DIR = Path(__file__).resolve().parents[2] / "functions" / "config_push"
MODULE_NAME = "config_push_main"  # every function folder has a main.py; load this one under its own name


def load_function() -> ModuleType:
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, FUNCTION_DIR / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cp() -> ModuleType:
    return load_function()


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    port = services.free_port()
    svc = require(services.start_mosquitto, mosquitto_config(port), port, tmp_path_factory.mktemp("mosquitto"))
    yield svc
    svc.stop()

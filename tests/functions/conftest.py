"""Fixtures of the config-push function tests: the function module, a Mosquitto broker, a device client."""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import paho.mqtt.client as paho
import pytest

from iotbridge.local import services

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


def mosquitto_config(port: int) -> str:
    # Anonymous plaintext on loopback: this broker stands for the backend listener the function publishes to,
    # not for the device-facing endpoint (which is TLS + JWT, issue 10).
    return (f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
            "max_queued_messages 100000\n")


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    try:
        port = services.free_port()
        svc = services.start_mosquitto(mosquitto_config(port), port, tmp_path_factory.mktemp("mosquitto"))
    except services.MissingPrerequisite as exc:
        if os.environ.get("CI"):
            pytest.fail(f"prerequisite missing in CI: {exc}")
        pytest.skip(f"prerequisite missing: {exc}")
    yield svc
    svc.stop()


class DeviceClient:
    """A device's MQTT session subscribed to its config topic (QoS 1), collecting what arrives."""

    def __init__(self, host: str, port: int, device_id: str):
        self.device_id = device_id
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=True)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"/devices/{device_id}/config", qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"{device_id}: no SUBACK within 10s")

    def next(self, timeout: float = 15.0) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

"""``BridgeSettings.device_auth``: "front" (the default, every feature) or "mosquitto" (Mosquitto terminates TLS and
its plugin asks the auth daemon), and the one-line errors for settings that mode cannot honour. No service runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iotbridge.bridge.settings import BridgeSettings

BASE: dict[str, Any] = {"project": "p", "region": "europe-west1", "registry_id": "reg", "prefix": "pre"}
SOCKET = "/var/lib/iotbridge-authd/auth.sock"


def test_front_is_the_default_and_needs_no_auth_socket():
    s = BridgeSettings(**BASE)
    assert (s.device_auth, s.auth_socket) == ("front", "")
    assert BridgeSettings(**BASE, http_port=8443, client_ca="/etc/ca.pem").device_auth == "front"


def test_mosquitto_mode_with_its_socket_loads_and_survives_a_dump(tmp_path: Path):
    s = BridgeSettings(**BASE, device_auth="mosquitto", auth_socket=SOCKET)
    s.dump(tmp_path / "settings.json")
    assert BridgeSettings.load(tmp_path / "settings.json") == s


@pytest.mark.parametrize(("fields", "message"), [
    ({"device_auth": "plugin"}, "device_auth must be one of front, mosquitto, got 'plugin'"),
    ({"device_auth": "Mosquitto"}, "device_auth must be one of front, mosquitto, got 'Mosquitto'"),
    ({"device_auth": "mosquitto"}, "auth_socket is required with device_auth mosquitto"),
    ({"device_auth": "mosquitto", "auth_socket": SOCKET, "http_port": 8443},
     r"http_port must be unset with device_auth mosquitto \(the HTTP bridge runs in the front"),
    ({"device_auth": "mosquitto", "auth_socket": SOCKET, "client_ca": "/etc/ca.pem"},
     r"client_ca must be unset with device_auth mosquitto \(device client certificates"),
    ({"device_auth": "mosquitto", "auth_socket": "/" + "a" * 107},
     "auth_socket must be at most 107 bytes"),
])
def test_settings_the_mode_cannot_honour_are_one_line_errors_naming_the_setting(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        BridgeSettings(**BASE, **fields)
    assert "\n" not in str(err.value)

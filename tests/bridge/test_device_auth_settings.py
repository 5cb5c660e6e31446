"""``BridgeSettings.device_auth``: "front" (the default, every feature) or "mosquitto" (Mosquitto terminates TLS and
its plugin asks the auth daemon), and the one-line errors for settings that mode cannot honour. No service runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iotbridge.bridge import plugin
from iotbridge.bridge.settings import (
    BridgeSettings,
    dynsec_plugin_path,
    mosquitto_config,
    new_secrets,
    write_secrets,
)

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


def _host(tmp_path: Path, **fields: Any) -> BridgeSettings:
    write_secrets(tmp_path / "secrets.json", new_secrets())
    return BridgeSettings(**BASE, secrets_file=str(tmp_path / "secrets.json"), front_host="0.0.0.0", front_port=8883,
                          tls_cert="/etc/iotbridge-mosquitto/server.pem",
                          tls_key="/etc/iotbridge-mosquitto/server-key.pem", **fields)


def test_mosquitto_mode_adds_the_device_listener_and_plugin_ahead_of_the_internal_users(tmp_path: Path):
    """The plugin's lines (``plugin.mosquitto_lines``) as they are, after the loopback listeners (so that
    ``certfile``/``keyfile`` belong to the device listener) and before the dynamic security plugin."""
    s = _host(tmp_path, device_auth="mosquitto", auth_socket=SOCKET)
    so = Path("/opt/iotbridge/plugin/iotbridge_auth.so")
    lines = mosquitto_config(s, tmp_path / "mq", plugin_path=so).splitlines()
    device = plugin.mosquitto_lines(s, so)
    start = lines.index(device[0])
    assert lines[start:start + len(device)] == device
    assert "listener 8883 0.0.0.0" in device and f"plugin {so}" in device
    assert f"plugin_opt_socket {SOCKET}" in device
    listeners = [i for i, line in enumerate(lines) if line.startswith("listener ")]
    assert [lines[i] for i in listeners] == [f"listener {s.broker_port} 127.0.0.1", "listener 8883 0.0.0.0"]
    # The device listener's TLS lines follow it, and no other listener comes between.
    assert lines.index("certfile /etc/iotbridge-mosquitto/server.pem") > listeners[-1]
    plugins = [line for line in lines if line.startswith("plugin ")]
    assert plugins == [f"plugin {so}", f"plugin {dynsec_plugin_path()}"]
    # What the host's own users have is unchanged.
    assert "allow_anonymous false" in lines and "per_listener_settings false" in lines


def test_front_mode_config_has_no_device_listener_and_mosquitto_mode_needs_the_plugin(tmp_path: Path):
    front = mosquitto_config(_host(tmp_path), tmp_path / "front").splitlines()
    assert [line for line in front if line.startswith("listener ")] == ["listener 1883 127.0.0.1"]
    assert [line for line in front if line.startswith("plugin ")] == [f"plugin {dynsec_plugin_path()}"]
    assert not any(line.startswith(("certfile", "keyfile")) for line in front)
    s = _host(tmp_path, device_auth="mosquitto", auth_socket=SOCKET)
    with pytest.raises(ValueError, match="the device plugin's path is required"):
        mosquitto_config(s, tmp_path / "mq")

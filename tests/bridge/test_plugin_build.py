"""``iotbridge.bridge.plugin`` without Mosquitto: a host that cannot compile the plugin is told what to install, and
the mosquitto.conf lines refuse settings the mode cannot run with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iotbridge.bridge import plugin
from iotbridge.bridge.settings import EVENTS_MAX_BYTES, BridgeSettings


def test_build_without_gcc_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(plugin.shutil, "which", lambda _name: None)
    with pytest.raises(plugin.BuildError, match="apt-get install -y gcc .*mosquitto-dev"):
        plugin.build(tmp_path)
    assert not (tmp_path / plugin.LIBRARY).exists()


def test_mosquitto_lines() -> None:
    s = BridgeSettings("p", "europe-west1", "reg", "t", front_port=8883, tls_cert="/c.pem", tls_key="/k.pem",
                       device_auth="mosquitto", auth_socket="/run/iotbridge/authd.sock")
    lines = plugin.mosquitto_lines(s, Path("/opt/iotbridge_auth.so"))
    assert lines[1:5] == ["listener 8883 127.0.0.1", "certfile /c.pem", "keyfile /k.pem", "tls_version tlsv1.2"]
    assert "plugin /opt/iotbridge_auth.so" in lines
    assert "plugin_opt_client_id_prefix projects/p/locations/europe-west1/registries/reg/devices/" in lines
    assert "plugin_opt_socket /run/iotbridge/authd.sock" in lines
    assert f"plugin_opt_events_max_bytes {EVENTS_MAX_BYTES}" in lines
    with pytest.raises(ValueError, match="auth_socket"):
        plugin.mosquitto_lines(BridgeSettings("p", "r", "reg", "t", tls_cert="/c", tls_key="/k"), Path("/x.so"))
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        plugin.mosquitto_lines(BridgeSettings("p", "r", "reg", "t", auth_socket="/s"), Path("/x.so"))
    assert "plugin_opt_internal_address 127.0.0.1" in lines
    with pytest.raises(ValueError, match="broker_host must be an IP address"):
        plugin.mosquitto_lines(dataclasses.replace(s, broker_host="localhost"), Path("/x.so"))

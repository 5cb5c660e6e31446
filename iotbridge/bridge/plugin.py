"""The Mosquitto plugin of ``device_auth: mosquitto`` (``mosquitto_plugin/iotbridge_auth.c``): compiled on the
broker host (``python -m iotbridge.bridge build-plugin --out DIR``), never shipped compiled, and the mosquitto.conf
lines that give devices their TLS listener and put the plugin in front of everything else.

Mosquitto 2.0 asks its security mechanisms in a fixed order (src/security.c, src/security_default.c of 2.0.11): the
``plugin`` lines' callbacks, in the order of the lines, are registered when the plugins load, and the
``password_file`` and ``acl_file`` checks are registered after them, when the security settings are read. The
first callback whose answer is not "defer" decides. The plugin answers every device client (client id = this
deployment's ``projects/P/locations/L/registries/R/devices/`` prefix + a device id) itself and never defers one,
so no device is judged by the password file, the ACL file's ``pattern`` lines or the dynamic security plugin; it
defers every other client that comes from ``broker_host`` (the loopback listener's address, which the host's own
processes connect from), so the host's internal users are never judged by it, and refuses every other client from
elsewhere: the internal users cannot log in on the device listener from the network. (``per_listener_settings
true`` would give the device listener security settings of its own, but Mosquitto 2.0.11 then never runs a plugin's
MOSQ_EVT_TICK, src/plugin.c ``plugin__handle_tick``, on which the plugin's kicks and daemon link depend.) In this
mode the password file holds no ``front`` user (there is no front). Its lines belong before the
dynamic security plugin's (either order is safe: that plugin defers for users it does not hold and refuses a
device client id for the one user it holds, which is bound to another client id).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

from iotbridge.bridge.settings import EVENTS_MAX_BYTES, STATE_MAX_BYTES, BridgeSettings

SOURCE = Path(__file__).with_name("mosquitto_plugin") / "iotbridge_auth.c"
LIBRARY = "iotbridge_auth.so"
HEADERS = (Path("/usr/include/mosquitto_broker.h"), Path("/usr/include/mosquitto_plugin.h"),
           Path("/usr/include/mosquitto.h"))
INSTALL = "apt-get install -y gcc libc6-dev mosquitto-dev libmosquitto-dev"


class BuildError(RuntimeError):
    """The plugin cannot be compiled here; the message says what to install or what gcc said."""


def build(out: Path) -> Path:
    """``out/iotbridge_auth.so`` compiled from the source with gcc (``-O2 -Wall -Werror -shared -fPIC``)."""
    gcc = shutil.which("gcc")
    missing = [str(h) for h in HEADERS if not h.exists()]
    if gcc is None or missing:
        what = "gcc" if gcc is None else ", ".join(missing)
        raise BuildError(f"{what} missing: the Mosquitto auth plugin needs gcc and Mosquitto's plugin headers: "
                         f"{INSTALL}")
    out.mkdir(parents=True, exist_ok=True)
    lib = out / LIBRARY
    done = subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"gcc could not compile {SOURCE.name}: {done.stderr.strip()}")
    return lib


def client_id_prefix(settings: BridgeSettings) -> str:
    """What every device client id of this deployment starts with (IoT Core's device path)."""
    return f"projects/{settings.project}/locations/{settings.region}/registries/{settings.registry_id}/devices/"


def mosquitto_lines(settings: BridgeSettings, plugin_path: Path) -> list[str]:
    """The mosquitto.conf lines of the device listener (TLS on ``front_host:front_port`` with ``tls_cert`` and
    ``tls_key``) and of the plugin, which asks the auth daemon on ``auth_socket``."""
    if not settings.auth_socket:
        raise ValueError("auth_socket is needed with device_auth mosquitto: the auth daemon's Unix socket")
    try:
        ipaddress.ip_address(settings.broker_host)
    except ValueError:
        raise ValueError(f"broker_host must be an IP address with device_auth mosquitto (the plugin admits the host's "
                         f"own users from that address only), got {settings.broker_host!r}") from None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("tls_cert and tls_key are needed with device_auth mosquitto: devices connect with TLS")
    return [
        "# Devices: TLS, authenticated and confined by the iotbridge_auth plugin with the auth daemon.",
        f"listener {settings.front_port} {settings.front_host}",
        f"certfile {settings.tls_cert}",
        f"keyfile {settings.tls_key}",
        "tls_version tlsv1.2",
        f"plugin {plugin_path}",
        f"plugin_opt_client_id_prefix {client_id_prefix(settings)}",
        f"plugin_opt_socket {settings.auth_socket}",
        f"plugin_opt_events_max_bytes {EVENTS_MAX_BYTES}",
        f"plugin_opt_state_max_bytes {STATE_MAX_BYTES}",
        # Any other client is refused unless it comes from the loopback listener's address (the host's own users).
        f"plugin_opt_internal_address {settings.broker_host}",
    ]

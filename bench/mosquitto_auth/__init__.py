"""The Mosquitto plugin designs on the bench: Mosquitto terminating TLS and authenticating IoT Core devices itself.

- The product (``device_auth: mosquitto``): ``iotbridge/bridge/mosquitto_plugin`` asking the auth daemon
  (``iotbridge/bridge/authd.py``), started here as a broker host starts them (``start_product``).
- The OpenSSL prototype (``iotbridge_auth.c`` here, bench only): the plugin checks the JWT itself with OpenSSL
  against the keys written by ``write_keys`` (one PEM file per device with its unexpired public keys), the C-only
  ceiling; a blocked device is left out of the key files, and nothing is re-checked.

Both compile at bench and test time with gcc against Debian's ``mosquitto-dev`` headers (never committed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from iotbridge.bridge import plugin
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.local import services
from iotbridge.registry import Device

SOURCE = Path(__file__).with_name("iotbridge_auth.c")
HEADERS = Path("/usr/include/mosquitto_broker.h")
INSTALL = "apt-get install -y gcc libssl-dev mosquitto-dev libmosquitto-dev"


def build(out: Path) -> Path:
    """The OpenSSL prototype compiled into ``out``; MissingPrerequisite (with the install command) without gcc or
    headers."""
    gcc = shutil.which("gcc")
    if not gcc or not HEADERS.exists() or not Path("/usr/include/mosquitto.h").exists() \
            or not Path("/usr/include/openssl/evp.h").exists():
        raise services.MissingPrerequisite(f"gcc and the Mosquitto and OpenSSL headers are needed to build the "
                                           f"auth plugin: {INSTALL}")
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "iotbridge_auth_openssl.so"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(SOURCE), "-lcrypto"],
                   check=True, capture_output=True, text=True)
    return lib


def build_product(out: Path) -> Path:
    """The product's plugin, compiled into ``out``; MissingPrerequisite when it cannot be."""
    try:
        return plugin.build(out)
    except plugin.BuildError as exc:
        raise services.MissingPrerequisite(str(exc)) from None


def client_id_prefix(project: str, region: str, registry_id: str) -> str:
    return f"projects/{project}/locations/{region}/registries/{registry_id}/devices/"


def _run_as() -> list[str]:
    return ["user root"] if os.geteuid() == 0 else []


def listener_conf(port: int, cert: str | Path, key: str | Path, lib: Path, prefix: str, *, keydir: Path,
                  audience: str) -> str:
    """Mosquitto's configuration for the OpenSSL prototype: one TLS listener on ``port``, every client
    authenticated by it."""
    opts = {"client_id_prefix": prefix, "keydir": str(keydir), "audience": audience}
    return "\n".join([*_run_as(), f"listener {port} 127.0.0.1", f"certfile {cert}", f"keyfile {key}",
                      "allow_anonymous false", f"plugin {lib}", *(f"plugin_opt_{k} {v}" for k, v in opts.items()),
                      "max_keepalive 65535", "log_type error", ""])


def start_broker(conf: str, port: int, wd: Path) -> services.Service:
    """Mosquitto with ``conf``, in the folder ``wd``."""
    wd.mkdir(parents=True, exist_ok=True)
    return services.start_mosquitto(conf, port, wd)


def write_keys(devices: dict[str, Device], keydir: Path) -> None:
    """One PEM file per device not blocked, with its unexpired public keys (the OpenSSL prototype's input)."""
    keydir.mkdir(parents=True, exist_ok=True)
    for d in devices.values():
        if d.blocked:
            continue
        pems = [c.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
                for c in d.valid_credentials()]
        (keydir / f"{d.id}.pem").write_bytes(b"".join(pems))


def start_product(host: BridgeSettings, lib: Path, port: int, wd: Path,
                  env: dict[str, str]) -> tuple[services.Service, services.Service]:
    """The product as a broker host runs it, beside the host whose settings are ``host`` (its loopback Mosquitto,
    its bridge service and secrets): the auth daemon (``python -m iotbridge.bridge authd``), then a Mosquitto with
    the plugin's lines (``plugin.mosquitto_lines``) holding the devices' TLS listener on ``port``.
    Its host id is ``host``'s with ``wd``'s name appended, so that several such daemons beside one host keep
    their own control connection (its client id names the host). (daemon, broker)."""
    wd.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(host, front_port=port, device_auth="mosquitto", auth_socket=str(wd / "authd.sock"),
                                   health_port=0, host_id=f"{host.host_id}-{wd.name}")
    settings.dump(wd / "settings.json")
    log = wd / "authd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iotbridge.bridge", "authd", "--settings",
                                 str(wd / "settings.json")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=wd, start_new_session=True,
                                env={**os.environ, **env, "PYTHONPATH": str(services.REPO_ROOT)})
    daemon = services.Service(name="authd", proc=proc, host="", port=0, log_path=log, workdir=wd)
    services.wait_for_log(daemon, "auth daemon listening", 120)
    conf = "\n".join([*_run_as(), *plugin.mosquitto_lines(settings, lib), "allow_anonymous false",
                      "max_keepalive 65535", "log_type error", ""])
    try:
        broker = start_broker(conf, port, wd / "mosquitto")
    except BaseException:
        daemon.stop()
        raise
    return daemon, broker

"""A bench prototype, not deployed: Mosquitto terminating TLS and authenticating IoT Core devices itself with a
plugin (``iotbridge_auth.c`` here, Mosquitto 2.0's plugin interface 5), the front out of the data path.

``build(out)`` compiles the plugin with gcc against Debian's ``mosquitto-dev`` headers (never committed: built at
bench and test time). Two ways the plugin checks a CONNECT's JWT:

- ``daemon``: it asks the auth daemon here (``python -m bench.mosquitto_auth daemon ...``) over a Unix socket, one
  request and answer per CONNECT; the daemon checks the client id with ``parse_client_id`` and the JWT with the
  front's own ``verify_jwt`` against the device's registered credentials, from the registry on Firestore. Where
  the credentials come from (``--keys``): ``map``, every device of the registry read once at start (a device
  missing from it is read on its CONNECT), or ``read``, one registry read per CONNECT (``Registry.get_device``;
  the front batches its reads, a plugin that waits for each answer cannot).
- ``openssl``: the plugin checks the JWT itself with OpenSSL against the keys the daemon wrote at start
  (``--keydir``: one PEM file per device with its unexpired public keys), the C-only ceiling.

Either way a blocked device is refused only by the daemon (the OpenSSL variant's key files are written for the
devices not blocked at start); the plugin's ACL gives a device its own topics only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socketserver
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from iotbridge.bridge.auth import AuthError, parse_client_id, verify_jwt
from iotbridge.local import services
from iotbridge.registry import Device, DeviceNotFound, Registry

SOURCE = Path(__file__).with_name("iotbridge_auth.c")
HEADERS = Path("/usr/include/mosquitto_broker.h")
INSTALL = "apt-get install -y gcc libssl-dev mosquitto-dev libmosquitto-dev"
PAGE = 1000


def build(out: Path) -> Path:
    """The plugin compiled into ``out``; MissingPrerequisite (with the install command) without gcc or headers."""
    gcc = shutil.which("gcc")
    if not gcc or not HEADERS.exists() or not Path("/usr/include/mosquitto.h").exists() \
            or not Path("/usr/include/openssl/evp.h").exists():
        raise services.MissingPrerequisite(f"gcc and the Mosquitto and OpenSSL headers are needed to build the "
                                           f"auth plugin: {INSTALL}")
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "iotbridge_auth.so"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(SOURCE), "-lcrypto"],
                   check=True, capture_output=True, text=True)
    return lib


def client_id_prefix(project: str, region: str, registry_id: str) -> str:
    return f"projects/{project}/locations/{region}/registries/{registry_id}/devices/"


def listener_conf(port: int, cert: str | Path, key: str | Path, plugin: Path, prefix: str, mode: str, *,
                  socket_path: Path | None = None, keydir: Path | None = None, audience: str = "") -> str:
    """Mosquitto's configuration: one TLS listener on ``port``, every client authenticated by the plugin."""
    opts = {"mode": mode, "client_id_prefix": prefix}
    if socket_path is not None:
        opts["socket"] = str(socket_path)
    if keydir is not None:
        opts |= {"keydir": str(keydir), "audience": audience}
    return "\n".join(["user root" if os.geteuid() == 0 else "", f"listener {port} 127.0.0.1",
                      f"certfile {cert}", f"keyfile {key}", "allow_anonymous false", f"plugin {plugin}",
                      *(f"plugin_opt_{k} {v}" for k, v in opts.items()), "max_keepalive 65535", "log_type error",
                      ""])


def start_broker(conf: str, port: int, wd: Path) -> services.Service:
    """Mosquitto with ``conf`` (``listener_conf``), in the folder ``wd``."""
    wd.mkdir(parents=True, exist_ok=True)
    return services.start_mosquitto(conf, port, wd)


@dataclass
class Checker:
    registry: Registry
    project: str
    region: str
    keymap: dict[str, Device] | None  # None: the registry read per CONNECT

    def check(self, client_id: str, password: str) -> str | None:
        """None when the device may connect, else why not (no secret in it)."""
        try:
            device_id = parse_client_id(client_id, self.project, self.region, self.registry.registry_id)
            device = self.keymap.get(device_id) if self.keymap is not None else None
            if device is None:
                device = self.registry.get_device(device_id)
            if device.blocked:
                return "device blocked"
            verify_jwt(password, device.credentials, audience=self.project)
        except (AuthError, DeviceNotFound) as exc:
            return str(exc)
        return None


def load_all(registry: Registry) -> dict[str, Device]:
    devices: dict[str, Device] = {}
    last = None
    while True:
        page = registry.list_devices(limit=PAGE, start_after=last)
        devices |= {d.id: d for d in page}
        if len(page) < PAGE:
            return devices
        last = page[-1].id


def write_keys(devices: dict[str, Device], keydir: Path) -> None:
    """One PEM file per device not blocked, with its unexpired public keys (the OpenSSL variant's input)."""
    keydir.mkdir(parents=True, exist_ok=True)
    for d in devices.values():
        if d.blocked:
            continue
        pems = [c.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
                for c in d.valid_credentials()]
        (keydir / f"{d.id}.pem").write_bytes(b"".join(pems))


def serve(socket_path: Path, checker: Checker) -> None:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                client_id, password = self.rfile.readline(), self.rfile.readline()
                if not password.endswith(b"\n"):
                    return
                why = checker.check(client_id.decode("utf-8", "replace").rstrip("\n"),
                                    password.decode("ascii", "replace").rstrip("\n"))
                self.wfile.write(b"OK\n" if why is None else f"NO {why}\n".encode())
                self.wfile.flush()

    socket_path.unlink(missing_ok=True)
    with socketserver.ThreadingUnixStreamServer(str(socket_path), Handler) as server:
        print(f"auth daemon listening on {socket_path}", flush=True)
        server.serve_forever()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mosquitto_auth",
                                description="The auth daemon of the Mosquitto plugin prototype (bench only).")
    p.add_argument("command", choices=["daemon"])
    p.add_argument("socket", type=Path, help="the Unix socket the plugin asks on")
    p.add_argument("--project", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--keys", choices=["map", "read"], default="map",
                   help="map: every device read at start; read: one registry read per CONNECT")
    p.add_argument("--keydir", type=Path, help="also write each device's public keys here (the OpenSSL variant)")
    a = p.parse_args(argv)
    registry = Registry(a.project, a.registry, a.region)
    keymap = load_all(registry) if a.keys == "map" or a.keydir else None
    if a.keydir and keymap is not None:
        write_keys(keymap, a.keydir)
    print(f"{len(keymap or {})} devices read at start", flush=True)
    serve(a.socket, Checker(registry, a.project, a.region, keymap if a.keys == "map" else None))
    return 0


def start_daemon(wd: Path, env: dict[str, str], project: str, region: str, registry_id: str, keys: str,
                 keydir: Path | None = None) -> tuple[services.Service, Path]:
    """The auth daemon in its own process (its own session), once it listens; (service, its socket)."""
    wd.mkdir(parents=True, exist_ok=True)
    sock = wd / "auth.sock"
    args = [sys.executable, "-m", "bench.mosquitto_auth", "daemon", str(sock), "--project", project, "--region",
            region, "--registry", registry_id, "--keys", keys, *(["--keydir", str(keydir)] if keydir else [])]
    log = wd / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=wd,
                                env={**os.environ, **env, "PYTHONPATH": str(services.REPO_ROOT)},
                                start_new_session=True)
    svc = services.Service(name=f"auth-daemon-{keys}", proc=proc, host="", port=0, log_path=log, workdir=wd)
    services.wait_for_log(svc, "auth daemon listening", 60)
    return svc, sock

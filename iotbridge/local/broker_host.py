"""Run one broker host on this machine: Mosquitto (loopback), the TLS front and the bridge service.

    python -m iotbridge.local.broker_host init ...   settings, secrets, a throw-away CA + server certificate
    python -m iotbridge.local.broker_host run ...    init if needed, then the three processes until Ctrl-C

``start_bridge_stack(...)`` is what the local stack and the tests use. Each part is its own process (so a
test can kill the bridge alone, and the front and the bridge do not share one GIL):

    mosquitto -c {workdir}/mosquitto/mosquitto.conf        loopback TCP + Unix socket, users front/bridge/backend
    python -m iotbridge.bridge front   --settings ...      TLS on front_port, devices connect here
    python -m iotbridge.bridge service --settings ...      Mosquitto ⇄ Pub/Sub

With ``--device-auth mosquitto`` (``BridgeSettings.device_auth``) there is no front: the device plugin is compiled
into ``{workdir}/plugin`` (gcc and Mosquitto's plugin headers), Mosquitto itself listens with TLS on front_port, and
its plugin asks the auth daemon, started first:

    python -m iotbridge.bridge authd   --settings ...      the plugin's answers on auth_socket; /healthz, /stats
    mosquitto -c ...                                        also TLS on front_port for devices, with the plugin
    python -m iotbridge.bridge service --settings ...      Mosquitto ⇄ Pub/Sub

The Pub/Sub and Firestore emulators are found through ``env`` (PUBSUB_EMULATOR_HOST, FIRESTORE_EMULATOR_HOST);
the topics of :mod:`iotbridge.spec` must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotbridge import spec
from iotbridge.bridge import plugin
from iotbridge.bridge.settings import (
    MAX_UNIX_SOCKET_PATH,
    BridgeSettings,
    Route,
    mosquitto_config,
    new_secrets,
    write_secrets,
)
from iotbridge.local import services
from iotbridge.local.tls import TlsFiles, generate_local_tls

READY_SERVICE = "bridge connected to broker"
READY_AUTHD = "auth daemon listening on"


def broker_socket_path(workdir: Path, name: str = "mosquitto/broker.sock") -> str:
    """Where a Unix socket of the host goes (Mosquitto's for the front; the auth daemon's as ``authd.sock``): in the
    host's folder, or, when that path is too long for a Unix socket address (a deep test folder), in a short
    folder of its own under the system's temporary folder."""
    path = str(workdir / name)
    if len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH:
        return path
    return str(Path(tempfile.mkdtemp(prefix="iotb-")) / Path(name).name)


def init_host(workdir: Path, project: str, region: str, registry_id: str, prefix: str,
              front_port: int | None = None, broker_port: int | None = None, host_id: str = "local",
              recheck_interval_s: float = 5.0, client_ca: Path | None = None, tls: TlsFiles | None = None,
              device_auth: str = "front", **fields: Any) -> BridgeSettings:
    """Write settings, secrets, TLS files and the Mosquitto config for one local host into ``workdir``; ``fields``
    are further :class:`BridgeSettings` fields (tests: small queue bounds, a stand-in publisher). ``tls``: a
    certificate to present instead of a new one of its own — hosts behind one load balancer present the same one,
    as the cloud's hosts do. ``device_auth`` "mosquitto": no HTTP bridge, the auth daemon's socket, and the device
    plugin compiled into ``workdir/plugin`` for Mosquitto's config (``plugin.BuildError`` without gcc or headers)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plugin_path = None
    if device_auth == "mosquitto":
        plugin_path = plugin.build(workdir / "plugin")
        fields = {"http_port": 0, "auth_socket": broker_socket_path(workdir, "authd.sock"), **fields}
    tls = tls or generate_local_tls(workdir / "tls")
    secrets_file = workdir / "secrets.json"
    write_secrets(secrets_file, new_secrets())
    settings = BridgeSettings(
        broker_socket=broker_socket_path(workdir),
        project=project, region=region, registry_id=registry_id, prefix=prefix, host_id=host_id,
        front_port=front_port or services.free_port(), broker_port=broker_port or services.free_port(),
        tls_cert=str(tls.server_cert), tls_key=str(tls.server_key), secrets_file=str(secrets_file),
        client_ca=str(client_ca) if client_ca else "",
        routes=(Route("logs", spec.topic_name(prefix, "device-logs")),),
        recheck_interval_s=recheck_interval_s, workdir=str(workdir), health_port=services.free_port(),
        device_auth=device_auth, **{"http_port": services.free_port(), **fields},
    )
    settings.dump(workdir / "settings.json")
    (workdir / "mosquitto").mkdir(exist_ok=True)
    (workdir / "mosquitto" / "mosquitto.conf").write_text(
        mosquitto_config(settings, workdir / "mosquitto", run_as_root=os.geteuid() == 0, plugin_path=plugin_path))
    return settings


@dataclass
class BridgeStack:
    settings: BridgeSettings
    workdir: Path
    env: dict[str, str]
    ca_cert: Path
    procs: dict[str, services.Service] = field(default_factory=dict)

    @property
    def mqtt_host(self) -> str:
        return self.settings.front_host

    @property
    def mqtt_port(self) -> int:
        return self.settings.front_port

    @property
    def http_bridge_url(self) -> str:
        """The HTTP device bridge's base URL (TLS with ``ca_cert``, as MQTT); devices append ``/v1/projects/...``.
        Empty when the host runs none (``http_port`` 0, as with device_auth mosquitto)."""
        if not self.settings.http_port:
            return ""
        return f"https://{self.settings.front_host}:{self.settings.http_port}"

    def settings_file(self) -> Path:
        return self.workdir / "settings.json"

    def service_stats(self) -> dict[str, float]:
        """The bridge service's counters (received, forwarded, acked, publish_errors, ...); {} before the first."""
        try:
            return json.loads((self.workdir / "service-stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def front_stats(self) -> dict[str, int]:
        """The front's counters (accepted, refused, registry_lookups, config_acks, address_limited, ...); with
        device_auth mosquitto, the auth daemon's (on the same port)."""
        url = f"http://{self.settings.front_host}:{self.settings.health_port}/stats"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def log_text(self, role: str) -> str:
        """What one part (front, service, mosquitto, authd) has logged so far."""
        return self.procs[role].log_path.read_text(errors="replace")

    def start_mosquitto(self) -> services.Service:
        conf = (self.workdir / "mosquitto" / "mosquitto.conf").read_text()
        svc = services.start_mosquitto(conf, self.settings.broker_port, self.workdir / "mosquitto")
        self.procs["mosquitto"] = svc
        return svc

    def _start_python(self, role: str, timeout: float = 30.0) -> services.Service:
        wd = self.workdir / role
        wd.mkdir(exist_ok=True)
        log_path = wd / f"{role}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "iotbridge.bridge", role, "--settings", str(self.settings_file())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=wd,
                env={**os.environ, **self.env}, start_new_session=True,
            )
        port = self.settings.front_port if role == "front" else 0
        svc = services.Service(name=role, proc=proc, host=self.settings.front_host, port=port, log_path=log_path,
                               workdir=wd)
        self.procs[role] = svc
        if role == "front":
            services.wait_for_port(svc, timeout)
            if self.settings.http_port:  # the HTTP bridge listens once the front does
                services.wait_for_port(dataclasses.replace(svc, port=self.settings.http_port), timeout)
        else:
            services.wait_for_log(svc, READY_AUTHD if role == "authd" else READY_SERVICE, timeout)
        return svc

    def start_front(self) -> services.Service:
        return self._start_python("front")

    def start_service(self) -> services.Service:
        return self._start_python("service")

    def start_authd(self) -> services.Service:
        return self._start_python("authd")

    def parts(self) -> list[tuple[str, Callable[[], services.Service]]]:
        """(name, start) of the host's parts in the order they start: Mosquitto, the bridge service, the TLS front;
        with device_auth mosquitto, the auth daemon (which Mosquitto's plugin asks), Mosquitto, the service."""
        if self.settings.device_auth == "mosquitto":
            return [("auth daemon", self.start_authd), ("mosquitto", self.start_mosquitto),
                    ("bridge service", self.start_service)]
        return [("mosquitto", self.start_mosquitto), ("bridge service", self.start_service),
                ("TLS front", self.start_front)]

    def kill(self, role: str) -> None:
        """SIGKILL one part (fault tests): no graceful shutdown, no final acks."""
        svc = self.procs.pop(role)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, 9)
        svc.proc.wait(10)

    def stop_part(self, role: str) -> None:
        svc = self.procs.pop(role, None)
        if svc is not None:
            svc.stop()

    def stop(self) -> None:
        for role in ("front", "service", "mosquitto", "authd"):
            self.stop_part(role)


def start_bridge_stack(workdir: Path, project: str, region: str, registry_id: str, prefix: str,
                       env: dict[str, str], recheck_interval_s: float = 5.0,
                       client_ca: Path | None = None, tls: TlsFiles | None = None, device_auth: str = "front",
                       **overrides: Any) -> BridgeStack:
    """Init (if needed) and start the host's parts (``BridgeStack.parts``: Mosquitto, the bridge service and the
    front; or the auth daemon, Mosquitto and the service); stop with ``.stop()``."""
    workdir = workdir.resolve()
    if (workdir / "settings.json").exists():
        settings = BridgeSettings.load(workdir / "settings.json")
    else:
        settings = init_host(workdir, project, region, registry_id, prefix, recheck_interval_s=recheck_interval_s,
                             client_ca=client_ca, tls=tls, device_auth=device_auth, **overrides)
    # The CA beside the server certificate (generate_local_tls writes both into one folder).
    stack = BridgeStack(settings=settings, workdir=workdir, env=dict(env),
                        ca_cert=Path(settings.tls_cert).parent / "ca.pem")
    try:
        for _, start in stack.parts():
            start()
    except BaseException:
        stack.stop()
        raise
    return stack



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iotbridge.local.broker_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write the settings of a broker host on this machine")
    run = sub.add_parser("run", help="Mosquitto + service + front (or auth daemon + Mosquitto + service) on this "
                                     "machine until Ctrl-C (PUBSUB_EMULATOR_HOST and FIRESTORE_EMULATOR_HOST set)")
    for p in (init, run):
        p.add_argument("--workdir", type=Path, required=True)
        p.add_argument("--project", required=True)
        p.add_argument("--region", required=True)
        p.add_argument("--registry", required=True)
        p.add_argument("--prefix", required=True, help="topic prefix, e.g. iot-local")
        p.add_argument("--device-auth", choices=spec.DEVICE_AUTH_MODES, default="front",
                       help="who authenticates devices: the TLS front, or Mosquitto with the device plugin and the "
                            "auth daemon (compiled here: gcc, mosquitto-dev); an existing workdir keeps its own")
    init.add_argument("--front-port", type=int, help="TLS port for devices (default: a free port)")
    init.add_argument("--broker-port", type=int, help="loopback Mosquitto port (default: a free port)")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        try:
            s = init_host(args.workdir, args.project, args.region, args.registry, args.prefix,
                          front_port=args.front_port, broker_port=args.broker_port, device_auth=args.device_auth)
        except (plugin.BuildError, ValueError) as exc:
            parser.exit(2, f"error: {exc}\n")
        print(f"wrote {args.workdir}/settings.json; devices: {s.front_host}:{s.front_port}, "
              f"CA {args.workdir}/tls/ca.pem")
        return 0
    try:
        stack = start_bridge_stack(args.workdir, args.project, args.region, args.registry, args.prefix,
                                   env=dict(os.environ), device_auth=args.device_auth)
    except (plugin.BuildError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"bridge up: devices connect to {stack.mqtt_host}:{stack.mqtt_port} with CA {stack.ca_cert}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

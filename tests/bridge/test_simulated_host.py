"""A broker host booted on this machine by the startup script of its instance template, run as it is.

The script is ``startup_script(...)``'s text, made from the same inputs Pulumi gives it, and ``bash`` runs it as
root. What it reaches for is real where this machine has it, and stood in where only GCE has it:

real      bash, useradd (the ``iotbridge`` user is created on this machine; ``mosquitto`` comes with Debian's
          package), install/chown, gcloud (the SDK of this machine), unzip, Debian's python3 -m venv, pip
          installing the archive's requirements.txt/constraints.txt, ``python -m iotbridge.bridge
          mosquitto-config``, /usr/sbin/mosquitto, and the front and the bridge service started from the unit
          files the script writes, each as the unit's user (Mosquitto as root, dropping to ``mosquitto`` itself).
stood in  - paths: ``IOTBRIDGE_ROOT`` puts /opt/iotbridge, /var/lib/iotbridge, /etc/iotbridge and
            /etc/systemd/system under a throw-away folder (the script's only test hook; unset on a host);
          - the metadata server, the code bucket (serving the zip of ``code_files()``, the files Pulumi's
            ``AssetArchive`` uploads) and Secret Manager: ``gce_standins`` on loopback, found by gcloud and the
            client libraries through their own endpoint variables; Pub/Sub and Firestore: their emulators;
          - apt-get: a stand-in on PATH that records the call and fails unless the packages it names are installed
            on this (Debian 12) machine — no download, no dpkg lock taken while other tests run;
          - systemctl: a stand-in on PATH that records the calls; this test then plays systemd for what the script
            asked (``enable --now``): starts each unit's ExecStart in its WorkingDirectory as its User, with the
            user's groups and HOME (it does not enforce ProtectSystem, NoNewPrivileges or LimitNOFILE);
          - pip's index: PIP_NO_INDEX with PIP_FIND_LINKS on a wheelhouse that ``pip download`` fills once per
            requirements/constraints pair from the same two files (PyPI is reachable but slow), and
            PIP_CONFIG_FILE=/dev/null so that this machine's pip configuration plays no part, as on a new host;
          - the network beyond this machine: ``https_proxy`` is a loopback proxy that refuses every CONNECT (the
            connected-devices gauge's write to Cloud Monitoring is refused there, and the front logs it).
The fixed ports of a host (8883 for devices, 1883 for Mosquitto on loopback) must be free on this machine.

Then a device connects over TLS with a JWT and its telemetry reaches the Pub/Sub emulator; a config pushed through
the fan-out reaches it; with the bridge service stopped, a device's event waits in the bridge's persistent
session; Mosquitto is restarted; the retained config and the queued event survive it.

A host in ``device_auth: mosquitto`` boots from its own script the same way: the plugin compiled from the archive
with this machine's gcc and Mosquitto headers, the auth daemon, Mosquitto (TLS on 8883 with the plugin) and the
service started as systemd would; a device connects to Mosquitto itself, gets its config and reaches Pub/Sub.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import io
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from gcp_iot_bridge.infra import broker as bc
from gcp_iot_bridge.infra import packaging
from iotbridge import spec
from iotbridge.bridge import fanout
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local import services
from iotbridge.local.broker_host import READY_AUTHD, READY_SERVICE
from iotbridge.local.tls import TlsFiles, generate_local_tls
from tests.waiting import TimedOut, wait_for

from .conftest import PROJECT, REGION, REGISTRY, DeviceFactory, PubSubReader, create_topics
from .gce_standins import GoogleStandIns
from .test_host import _health

pytestmark = pytest.mark.emulator

BUCKET = f"{PROJECT}-iot-sim-broker-code"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNITS = ("iotbridge-mosquitto", "iotbridge-service", "iotbridge-front")

APT_GET = """#!/bin/bash
# Stand-in for apt-get: records the call; `install` succeeds only if every package it names is installed.
echo "apt-get $*" >> "$SIMHOST_JOURNAL"
[ "$1" = update ] && exit 0
for p in "$@"; do
  case "$p" in -*|install) continue ;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \\
    || { echo "E: $p is not installed" >&2; exit 100; }
done
"""
SYSTEMCTL = """#!/bin/bash
# Stand-in for systemctl: records the call; the test starts the units.
echo "systemctl $*" >> "$SIMHOST_JOURNAL"
"""


@dataclass
class Unit:
    name: str
    exec_start: list[str]
    user: str | None
    workdir: str | None
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class SimulatedInit:
    """Plays systemd for the units the startup script wrote: start and stop them as their users."""

    unit_dir: Path
    log_dir: Path
    env: dict[str, str]  # where Google's endpoints are on this machine (the stand-ins, the emulators)
    units: dict[str, Unit] = field(default_factory=dict)

    def load(self, name: str) -> Unit:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(self.unit_dir / f"{name}.service")
        svc = parser["Service"]
        unit = Unit(name, shlex.split(svc["ExecStart"]), svc.get("User"), svc.get("WorkingDirectory"),
                    self.log_dir / f"{name}.log")
        self.units[name] = unit
        return unit

    def stop_order(self, names: tuple[str, ...]) -> list[str]:
        """The order systemd stops ``names`` in, from their After= lines. systemd.unit(5): "if a unit is configured
        with After= on another unit, the former is stopped before the latter"."""
        after: dict[str, set[str]] = {}
        for name in names:
            parser = configparser.ConfigParser(interpolation=None, strict=False)
            parser.read(self.unit_dir / f"{name}.service")
            after[name] = {u.removesuffix(".service") for u in parser["Unit"].get("After", "").split()}
        order: list[str] = []
        while len(order) < len(names):
            # Next: a unit no unit still running is ordered After= (nothing left must stop before it).
            ready = [n for n in names if n not in order
                     and not any(n in after[m] for m in names if m not in order and m != n)]
            assert ready, f"the units' After= lines form a cycle: {after}"
            order.append(sorted(ready)[0])
        return order

    def start(self, name: str) -> Unit:
        unit = self.units.get(name) or self.load(name)
        account = pwd.getpwnam(unit.user or "root")
        env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": account.pw_dir, "USER": account.pw_name,
               "LOGNAME": account.pw_name, "SHELL": account.pw_shell, **self.env}
        ids = {} if unit.user is None else {
            "user": account.pw_uid, "group": account.pw_gid,
            "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid)}
        with open(unit.log, "ab") as log:
            unit.proc = subprocess.Popen(unit.exec_start, cwd=unit.workdir or "/", env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         **ids)
        return unit

    def stop(self, name: str) -> None:
        unit = self.units.get(name)
        if unit is not None and unit.proc is not None:
            services.stop_process_group(unit.proc.pid, 15)
            unit.proc.wait(5)
            unit.proc = None

    def stop_all(self) -> None:
        for name in reversed(list(self.units)):
            self.stop(name)

    def service(self, name: str, port: int = 0) -> services.Service:
        unit = self.units[name]
        assert unit.proc is not None
        return services.Service(name, unit.proc, "127.0.0.1", port, unit.log)


def _uid(pid: int) -> tuple[int, int]:
    """(real, effective) uid of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise AssertionError(f"no Uid line for {pid}")


def _unix_connect_as(user: str, path: Path) -> str:
    """What connecting to the Unix socket ``path`` gives a process of ``user`` (Debian's python3, its groups)."""
    account = pwd.getpwnam(user)
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
             "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)")
    out = subprocess.run(["/usr/bin/python3", "-c", probe, str(path)], capture_output=True, text=True, timeout=30,
                         user=account.pw_uid, group=account.pw_gid,
                         extra_groups=os.getgrouplist(account.pw_name, account.pw_gid), env={"PATH": HOST_PATH})
    return out.stdout.strip() or out.stderr.strip()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _zip(files: dict[str, str]) -> bytes:
    """The archive as the Pulumi engine zips an ``AssetArchive`` of string assets: entries in name order, deflated,
    a fixed 1990 date, made by MS-DOS with no Unix mode bits (so unzip gives them 0666 less the umask)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, text in sorted(files.items()):
            info = zipfile.ZipInfo(rel, date_time=(1990, 1, 1, 0, 0, 0))
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 0, 0
            z.writestr(info, text)
    return buf.getvalue()


def _wheelhouse(files: dict[str, str]) -> Path:
    """Wheels for what the archive's requirements/constraints resolve to, fetched once per pair of files."""
    reqs = {k: files[k] for k in ("requirements.txt", "constraints.txt") if k in files}
    digest = hashlib.sha256(json.dumps(reqs, sort_keys=True).encode()).hexdigest()[:16]
    house = Path(sys.prefix) / "host-wheels" / digest
    if not (house / ".complete").exists():
        with tempfile.TemporaryDirectory() as tmp:
            args = []
            for name, text in reqs.items():
                (Path(tmp) / name).write_text(text)
                args += ["-c" if name == "constraints.txt" else "-r", str(Path(tmp) / name)]
            out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                                  "-d", str(house), *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"pip download for the host's wheelhouse failed:\n{out.stderr[-3000:]}"
        (house / ".complete").touch()
    return house


def _read_retained(port: int, password: str, topic: str, timeout: float = 10.0) -> tuple[bytes, bool] | None:
    """The message Mosquitto hands a new subscriber of ``topic`` (payload, retain flag), as user ``bridge``."""
    got: list[tuple[bytes, bool]] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"simhost-check-{uuid.uuid4().hex[:6]}")
    client.username_pw_set("bridge", password)
    client.on_message = lambda _c, _u, msg: got.append((bytes(msg.payload), bool(msg.retain)))
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        with contextlib.suppress(TimedOut):  # nothing retained: None, and the caller shows Mosquitto's log
            wait_for(f"the retained message on {topic}", lambda: got, timeout=timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else None


@pytest.fixture
def host_root() -> Iterator[Path]:
    # Under /tmp, traversable by every user (pytest's own tmp folders are root's 0700): the host's users must
    # reach their files as they would under /.
    root = Path(tempfile.mkdtemp(prefix="simhost-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class BootedHost:
    """A host the startup script booted: what it was given, what it called, and the init that plays systemd."""

    prefix: str
    google: GoogleStandIns
    tls: TlsFiles
    passwords: dict[str, str]
    health_port: int
    init: SimulatedInit
    calls: list[str]
    boot_s: float
    started: float


@contextlib.contextmanager
def booted_host(host_root: Path, tmp_path: Path, bridge_env: dict[str, str], device_auth: str = "front",
                ) -> Iterator[BootedHost]:
    """Run the startup script of a ``device_auth`` host as root on this machine (the stand-ins above); stop the units
    the test started and the stand-ins at the end."""
    busy = [p for p in (bc.MQTT_PORT, bc.BROKER_PORT) if not _port_free(p)]
    assert not busy, f"the simulated host binds a host's fixed ports and {busy} are in use on this machine"
    prefix = f"s{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)

    # The code archive, the server key and the passwords, where a host finds them.
    files = bc.code_files()
    object_name = f"bridge/{bc.content_hash(files)}.zip"
    tls = generate_local_tls(tmp_path / "tls")
    passwords = {"front": uuid.uuid4().hex, "bridge": uuid.uuid4().hex, "backend": uuid.uuid4().hex}
    google = GoogleStandIns(project=PROJECT, numeric_project="123456789012", zone=f"{REGION}-b",
                            instance_id="4815162342", hostname=socket.gethostname().split(".")[0],
                            service_account=f"iot-bridge@{PROJECT}.iam.gserviceaccount.com")
    google.objects[(BUCKET, object_name)] = _zip(files)
    google.secrets["iot-sim-broker-tls-key"] = tls.server_key.read_bytes()
    google.secrets["iot-sim-broker-passwords"] = json.dumps(passwords).encode()
    google.start()

    health_port = services.free_port()
    script = bc.startup_script(
        project=PROJECT, region=REGION, registry_id=REGISTRY, prefix=prefix, code_url=f"gs://{BUCKET}/{object_name}",
        tls_key_secret="iot-sim-broker-tls-key", passwords_secret="iot-sim-broker-passwords",
        server_cert_pem=tls.server_cert.read_text(), database="(default)",
        routes={"logs": spec.topic_name(prefix, "device-logs")}, health_port=health_port, device_auth=device_auth)
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("apt-get", APT_GET), ("systemctl", SYSTEMCTL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    journal = tmp_path / "journal"
    (tmp_path / "script.sh").write_text(script)
    (tmp_path / "gcloud").mkdir()
    endpoints = {**google.env(), **bridge_env}
    boot_env = {
        "PATH": f"{shims}:{HOST_PATH}", "HOME": str(tmp_path), "LANG": "C.UTF-8", "SIMHOST_JOURNAL": str(journal),
        "IOTBRIDGE_ROOT": str(host_root), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(_wheelhouse(files)),
        **endpoints,
    }
    init = SimulatedInit(host_root / "etc/systemd/system", tmp_path, endpoints)
    try:
        started = time.monotonic()
        boot = subprocess.run(["bash", str(tmp_path / "script.sh")], env=boot_env, capture_output=True, text=True,
                              timeout=300, umask=0o022)
        assert boot.returncode == 0, f"startup script failed:\n{boot.stdout[-3000:]}\n{boot.stderr[-5000:]}"
        yield BootedHost(prefix, google, tls, passwords, health_port, init, journal.read_text().splitlines(),
                         time.monotonic() - started, started)
    finally:
        init.stop_all()
        google.stop()


def _device(registry) -> tuple[str, Callable[[TlsFiles], Device]]:  # noqa: ANN001
    """A device registered now, and a way to connect it to the host's 8883 over TLS (trusting the CA of the host's
    certificate) with a JWT."""
    device_id, private = DeviceFactory(registry, None).register("ES256")  # type: ignore[arg-type]

    def connected(tls: TlsFiles) -> Device:
        d = Device(DeviceIdentity(PROJECT, REGION, REGISTRY, device_id, private, "ES256"), "127.0.0.1",
                   bc.MQTT_PORT, str(tls.ca_cert))
        d.connect()
        return d

    return device_id, connected


def test_a_broker_host_boots_from_its_startup_script_and_keeps_mosquittos_state(
        bridge_env, registry, host_root, tmp_path):
    # Pulumi declares no subscription for the hosts: the bridge makes its own, named after the instance.
    subscriber = pubsub_v1.SubscriberClient()
    with booted_host(host_root, tmp_path, bridge_env) as host:
        prefix, google, tls, passwords, health_port, init = (
            host.prefix, host.google, host.tls, host.passwords, host.health_port, host.init)
        calls, boot_s, started = host.calls, host.boot_s, host.started
        assert calls == ["apt-get update -q", "apt-get install -y -q mosquitto python3-venv unzip",
                         "systemctl disable --now mosquitto", "systemctl restart systemd-sysctl",
                         "systemctl daemon-reload", "systemctl enable --now " + " ".join(UNITS)]
        # The kernel's limits for the host's connections, applied by systemd-sysctl (host_sizing.py).
        sysctl = (host_root / "etc" / "sysctl.d" / "60-iotbridge.conf").read_text()
        assert "net.core.somaxconn = 65535" in sysctl
        # gcloud fetched the code and both secrets with the token the metadata stand-in issued.
        assert [r.status for r in google.seen("GET", f"/download/storage/v1/b/{BUCKET}/o/")] == [200]
        assert [r.status for r in google.seen("GET", f"/v1/projects/{PROJECT}/secrets/")] == [200, 200]
        assert google.seen("GET", "/computeMetadata/v1/instance/service-accounts/")

        # Every package the host installed is the lock's version.
        venv = host_root / "opt/iotbridge/venv/bin/python"
        listed = subprocess.run([str(venv), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                                env={"PATH": HOST_PATH, "PIP_CONFIG_FILE": os.devnull}, check=True, timeout=60)
        installed = {packaging.canonical_name(p["name"]): p["version"] for p in json.loads(listed.stdout)}
        lock = {n: line.partition("==")[2] for n, line in packaging.lock_pins().items()}
        seeded = {"pip", "setuptools"}  # what `python3 -m venv` puts there before pip installs anything
        assert {n: v for n, v in installed.items() if n not in seeded and lock.get(n) != v} == {}
        assert {"grpcio", "protobuf", "google-auth"} <= set(installed)

        # systemd's part: the units the script enabled, in its order, each as its user. At shutdown systemd stops
        # them in the reverse order: the front (draining its devices) first, the bridge service (forwarding what
        # they still sent) next, Mosquitto last.
        assert init.stop_order(UNITS) == ["iotbridge-front", "iotbridge-service", "iotbridge-mosquitto"]
        init.start(UNITS[0])
        services.wait_for_port(init.service(UNITS[0], bc.BROKER_PORT), 15)
        init.start(UNITS[1])
        services.wait_for_log(init.service(UNITS[1]), READY_SERVICE, 60)
        init.start(UNITS[2])
        services.wait_for_port(init.service(UNITS[2], bc.MQTT_PORT), 60)
        mosquitto_uid, iotbridge_uid = pwd.getpwnam("mosquitto").pw_uid, pwd.getpwnam("iotbridge").pw_uid
        for name, uid in zip(UNITS, (mosquitto_uid, iotbridge_uid, iotbridge_uid), strict=True):
            proc = init.units[name].proc
            assert proc is not None
            assert _uid(proc.pid) == (uid, uid), f"{name} runs as {_uid(proc.pid)}, not {uid}"
        wait_for("/healthz 200", lambda: _health(health_port), lambda v: v == 200, timeout=15)
        # The host id is the instance's name (hostname -s, as on GCE); the bridge made its own filtered
        # subscription under it, with the expiration that removes it a day after a host dies without a stop.
        host_id = json.loads((host_root / "etc/iotbridge/settings.json").read_text())["host_id"]
        assert host_id == google.hostname and spec.HOST_ID_RE.fullmatch(host_id)
        own = subscriber.subscription_path(PROJECT, fanout.host_subscription(prefix, host_id))
        made = subscriber.get_subscription(request={"subscription": own})
        assert (made.filter, made.expiration_policy.ttl) == (spec.host_filter(host_id), timedelta(hours=24))
        # The front labelled its gauge from the metadata server; the write itself was refused at the proxy.
        wait_for("the front's metadata read", lambda: google.seen("GET", "/computeMetadata/v1/instance/zone"),
                 timeout=15)
        wait_for("the gauge's write", lambda: google.seen("CONNECT", "monitoring.googleapis.com:443"), timeout=15)

        # A device: TLS with the CA that signed the host's certificate, a JWT, telemetry to Pub/Sub.
        reader = PubSubReader(PROJECT, prefix)
        reader.attach(uuid.uuid4().hex[:6])
        device_id, connect = _device(registry)

        def device() -> Device:
            return connect(tls)

        dev = device()
        dev.subscribe_config()
        dev.publish_event(b"booted", sub_folder=None).wait_for_publish(10)
        assert [m.data for m in reader.pull("telemetry", 1)] == [b"booted"]
        assert dev.configs.get(timeout=20) == b""  # its first config, empty, delivered on subscribe
        fanout.push_config(registry, pubsub_v1.PublisherClient(), prefix, device_id, b"cfg-1")
        assert dev.configs.get(timeout=20) == b"cfg-1"

        # The bridge service is down: the next event waits in its persistent session on Mosquitto.
        init.stop(UNITS[1])
        # Its clean stop (systemd's SIGTERM) deleted its subscription; it makes it anew when it starts again.
        with pytest.raises(gexc.NotFound):
            subscriber.get_subscription(request={"subscription": own})
        dev.publish_event(b"while the bridge was down").wait_for_publish(10)
        dev.disconnect()
        # Mosquitto restarts (as systemd's Restart=always would after a crash, or an operator's restart).
        init.stop(UNITS[0])
        init.start(UNITS[0])
        services.wait_for_port(init.service(UNITS[0], bc.BROKER_PORT), 15)
        retained = _read_retained(bc.BROKER_PORT, passwords["bridge"], f"/devices/{device_id}/config")
        conf = Path(init.units[UNITS[0]].exec_start[-1])
        mosquitto_log = conf.parent / "mosquitto.log"
        log_text = mosquitto_log.read_text(errors="replace") if mosquitto_log.exists() else ""
        assert retained == (b"cfg-1", True), f"the retained config did not survive the restart:\n{log_text[-2000:]}"
        init.start(UNITS[1])
        services.wait_for_log(init.service(UNITS[1]), READY_SERVICE, 60)
        assert [m.data for m in reader.pull("telemetry", 1)] == [b"while the bridge was down"]
        assert subscriber.get_subscription(request={"subscription": own}).filter == spec.host_filter(host_id)
        print(f"simulated host: startup script {boot_s:.1f}s, whole test {time.monotonic() - started:.1f}s")



def test_a_mosquitto_authenticated_host_boots_compiles_its_plugin_and_admits_a_device(
        bridge_env, registry, host_root, tmp_path):
    """``device_auth: mosquitto``: the script installs the compiler and Mosquitto's plugin headers, compiles the
    plugin from the archive, and enables the auth daemon, Mosquitto and the service (no front). Played as systemd
    would: the daemon (its socket Mosquitto's group's only), Mosquitto (TLS on 8883 with the plugin), the service;
    the daemon answers /healthz; a device connects to Mosquitto with its JWT, gets its config, reaches Pub/Sub."""
    units = bc.host_units("mosquitto")
    # Registered before the host boots: the daemon reads every device at start (later ones at its next change-feed
    # round, every 30 s on a deployed host).
    device_id, connect = _device(registry)
    registry.update_config(device_id, b"cfg-0")
    with booted_host(host_root, tmp_path, bridge_env, device_auth="mosquitto") as host:
        init = host.init
        assert host.calls == [
            "apt-get update -q",
            "apt-get install -y -q mosquitto python3-venv unzip " + " ".join(bc.PLUGIN_BUILD_PACKAGES),
            "systemctl disable --now mosquitto", "systemctl restart systemd-sysctl",
            "systemctl daemon-reload", "systemctl enable --now " + " ".join(units)]
        assert (host_root / bc.PLUGIN_DIR.lstrip("/") / "iotbridge_auth.so").is_file()
        assert not (host_root / "etc/systemd/system/iotbridge-front.service").exists()
        # Stopping: the service, then Mosquitto, then the daemon its plugin asks.
        assert init.stop_order(units) == ["iotbridge-service", "iotbridge-mosquitto", "iotbridge-authd"]
        mosquitto = pwd.getpwnam("mosquitto")
        # Mosquitto's copy of the server key, its own; the iotbridge user has none.
        key = host_root / bc.MOSQUITTO_TLS_DIR.lstrip("/") / "server-key.pem"
        assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (mosquitto.pw_uid, 0o600)
        assert not (host_root / "etc/iotbridge/server-key.pem").exists()

        init.start(units[0])
        services.wait_for_log(init.service(units[0]), READY_AUTHD, 60)
        sock = host_root / bc.AUTH_SOCKET.lstrip("/")
        folder = sock.parent.stat()
        assert (folder.st_uid, folder.st_gid, folder.st_mode & 0o777) == (
            pwd.getpwnam("iotbridge").pw_uid, mosquitto.pw_gid, 0o750)
        assert (sock.stat().st_gid, sock.stat().st_mode & 0o777) == (mosquitto.pw_gid, 0o660)
        # Reached by Mosquitto's user, and by no other unprivileged user.
        assert _unix_connect_as("mosquitto", sock) == "connected"
        assert _unix_connect_as("nobody", sock) == "PermissionError"
        init.start(units[1])
        services.wait_for_port(init.service(units[1], bc.MQTT_PORT), 15)
        services.wait_for_port(init.service(units[1], bc.BROKER_PORT), 15)
        init.start(units[2])
        services.wait_for_log(init.service(units[2]), READY_SERVICE, 60)
        iotbridge_uid = pwd.getpwnam("iotbridge").pw_uid
        for name, uid in zip(units, (iotbridge_uid, mosquitto.pw_uid, iotbridge_uid), strict=True):
            proc = init.units[name].proc
            assert proc is not None
            assert _uid(proc.pid) == (uid, uid), f"{name} runs as {_uid(proc.pid)}, not {uid}"
        # The load balancer's and auto-healing's check: the daemon's /healthz, on the same port as the front's.
        wait_for("/healthz 200", lambda: _health(host.health_port), lambda v: v == 200, timeout=30)

        reader = PubSubReader(PROJECT, host.prefix)
        reader.attach(uuid.uuid4().hex[:6])
        dev = connect(host.tls)
        dev.subscribe_config()
        assert dev.configs.get(timeout=20) == b"cfg-0"
        dev.publish_event(b"booted by mosquitto").wait_for_publish(10)
        assert [m.data for m in reader.pull("telemetry", 1)] == [b"booted by mosquitto"]
        dev.disconnect()
        print(f"simulated mosquitto host: startup script {host.boot_s:.1f}s, "
              f"whole test {time.monotonic() - host.started:.1f}s")

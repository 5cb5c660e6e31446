"""Start and stop the local services on free loopback ports.

Each ``start_*`` returns a :class:`Service` whose ``env`` holds the variables a client library reads
(``PUBSUB_EMULATOR_HOST`` …). Processes run in their own session so that ``stop()`` ends the launcher
scripts' Java children too. Used by the tests and by ``iotctl local up``.

A missing prerequisite raises :class:`MissingPrerequisite` whose message says how to install it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


class MissingPrerequisite(RuntimeError):
    """A program the local stack needs is not installed; the message says how to get it."""


class ServiceFailed(RuntimeError):
    """A service exited or did not become healthy in time; the message ends with its log tail."""


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_process_group(self.proc.pid, timeout)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_process_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL whatever is left after ``timeout``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        # Reap our own child if it is one, so the group can disappear.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# Ports handed out below the kernel's ephemeral range (Linux's default starts at 32768): a port the kernel picks for
# ``bind(0)`` lies in that range, where it may be given to a client's outgoing connection (an emulator's, a gRPC
# channel's) between the pick and the service's own bind, and the service then fails "address already in use".
FREE_PORTS = range(20000, 32768)
_given: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on, outside the ephemeral range, not handed out before by this process."""
    for _ in range(200):
        port = random.choice(FREE_PORTS)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the range is crowded: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(svc: Service, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise ServiceFailed(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log_tail()}")
        if port_open(svc.host, svc.port):
            return
        time.sleep(0.1)
    svc.stop()
    raise ServiceFailed(f"{svc.name} did not listen on {svc.address} within {timeout:.0f}s:\n{svc.log_tail()}")


def wait_for_log(svc: Service, needle: str, timeout: float = 30.0) -> None:
    """Health for a process without a port: wait until its log contains ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise ServiceFailed(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log_tail()}")
        with contextlib.suppress(OSError):
            if needle in svc.log_path.read_text(errors="replace"):
                return
        time.sleep(0.1)
    svc.stop()
    raise ServiceFailed(f"{svc.name} was not ready within {timeout:.0f}s:\n{svc.log_tail()}")


def sdk_root() -> Path:
    """The Google Cloud SDK folder whose ``platform/`` holds the emulators."""
    env = os.environ.get("CLOUDSDK_ROOT_DIR")
    candidates = [Path(env)] if env else []
    gcloud = shutil.which("gcloud")
    if gcloud:
        candidates.append(Path(os.path.realpath(gcloud)).parent.parent)
    candidates += [Path("/usr/lib/google-cloud-sdk"), Path("/google-cloud-sdk"), Path.home() / "google-cloud-sdk"]
    for c in candidates:
        if (c / "platform").is_dir():
            return c
    raise MissingPrerequisite(
        "Google Cloud SDK not found: install it (https://cloud.google.com/sdk/docs/install) with the components "
        "pubsub-emulator, cloud-firestore-emulator and bigtable (`gcloud components install ...`)"
    )


def _emulator(relative: str, component: str) -> Path:
    root = sdk_root()
    path = root / "platform" / relative
    if not path.exists():
        # An SDK from Google's apt repository has no component manager: its emulators are Debian packages.
        how = (f"apt-get install -y google-cloud-cli-{component.removeprefix('cloud-').removesuffix('-emulator')}"
               "-emulator" if root == Path("/usr/lib/google-cloud-sdk") else f"gcloud components install {component}")
        raise MissingPrerequisite(f"{path} not found: run `{how}`")
    return path


def _require_java() -> None:
    if not shutil.which("java"):
        raise MissingPrerequisite("java not found: install Java 17+ (apt-get install -y openjdk-17-jre-headless)")


def spawn(
    name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None, host: str = LOOPBACK
) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=full_env,
        start_new_session=True,
    )
    log.close()
    return Service(name=name, proc=proc, host=host, port=port, log_path=log_path, workdir=workdir)


def _workdir(workdir: Path | None, name: str) -> Path:
    return workdir if workdir is not None else Path(tempfile.mkdtemp(prefix=f"iot-{name}-"))


def start_pubsub(workdir: Path | None = None, port: int | None = None, timeout: float = 60.0) -> Service:
    _require_java()
    launcher = _emulator("pubsub-emulator/bin/cloud-pubsub-emulator", "pubsub-emulator")
    port = port or free_port()
    wd = _workdir(workdir, "pubsub")
    svc = spawn("pubsub", [str(launcher), f"--host={LOOPBACK}", f"--port={port}", f"--dir={wd / 'data'}"], port, wd)
    wait_for_port(svc, timeout)
    svc.env = {"PUBSUB_EMULATOR_HOST": svc.address}
    return svc


def start_firestore(workdir: Path | None = None, port: int | None = None, timeout: float = 60.0) -> Service:
    _require_java()
    launcher = _emulator("cloud-firestore-emulator/cloud_firestore_emulator", "cloud-firestore-emulator")
    port = port or free_port()
    wd = _workdir(workdir, "firestore")
    svc = spawn("firestore", [str(launcher), "start", f"--host={LOOPBACK}", f"--port={port}"], port, wd)
    wait_for_port(svc, timeout)
    svc.env = {"FIRESTORE_EMULATOR_HOST": svc.address}
    return svc


def start_bigtable(workdir: Path | None = None, port: int | None = None, timeout: float = 30.0) -> Service:
    launcher = _emulator("bigtable-emulator/cbtemulator", "bigtable")
    port = port or free_port()
    wd = _workdir(workdir, "bigtable")
    svc = spawn("bigtable", [str(launcher), f"-host={LOOPBACK}", f"-port={port}"], port, wd)
    wait_for_port(svc, timeout)
    svc.env = {"BIGTABLE_EMULATOR_HOST": svc.address}
    return svc


def bigquery_venv() -> Path:
    return Path(os.environ.get("IOT_BQ_VENV", REPO_ROOT / ".venv-bq"))


def start_bigquery(
    project: str, workdir: Path | None = None, port: int | None = None, timeout: float = 90.0
) -> Service:
    """The local BigQuery (bqemulator on DuckDB, from its own virtual environment ``.venv-bq``)."""
    venv = bigquery_venv()
    exe = venv / "bin" / "bqemulator"
    if not exe.exists():
        raise MissingPrerequisite(f"{exe} not found: run `make setup` (it creates {venv} with bqemulator)")
    port = port or free_port()
    grpc_port = free_port()
    wd = _workdir(workdir, "bigquery")
    svc = spawn(
        "bigquery",
        [str(exe), "start", "--rest-host", LOOPBACK, "--rest-port", str(port), "--grpc-host", LOOPBACK,
         "--grpc-port", str(grpc_port), "--project", project, "--log-level", "warning"],
        port, wd,
        # DuckDB finds the offline spatial extension under $HOME/.duckdb (installed by `make setup`).
        env={"HOME": str(venv / "home")},
    )
    wait_for_port(svc, timeout)
    svc.env = {"BIGQUERY_EMULATOR_HOST": f"http://{svc.address}"}
    return svc


def mosquitto_binary() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not exe:
        raise MissingPrerequisite("mosquitto not found: apt-get install -y mosquitto mosquitto-clients")
    return exe


def start_mosquitto(config: str, port: int, workdir: Path | None = None, timeout: float = 15.0) -> Service:
    """Mosquitto with the given configuration text; ``port`` is the listener that health is checked on."""
    exe = mosquitto_binary()
    wd = _workdir(workdir, "mosquitto")
    conf = wd / "mosquitto.conf"
    conf.write_text(config)
    svc = spawn("mosquitto", [exe, "-c", str(conf)], port, wd)
    wait_for_port(svc, timeout)
    return svc


def haproxy_binary(search: str | None = None) -> str:
    """The haproxy executable on ``search`` (default: PATH and /usr/sbin, where Debian puts it)."""
    exe = shutil.which("haproxy", path=search if search is not None else f"{os.environ.get('PATH', '')}:/usr/sbin")
    if not exe:
        raise MissingPrerequisite("haproxy not found: apt-get install -y haproxy (make setup installs it)")
    return exe


@dataclass(frozen=True)
class Backend:
    """One server behind the load balancer: its TCP port, and the port of its HTTP ``/healthz``."""

    name: str
    port: int
    health_port: int
    host: str = LOOPBACK


def haproxy_config(port: int, backends: list[Backend], check_interval_ms: int = 500, host: str = LOOPBACK) -> str:
    """A TCP load balancer (the stand-in for the cloud's TCP proxy): connections spread round-robin over the
    backends that pass their HTTP health check; a connection a dead backend refuses is sent to another one."""
    servers = "\n".join(
        f"    server {b.name} {b.host}:{b.port} check port {b.health_port} inter {check_interval_ms}ms fall 2 rise 2"
        for b in backends)
    return f"""global
    # two descriptors per relayed connection: this stays within an ordinary open-files limit
    maxconn 4000

defaults
    mode tcp
    timeout connect 2s
    # longer than an MQTT keep-alive (60 s) plus its grace, so idle devices are not cut
    timeout client 10m
    timeout server 10m
    retries 2
    option redispatch

frontend devices
    bind {host}:{port}
    default_backend hosts

backend hosts
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
{servers}
"""


def start_haproxy(port: int, backends: list[Backend], workdir: Path | None = None, check_interval_ms: int = 500,
                  timeout: float = 15.0) -> Service:
    """HAProxy in the foreground with :func:`haproxy_config`; health is its listening port."""
    exe = haproxy_binary()
    wd = _workdir(workdir, "haproxy")
    wd.mkdir(parents=True, exist_ok=True)
    conf = wd / "haproxy.cfg"
    conf.write_text(haproxy_config(port, backends, check_interval_ms))
    check = subprocess.run([exe, "-c", "-q", "-f", str(conf)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise ServiceFailed(f"haproxy refused {conf}: {(check.stderr or check.stdout).strip()}")
    svc = spawn("haproxy", [exe, "-db", "-f", str(conf)], port, wd)
    wait_for_port(svc, timeout)
    return svc


def python_executable() -> str:
    return sys.executable


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it has exited.

    Recorded beside each PID so that ``down`` never signals a process that merely reuses a recorded PID.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may contain spaces): state is field 3, start time field 22.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return None
    return int(fields[19])

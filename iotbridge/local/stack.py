"""``iotctl local up | status | down``: the whole architecture on this machine.

``up`` starts, on free loopback ports, the official emulators (Pub/Sub, Firestore, Bigtable), the local BigQuery,
the device-logs forwarder and the data-plane processes, provisions the topology of :mod:`iotbridge.spec`, waits
until each piece is healthy, and records every process (PID, its kernel start time, port, log) in
``<state dir>/state.json`` *as soon as it is started*, so that ``down`` stops exactly what ``up`` started, even
after ``up`` or a component crashed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from iotbridge import spec
from iotbridge.local import provision, services

Progress = Callable[[str], None]

# The pipeline's rule on the local stack: a device running hot is asked to run its fan at full speed.
# The fleet simulator drifts every fifth device past it (iotbridge.simulate).
LOCAL_THRESHOLD_RULES = {"temperature": {"above": 80, "config": {"fan": "max"}}}


def default_state_dir() -> Path:
    env = os.environ.get("IOT_LOCAL_STATE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "gcp-iot-bridge" / "local"


class StackError(RuntimeError):
    """The local stack cannot be brought up or is not running; the message is one line for the operator."""


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int | None
    host: str | None = None
    port: int | None = None
    log: str | None = None

    def alive(self) -> bool:
        return self.start_ticks is not None and services.process_start_ticks(self.pid) == self.start_ticks


class ProcessStatus(TypedDict):
    pid: int
    alive: bool
    port: int | None
    log: str | None


class StackStatus(TypedDict):
    """What ``iotctl local status --json`` prints: the endpoints (None until the stack brought them up)."""

    project_id: str
    region: str
    registry_id: str
    mqtt_host: str | None
    mqtt_port: int | None
    mqtt_ca_cert: str | None
    http_bridge_url: str | None  # the HTTP device bridge, TLS with mqtt_ca_cert
    admin_api_url: str | None
    pubsub_emulator_host: str | None
    firestore_emulator_host: str | None
    bigtable_emulator_host: str | None
    bigquery_endpoint: str | None
    bigquery_dataset: str
    bigtable_instance: str
    topic_prefix: str
    ready: bool
    healthy: bool
    processes: dict[str, ProcessStatus]


@dataclass
class StackState:
    names: provision.LocalNames
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    ready: bool = False

    def to_json(self) -> dict[str, object]:
        return {"names": asdict(self.names), "processes": {k: asdict(v) for k, v in self.processes.items()},
                "endpoints": self.endpoints, "ready": self.ready}

    @classmethod
    def from_json(cls, data: dict) -> StackState:
        return cls(names=provision.LocalNames(**data["names"]),
                   processes={k: ProcessRecord(**v) for k, v in data["processes"].items()},
                   endpoints=dict(data.get("endpoints", {})), ready=bool(data.get("ready")))


def pipeline_flags(names: provision.LocalNames, bigquery_endpoint: str, payload_profiles: str = "") -> list[str]:
    """The pipeline's flags on the local stack: the Flex Template's, with local names and endpoints."""
    flags = [
        f"--input_subscription={names.subscription('telemetry-pipeline')}",
        f"--bigquery_dataset={names.project}.{names.dataset}",
        f"--bigtable_instance=projects/{names.project}/instances/{names.bigtable_instance}",
        f"--config_requests_topic={names.topic('config-requests')}",
        f"--threshold_rules={json.dumps(LOCAL_THRESHOLD_RULES)}",
        f"--bigquery_endpoint={bigquery_endpoint}",
    ]
    if payload_profiles:
        flags.append(f"--payload_profiles={spec.parse_payload_profiles(payload_profiles).to_json()}")
    return flags


class LocalStack:
    def __init__(self, state_dir: Path | None = None, names: provision.LocalNames | None = None,
                 payload_profiles: str = "") -> None:
        """``payload_profiles``: the pipeline's profiles (``iotbridge.spec.parse_payload_profiles`` JSON, as the
        ``pipelinePayloadProfiles`` stack key); empty: the default profiles. Checked here, before anything starts."""
        self.state_dir = state_dir or default_state_dir()
        self.names = names or provision.LocalNames()
        self.state_file = self.state_dir / "state.json"
        if payload_profiles:
            try:
                spec.parse_payload_profiles(payload_profiles)
            except spec.ProfileError as exc:
                raise StackError(f"payload profiles: {exc}") from None
        self.payload_profiles = payload_profiles

    # ------------------------------------------------------------------------------------------ state
    def load(self) -> StackState | None:
        try:
            return StackState.from_json(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"unreadable state file {self.state_file}: {exc}") from exc

    def _save(self, state: StackState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=2))
        tmp.replace(self.state_file)

    def _record(self, state: StackState, svc: services.Service) -> None:
        state.processes[svc.name] = ProcessRecord(svc.name, svc.proc.pid, services.process_start_ticks(svc.proc.pid),
                                                  svc.host, svc.port, str(svc.log_path))
        self._save(state)

    # -------------------------------------------------------------------------------------------- up
    def up(self, progress: Progress = lambda _m: None) -> StackState:
        previous = self.load()
        if previous is not None:
            if any(p.alive() for p in previous.processes.values()):
                raise StackError(f"a local stack is already running (state in {self.state_dir}); "
                                 "run `iotctl local down` first")
            self.state_file.unlink(missing_ok=True)
        state = StackState(names=self.names)
        self._save(state)
        logs = self.state_dir / "logs"
        try:
            self._start_all(state, logs, progress)
        except BaseException:
            progress("start failed; stopping what was started")
            self.down()
            raise
        state.ready = True
        self._save(state)
        return state

    def _start_all(self, state: StackState, logs: Path, progress: Progress) -> None:
        n = self.names
        starters: list[tuple[str, Callable[[], services.Service]]] = [
            ("pubsub", lambda: services.start_pubsub(logs / "pubsub")),
            ("firestore", lambda: services.start_firestore(logs / "firestore")),
            ("bigtable", lambda: services.start_bigtable(logs / "bigtable")),
            ("bigquery", lambda: services.start_bigquery(n.project, logs / "bigquery")),
        ]
        for label, start in starters:
            progress(f"starting {label}")
            svc = start()
            self._record(state, svc)
            state.endpoints.update(svc.env)
            self._save(state)
        env = dict(state.endpoints)
        with _environ(env):
            progress("provisioning topics, subscriptions, tables and the Bigtable table")
            provision.provision_pubsub(n)
            provision.provision_bigquery(n, env["BIGQUERY_EMULATOR_HOST"])
            provision.provision_bigtable(n)
        progress("starting the device-logs forwarder")
        fwd = self._spawn_python(
            "forwarder", ["-m", "iotbridge.local.run_forwarder", "--project", n.project, "--prefix", n.prefix,
                          "--dataset", n.dataset, "--bigquery-endpoint", env["BIGQUERY_EMULATOR_HOST"]],
            logs / "forwarder", env)
        self._record(state, fwd)
        services.wait_for_log(fwd, "forwarding ", 60)
        self._start_bridge(state, logs, env, progress)

    def _start_bridge(self, state: StackState, logs: Path, env: dict[str, str], progress: Progress) -> None:
        """Mosquitto on loopback, the bridge service and the TLS front devices connect to (one broker host)."""
        from iotbridge.local.broker_host import BridgeStack, init_host

        n = self.names
        workdir = (logs / "bridge").resolve()
        settings = init_host(workdir, n.project, n.region, n.registry_id, n.prefix)
        bridge = BridgeStack(settings=settings, workdir=workdir, env=dict(env), ca_cert=workdir / "tls" / "ca.pem")
        for label, start in bridge.parts():
            progress(f"starting {label}")
            try:
                start()
            finally:
                for svc in bridge.procs.values():  # recorded even when it failed its health check
                    if svc.name not in state.processes:
                        self._record(state, svc)
        state.endpoints.update({"MQTT_HOST": bridge.mqtt_host, "MQTT_PORT": str(bridge.mqtt_port),
                                "MQTT_CA_CERT": str(bridge.ca_cert), "BRIDGE_SETTINGS": str(bridge.settings_file()),
                                "HTTP_BRIDGE_URL": bridge.http_bridge_url})
        self._save(state)
        self._start_function(state, logs, env, settings, progress)
        self._start_admin_api(state, logs, env, progress)
        self._start_pipeline(state, logs, env, progress)

    def _start_admin_api(self, state: StackState, logs: Path, env: dict[str, str], progress: Progress) -> None:
        """IoT Core's device manager API (``python -m iotbridge.admin``), accepting any caller, as Google's
        emulators do (docs/admin-api.md)."""
        n = self.names
        progress("starting the device manager API")
        port = services.free_port()
        aenv = {**env, "PROJECT_ID": n.project, "REGION": n.region, "REGISTRY_ID": n.registry_id,
                "TOPIC_PREFIX": n.prefix, "ADMIN_AUTH": "none", "ADMIN_HOST": services.LOOPBACK, "PORT": str(port),
                "PYTHONUNBUFFERED": "1"}
        api = self._spawn_python("admin-api", ["-m", "iotbridge.admin"], logs / "admin-api", aenv, port=port)
        self._record(state, api)
        services.wait_for_port(api, 60)
        state.endpoints["ADMIN_API_URL"] = f"http://{api.address}/"
        self._save(state)

    def _start_pipeline(self, state: StackState, logs: Path, env: dict[str, str], progress: Progress) -> None:
        """The streaming pipeline on Beam's BundleBasedDirectRunner, against the emulators and the local BigQuery.

        The same code and flags as the Flex Template on Dataflow; only the runner and the endpoints differ.
        """
        n = self.names
        progress("starting the streaming pipeline (DirectRunner)")
        fn = self._spawn_python("pipeline", [
            "-m", "dataflow_jobs.telemetry_pipeline",
            *pipeline_flags(n, env["BIGQUERY_EMULATOR_HOST"], self.payload_profiles),
            "--runner=BundleBasedDirectRunner",
            f"--project={n.project}",
        ], logs / "pipeline", {**env, "PYTHONUNBUFFERED": "1"})
        self._record(state, fn)
        services.wait_for_log(fn, "Running pipeline", 120)

    def _start_function(self, state: StackState, logs: Path, env: dict[str, str], settings, progress: Progress) -> None:
        """The config-push function on functions-framework behind the config-requests push subscription.

        As in the cloud, it stores each version in the registry and publishes it on the ``device-commands`` topic
        addressed to the broker host that holds the device (``CONFIG_DELIVERY=fanout``), which the host's bridge
        reads through its own filtered subscription: the local stack runs the cloud's delivery path.
        """
        from google.cloud import pubsub_v1

        n = self.names
        progress("starting the config-push function")
        port = services.free_port()
        fenv = {
            **env, "PROJECT_ID": n.project, "REGISTRY_ID": n.registry_id, "REGION": n.region,
            "CONFIG_DELIVERY": "fanout", "FANOUT_TOPIC": n.topic("device-commands"),
            "DEAD_LETTER_TOPIC": n.topic("dead-letter"), "PYTHONUNBUFFERED": "1",
        }
        source = services.REPO_ROOT / "functions" / "config_push" / "main.py"
        fn = self._spawn_python(
            "config-push", ["-m", "functions_framework", "--source", str(source), "--target", "handle",
                            "--signature-type", "cloudevent", "--host", services.LOOPBACK, "--port", str(port)],
            logs / "config-push", fenv, port=port)
        self._record(state, fn)
        services.wait_for_port(fn, 60)
        with _environ(env):
            sub = pubsub_v1.SubscriberClient()
            try:
                sub.modify_push_config(request={"subscription": n.subscription("config-requests-push"),
                                                "push_config": {"push_endpoint": f"http://{fn.address}/"}})
            finally:
                sub.close()
        state.endpoints["CONFIG_PUSH_URL"] = f"http://{fn.address}/"
        self._save(state)

    def _spawn_python(self, name: str, args: list[str], workdir: Path, env: dict[str, str],
                      port: int | None = None) -> services.Service:
        return services.spawn(name, [services.python_executable(), *args], port or 0, workdir, env=env,
                              host=services.LOOPBACK)

    # ------------------------------------------------------------------------------------------ down
    def down(self, timeout: float = 15.0) -> list[str]:
        """Stop every recorded process (in reverse start order) and forget the stack; returns their names."""
        state = self.load()
        if state is None:
            return []
        stopped = []
        for rec in reversed(list(state.processes.values())):
            if rec.alive():
                services.stop_process_group(rec.pid, timeout)
                stopped.append(rec.name)
        self.state_file.unlink(missing_ok=True)
        return stopped

    # ---------------------------------------------------------------------------------------- status
    def status(self) -> StackStatus:
        state = self.load()
        if state is None:
            raise StackError("no local stack is running: start one with `iotctl local up`")
        n = state.names
        e = state.endpoints
        return {
            "project_id": n.project,
            "region": n.region,
            "registry_id": n.registry_id,
            "mqtt_host": e.get("MQTT_HOST"),
            "mqtt_port": int(e["MQTT_PORT"]) if "MQTT_PORT" in e else None,
            "mqtt_ca_cert": e.get("MQTT_CA_CERT"),
            "http_bridge_url": e.get("HTTP_BRIDGE_URL"),
            "admin_api_url": e.get("ADMIN_API_URL"),
            "pubsub_emulator_host": e.get("PUBSUB_EMULATOR_HOST"),
            "firestore_emulator_host": e.get("FIRESTORE_EMULATOR_HOST"),
            "bigtable_emulator_host": e.get("BIGTABLE_EMULATOR_HOST"),
            "bigquery_endpoint": e.get("BIGQUERY_EMULATOR_HOST"),
            "bigquery_dataset": n.dataset,
            "bigtable_instance": n.bigtable_instance,
            "topic_prefix": n.prefix,
            "ready": state.ready,
            "healthy": all(p.alive() for p in state.processes.values()),
            "processes": {k: {"pid": p.pid, "alive": p.alive(), "port": p.port, "log": p.log}
                          for k, p in state.processes.items()},
        }


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""Where an ``iotctl`` command acts: the running local stack, or a deployed Pulumi stack (``--stack NAME``).

A deployed stack is read from ``pulumi stack output --json --stack NAME`` (docs/outputs.md). Outputs marked secret
are never requested (no ``--show-secrets``): the CLI needs none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_OUTPUTS = ("project_id", "region", "registry_id", "mqtt_endpoint", "mqtt_ca_cert", "telemetry_topic",
                    "state_topic", "config_requests_topic", "device_logs_topic", "bigquery_dataset")


class TargetError(RuntimeError):
    """The target cannot be resolved; the message is one line for the operator."""


@dataclass(frozen=True)
class Target:
    kind: str  # "local" | "stack"
    name: str
    project_id: str
    region: str
    registry_id: str
    mqtt_host: str | None
    mqtt_port: int | None
    mqtt_ca_cert: str | None  # a file path
    topics: dict[str, str]  # spec topic key -> projects/{p}/topics/{name}
    bigquery_dataset: str
    bigquery_endpoint: str | None = None  # None: the real BigQuery
    env: dict[str, str] = field(default_factory=dict)  # emulator hosts for client libraries
    http_bridge_url: str | None = None  # the HTTP device bridge (TLS with mqtt_ca_cert)
    admin_api_url: str | None = None  # the device manager API (docs/admin-api.md)

    def topic(self, key: str) -> str:
        try:
            return self.topics[key]
        except KeyError:
            raise TargetError(f"target {self.name} has no {key} topic") from None

    @property
    def prefix(self) -> str:
        """The stack's resource prefix: topic names are ``{prefix}-{key}`` (iotbridge.spec)."""
        name = self.topic("telemetry").rsplit("/", 1)[-1]
        if not name.endswith("-telemetry"):
            raise TargetError(f"target {self.name}: telemetry topic {name!r} does not end in -telemetry")
        return name[: -len("-telemetry")]

    def apply_env(self) -> None:
        os.environ.update(self.env)


def _topic_path(project: str, value: str) -> str:
    return value if value.startswith("projects/") else f"projects/{project}/topics/{value}"


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TargetError(f"mqtt_endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gcp-iot-bridge"


def from_stack_outputs(name: str, outputs: Mapping[str, Any], cache: Path | None = None) -> Target:
    """A Target from a stack's outputs (the JSON of ``pulumi stack output --json``)."""
    missing = [k for k in REQUIRED_OUTPUTS if k not in outputs]
    if missing:
        raise TargetError(f"stack {name} lacks outputs: {', '.join(missing)} (was `pulumi up` run on it?)")
    project = str(outputs["project_id"])
    host, port = _split_endpoint(str(outputs["mqtt_endpoint"]))
    ca_pem = str(outputs["mqtt_ca_cert"])
    if "BEGIN CERTIFICATE" not in ca_pem:
        raise TargetError(f"stack {name}: mqtt_ca_cert is not a PEM certificate")
    ca_dir = (cache or cache_dir()) / "stacks"
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_file = ca_dir / f"{name}-{hashlib.sha256(ca_pem.encode()).hexdigest()[:12]}-ca.pem"
    if not ca_file.exists():
        ca_file.write_text(ca_pem)
    topics = {
        key: _topic_path(project, str(outputs[out]))
        for key, out in (("telemetry", "telemetry_topic"), ("state", "state_topic"),
                         ("config-requests", "config_requests_topic"), ("device-logs", "device_logs_topic"),
                         ("dead-letter", "dead_letter_topic"))
        if out in outputs
    }
    return Target(kind="stack", name=name, project_id=project, region=str(outputs["region"]),
                  registry_id=str(outputs["registry_id"]), mqtt_host=host, mqtt_port=port,
                  mqtt_ca_cert=str(ca_file), topics=topics, bigquery_dataset=str(outputs["bigquery_dataset"]),
                  http_bridge_url=str(outputs["http_bridge_url"]) if outputs.get("http_bridge_url") else None,
                  admin_api_url=str(outputs["admin_api_url"]) if outputs.get("admin_api_url") else None)


Runner = Callable[[list[str]], str]


def _run_pulumi(argv: list[str]) -> str:
    if not shutil.which("pulumi"):
        raise TargetError("pulumi CLI not found: install it (https://www.pulumi.com/docs/install/) to use --stack")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TargetError(f"`{' '.join(argv)}` failed: {last}")
    return proc.stdout


def from_stack(name: str, runner: Runner = _run_pulumi) -> Target:
    raw = runner(["pulumi", "stack", "output", "--json", "--stack", name])
    try:
        outputs = json.loads(raw)
    except ValueError as exc:
        raise TargetError(f"stack {name}: `pulumi stack output --json` did not print JSON: {exc}") from exc
    if not isinstance(outputs, dict):
        raise TargetError(f"stack {name}: outputs are not a JSON object")
    return from_stack_outputs(name, outputs)


def from_local(status: Mapping[str, Any]) -> Target:
    """A Target from ``iotctl local status --json``."""
    from iotbridge import spec

    project = str(status["project_id"])
    prefix = str(status["topic_prefix"])
    env = {k: str(status[s]) for k, s in (("PUBSUB_EMULATOR_HOST", "pubsub_emulator_host"),
                                          ("FIRESTORE_EMULATOR_HOST", "firestore_emulator_host"),
                                          ("BIGTABLE_EMULATOR_HOST", "bigtable_emulator_host")) if status.get(s)}
    return Target(kind="local", name="local", project_id=project, region=str(status["region"]),
                  registry_id=str(status["registry_id"]), mqtt_host=status.get("mqtt_host"),
                  mqtt_port=status.get("mqtt_port"), mqtt_ca_cert=status.get("mqtt_ca_cert"),
                  topics={k: f"projects/{project}/topics/{spec.topic_name(prefix, k)}" for k in spec.TOPICS},
                  bigquery_dataset=str(status["bigquery_dataset"]),
                  bigquery_endpoint=status.get("bigquery_endpoint"), env=env,
                  http_bridge_url=status.get("http_bridge_url"),
                  admin_api_url=status.get("admin_api_url"))


def resolve(stack: str | None) -> Target:
    """``--stack NAME`` → that deployed stack; otherwise the running local stack."""
    if stack:
        return from_stack(stack)
    from iotbridge.local.stack import LocalStack, StackError

    try:
        return from_local(LocalStack().status())
    except StackError as exc:
        raise TargetError(f"{exc} (or pass --stack NAME for a deployed stack)") from exc

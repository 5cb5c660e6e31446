"""The local services the bridge and config-push sections share: the Pub/Sub and Firestore emulators, started
once per ``python -m bench`` run on free loopback ports and stopped by :func:`stop_all` (the runner calls it at
the end, and at exit if a section raised)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from google.api_core import exceptions as gexc

from iotbridge import spec
from iotbridge.device import Algorithm, generate_key
from iotbridge.local import services
from iotbridge.registry import Credential, CredentialFormat, Registry

PROJECT = "bench-project"
REGION = "europe-west1"
REGISTRY = "bench-registry"

_running: dict[str, services.Service] = {}
_workdir: Path | None = None


def workdir() -> Path:
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="iot-bench-"))
    return _workdir


def emulators() -> dict[str, str]:
    """Start (once) the Pub/Sub and Firestore emulators; returns their env vars, also set in ``os.environ``
    so the Google clients created in this process find them."""
    if "pubsub" not in _running:
        _running["pubsub"] = services.start_pubsub(workdir() / "pubsub")
    if "firestore" not in _running:
        _running["firestore"] = services.start_firestore(workdir() / "firestore")
    env = {**_running["pubsub"].env, **_running["firestore"].env}
    os.environ.update(env)
    return env


def pubsub_pid() -> int:
    return _running["pubsub"].proc.pid


def stop_all(keep_workdir: bool = False) -> None:
    """Stop the emulators; remove the work folder (logs, keys, data) unless ``keep_workdir``."""
    global _workdir
    while _running:
        _, svc = _running.popitem()
        svc.stop()
    if _workdir is not None and not keep_workdir:
        shutil.rmtree(_workdir, ignore_errors=True)
        _workdir = None


atexit.register(stop_all, keep_workdir=True)


def new_prefix(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:6]}"


def create_topics(project: str, prefix: str) -> None:
    from google.cloud import pubsub_v1

    pub = pubsub_v1.PublisherClient()
    for key in spec.TOPICS:
        with contextlib.suppress(gexc.AlreadyExists):
            pub.create_topic(request={"name": pub.topic_path(project, spec.topic_name(prefix, key))})


def create_pull_subscription(project: str, prefix: str, key: str, tag: str) -> str:
    from google.cloud import pubsub_v1

    sub = pubsub_v1.SubscriberClient()
    path = sub.subscription_path(project, f"{spec.topic_name(prefix, key)}-{tag}")
    sub.create_subscription(request={"name": path, "topic": f"projects/{project}/topics/{spec.topic_name(prefix, key)}",
                                     "ack_deadline_seconds": 600})
    return path


def register_devices(registry: Registry, n: int, tag: str,
                     algorithm: Algorithm = "ES256") -> list[tuple[str, bytes]]:
    """``n`` new devices with their own keys: [(device id, private key PEM)]."""
    out = []
    fmt: CredentialFormat = "ES256_PEM" if algorithm == "ES256" else "RSA_PEM"
    for i in range(n):
        device_id = f"{tag}-{i:05d}"
        private, public = generate_key(algorithm)
        registry.create_device(device_id, [Credential(fmt, public)])
        out.append((device_id, private))
    return out

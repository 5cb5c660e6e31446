"""``iotctl models``: train the edge anomaly model locally, roll it out through device configs, and see which
device runs which version.

* ``train`` — the local trainer (:mod:`iotbridge.ml.train_local`) against the running local stack's BigQuery.
  In the cloud, the model is trained and exported by the Pulumi program (``gcp_iot_bridge/infra/edge_ml.py``).
* ``deploy`` — a config push per device (a request on the config-requests topic, applied by the config-push
  function) whose config carries ``{"model": {"uri", "version", "sha256"}}`` merged into the device's current
  config, compare-and-set on its current version. The digest is computed from the artifact itself, which must
  parse as the version named. A ``gs://`` artifact is rolled out as a V4 signed URL minted by the models
  bucket's signer service account (IAM signBlob, no key file): the bucket is never public.
* ``status`` — per device: the version its config asks for (registry) and the version it reports running
  (the ``edge_model_fleet`` view over ``device_logs``), with the last refusal and its reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from iotbridge.cliutil import JsonFlag, StackOpt, emit, fail, first_line, target_or_fail
from iotbridge.edge_model import ArtifactError, EdgeModel, ModelPointer, sha256_hex
from iotbridge.ml.runner import FetchError, fetch, redact

models_app = typer.Typer(help="Edge anomaly model: train (locally), deploy to devices through their config, "
                              "status of the fleet.", no_args_is_help=True)

MAX_SIGNED_URL_TTL = timedelta(days=7)  # the V4 signing limit


class DeployError(RuntimeError):
    """A rollout cannot proceed; the message is one line for the operator."""


def _bigquery(t):
    from iotbridge.local.provision import bigquery_client

    if t.bigquery_endpoint:
        return bigquery_client(t.project_id, t.bigquery_endpoint)
    from google.cloud import bigquery

    return bigquery.Client(project=t.project_id)


# --------------------------------------------------------------------------------------------------- train


@models_app.command("train")
def train_cmd(
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated metric names: the model's features.")],
    version: Annotated[str, typer.Option("--model-version", help="Version label of the new model, e.g. v2.")],
    out: Annotated[Path, typer.Option("--out", help="Artifacts directory; writes OUT/VERSION/model.json.")] = Path(
        "models"),
    clusters: Annotated[int, typer.Option("--clusters", help="k: operating modes to learn (2-100).")] = 4,
    training_days: Annotated[int, typer.Option("--training-days", help="Train on this many days of "
                                                                       "telemetry_raw.")] = 7,
    contamination: Annotated[float, typer.Option("--contamination", help="Share of training readings above the "
                                                                         "anomaly threshold.")] = 0.01,
    as_json: JsonFlag = False,
) -> None:
    """Train the edge model on the running local stack's BigQuery (same SQL as the cloud; NumPy k-means where the
    local engine has no BigQuery ML) and write its artifact."""
    from iotbridge.ml import sql, train_local

    t = target_or_fail(None, as_json)
    try:
        spec = sql.ModelSpec(t.project_id, t.bigquery_dataset, tuple(m.strip() for m in metrics.split(",")),
                             num_clusters=clusters, training_days=training_days, contamination=contamination)
        model = train_local.train(_bigquery(t), spec, version)
        path, digest = train_local.write_artifact(model, out)
    except Exception as exc:  # noqa: BLE001 - one line for the operator whatever failed
        fail(first_line(exc), as_json)
    info = {"uri": path.resolve().as_uri(), "version": model.version, "sha256": digest, "size": len(model.to_bytes()),
            "training_rows": model.training_rows, "threshold": model.threshold, "clusters": len(model.centroids)}
    emit(info, as_json, f"model {model.version}: {info['size']} bytes, {model.training_rows} training rows, "
                        f"{len(model.centroids)} clusters\n  uri    {info['uri']}\n  sha256 {digest}")


# -------------------------------------------------------------------------------------------------- deploy


def read_artifact(uri: str, signer: str | None, url_ttl: timedelta) -> tuple[bytes, str]:
    """(artifact bytes, the URI devices should fetch). ``gs://`` → read with the signer's identity and signed."""
    if uri.startswith("gs://"):
        if not signer:
            raise DeployError("a gs:// artifact needs --signer (the models bucket's signer service account)")
        return gcs_read_and_sign(uri, signer, url_ttl)
    try:
        return fetch(uri), uri
    except (FetchError, ValueError) as exc:
        raise DeployError(str(exc)) from exc


def gcs_read_and_sign(uri: str, signer: str, ttl: timedelta, credentials: Any = None) -> tuple[bytes, str]:
    """Read ``gs://bucket/object`` as ``signer`` and mint a V4 GET URL signed by it (through IAM signBlob when
    ``credentials`` is None: the caller needs roles/iam.serviceAccountTokenCreator on the signer)."""
    if not timedelta(seconds=1) <= ttl <= MAX_SIGNED_URL_TTL:
        raise DeployError(f"--url-ttl must be between 1 s and 7 days (V4 signed URL limit), got {ttl}")
    parts = urlsplit(uri)
    bucket, name = parts.netloc, parts.path.lstrip("/")
    if not bucket or not name:
        raise DeployError(f"{uri} is not gs://BUCKET/OBJECT")
    from google.cloud import storage

    if credentials is None:
        import google.auth
        from google.auth import impersonated_credentials

        source, _ = google.auth.default()
        credentials = impersonated_credentials.Credentials(
            source_credentials=source, target_principal=signer,
            target_scopes=["https://www.googleapis.com/auth/devstorage.read_only"], lifetime=600)
    client = storage.Client(project="_", credentials=credentials)
    data = client.bucket(bucket).blob(name).download_as_bytes(timeout=60)  # as the signer: it can read it
    return data, sign_gcs_url(bucket, name, credentials, ttl)


def sign_gcs_url(bucket: str, name: str, credentials: Any, ttl: timedelta) -> str:
    """A V4 GET URL for one object, signed by ``credentials`` (a signing service-account identity)."""
    if not timedelta(seconds=1) <= ttl <= MAX_SIGNED_URL_TTL:
        raise DeployError(f"--url-ttl must be between 1 s and 7 days (V4 signed URL limit), got {ttl}")
    from google.cloud import storage

    blob = storage.Blob(name, storage.Bucket(storage.Client(project="_", credentials=credentials), bucket))
    return blob.generate_signed_url(version="v4", expiration=ttl, method="GET", credentials=credentials)


def model_config(current: bytes | None, pointer: ModelPointer, replace: bool) -> dict[str, Any]:
    """The device's current config with ``model`` set; a non-JSON-object config is only replaced on request."""
    if current is None or replace or not current.strip():
        return {"model": pointer.to_dict()}
    try:
        obj = json.loads(current)
    except (UnicodeDecodeError, ValueError):
        obj = None
    if not isinstance(obj, dict):
        raise DeployError("its current config is not a JSON object; pass --replace to overwrite it")
    return {**obj, "model": pointer.to_dict()}


def parse_ttl(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return timedelta(seconds=float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise typer.BadParameter(f"{text!r}: use a number with s, m, h or d, e.g. 24h") from None


@models_app.command("deploy")
def deploy_cmd(
    uri: Annotated[str, typer.Option("--uri", help="The artifact: file://, http(s):// or gs://BUCKET/OBJECT.")],
    version: Annotated[str, typer.Option("--model-version", help="The version the artifact must carry.")],
    devices: Annotated[list[str] | None, typer.Option("--device", help="A device id (repeatable).")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="Every device of the registry that is not blocked.")
                           ] = False,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected digest; the artifact must match it.")
                      ] = None,
    signer: Annotated[str | None, typer.Option("--signer", help="Service account that signs gs:// URLs "
                                                              "(stack output models_signer).")] = None,
    url_ttl: Annotated[str, typer.Option("--url-ttl", help="Lifetime of a signed URL (max 7d): a device that "
                                                           "fetches later needs a new deploy.")] = "7d",
    replace: Annotated[bool, typer.Option("--replace", help="Replace each config instead of merging 'model' into "
                                                            "it.")] = False,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Roll a model out: a config push to each device with the artifact's URI, version and SHA-256."""
    ttl = parse_ttl(url_ttl)
    t = target_or_fail(stack, as_json)
    try:
        result = deploy(uri, version, devices or [], all_devices, sha256, signer, ttl, replace, t)
    except Exception as exc:  # noqa: BLE001 - one line for the operator whatever failed
        fail(str(exc), as_json)
    failed = [d for d in result["devices"] if d.get("error")]
    human = "\n".join(f"  {d['device_id']:24} {'FAILED: ' + d['error'] if d.get('error') else 'requested'}"
                      for d in result["devices"])
    emit(result, as_json, f"model {version} ({result['sha256'][:12]}…, {result['size']} bytes) → "
                          f"{len(result['devices']) - len(failed)} device(s)\n{human}")
    if failed:
        raise typer.Exit(1)


def deploy(uri: str, version: str, devices: Sequence[str], all_devices: bool, sha256: str | None,
           signer: str | None, url_ttl: timedelta, replace: bool, t: Any) -> dict[str, Any]:
    """Pre-flight the artifact as a device would, then one config request per device on ``t``'s topic."""
    if bool(devices) == all_devices:
        raise DeployError("name the devices: --device ID (repeatable) or --all")
    data, device_uri = read_artifact(uri, signer, url_ttl)
    digest = sha256_hex(data)
    if sha256 is not None and sha256 != digest:
        raise DeployError(f"{redact(uri)} has sha256 {digest}, not the --sha256 given {sha256}")
    EdgeModel.load_verified(data, digest, version)  # what every device will check: fail here, not on the fleet
    pointer = ModelPointer(device_uri, version, digest)
    if len(json.dumps({"model": pointer.to_dict()})) > 16 * 1024:
        raise DeployError("the model pointer alone is over 16 KB: shorten the URI")

    from google.cloud import pubsub_v1

    from iotbridge.registry import Registry, RegistryError

    registry = Registry(t.project_id, t.registry_id, t.region)
    if all_devices:
        ids = [d.id for d in registry.list_devices() if not d.blocked]
        if not ids:
            raise DeployError(f"registry {t.registry_id} has no unblocked device")
    else:
        ids = list(dict.fromkeys(devices))
    publisher = pubsub_v1.PublisherClient()
    topic = t.topic("config-requests")
    out: list[dict[str, Any]] = []
    futures = []
    for device_id in ids:
        try:
            registry.get_device(device_id)
            current = registry.get_config(device_id)
            cfg = model_config(current.data if current else None, pointer, replace)
        except (RegistryError, DeployError) as exc:
            out.append({"device_id": device_id, "error": str(exc)})
            continue
        request = {"device_id": device_id, "config": cfg, "version_to_update": current.version if current else 0}
        futures.append((device_id, publisher.publish(topic, json.dumps(request).encode())))
    for device_id, fut in futures:
        try:
            out.append({"device_id": device_id, "message_id": fut.result(timeout=60)})
        except Exception as exc:  # noqa: BLE001 - reported per device
            out.append({"device_id": device_id, "error": f"publish failed: {exc}"})
    return {"version": version, "sha256": digest, "size": len(data), "uri": redact(device_uri),
            "devices": sorted(out, key=lambda d: d["device_id"])}


# -------------------------------------------------------------------------------------------------- status


def fleet_status(t, registry=None, client=None) -> list[dict[str, Any]]:
    """Per device: desired (config) and running (device_logs) model versions, last refusal."""
    from iotbridge import spec
    from iotbridge.registry import Registry

    registry = registry or Registry(t.project_id, t.registry_id, t.region)
    client = client or _bigquery(t)
    view = spec.VIEWS["edge_model_fleet"].render(t.project_id, t.bigquery_dataset)
    reported = {r["device_id"]: dict(r) for r in
                client.query(view, retry=None, job_retry=None,  # pyright: ignore[reportArgumentType]
                             timeout=60).result(timeout=60)}
    rows = []
    for d in registry.list_devices():
        desired = None
        cfg = registry.get_config(d.id)
        if cfg is not None:
            try:
                desired = (ModelPointer.from_config(json.loads(cfg.data)) or None)
            except (ValueError, ArtifactError, AttributeError, TypeError):
                desired = None
        r = reported.pop(d.id, {})
        rows.append({"device_id": d.id, "blocked": d.blocked,
                     "desired_version": desired.version if desired else None,
                     "running_version": r.get("model_version"), "last_seen": r.get("last_seen"),
                     "inferences_24h": r.get("inferences_24h") or 0, "anomalies_24h": r.get("anomalies_24h") or 0,
                     "last_rejected_version": r.get("last_rejected_version"),
                     "last_rejected_reason": r.get("last_rejected_reason"),
                     "last_rejected_time": r.get("last_rejected_time")})
    for device_id, r in reported.items():  # logs of a device no longer registered
        rows.append({"device_id": device_id, "blocked": None, "desired_version": None,
                     "running_version": r.get("model_version"), "last_seen": r.get("last_seen"),
                     "inferences_24h": r.get("inferences_24h") or 0, "anomalies_24h": r.get("anomalies_24h") or 0,
                     "last_rejected_version": r.get("last_rejected_version"),
                     "last_rejected_reason": r.get("last_rejected_reason"),
                     "last_rejected_time": r.get("last_rejected_time")})
    return sorted(rows, key=lambda x: x["device_id"])


@models_app.command("status")
def status_cmd(
    expect: Annotated[str | None, typer.Option("--expect", help="Exit 1 unless every unblocked device reports "
                                                                "running this version.")] = None,
    wait: Annotated[float, typer.Option("--wait", help="With --expect: poll up to this many seconds.")] = 0.0,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Which device runs which model version (device_logs), against the version its config asks for."""
    t = target_or_fail(stack, as_json)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            rows = fleet_status(t)
        except Exception as exc:  # noqa: BLE001
            fail(f"status failed: {exc}".splitlines()[0], as_json)
        lagging = [r["device_id"] for r in rows if r["blocked"] is False and r["running_version"] != expect]
        if expect is None or not lagging or time.monotonic() >= deadline:
            break
        time.sleep(2.0)  # polling the warehouse for a condition, bounded by --wait
    versions: dict[str, int] = {}
    for r in rows:
        versions[str(r["running_version"])] = versions.get(str(r["running_version"]), 0) + 1
    result = {"devices": rows, "running_versions": versions}
    if expect is not None:
        result["expect"] = expect
        result["lagging"] = lagging
    lines = [f"{'device':24} {'desired':10} {'running':10} {'inf/24h':>8} {'anom/24h':>8}  last refusal"]
    for r in rows:
        refusal = (f"{r['last_rejected_version']}: {r['last_rejected_reason']}"[:70]
                   if r["last_rejected_reason"] else "")
        lines.append(f"{r['device_id']:24} {str(r['desired_version']):10} {str(r['running_version']):10} "
                     f"{r['inferences_24h']:>8} {r['anomalies_24h']:>8}  {refusal}")
    emit(result, as_json, "\n".join(lines))
    if expect is not None and lagging:
        if not as_json:
            typer.echo(f"error: {len(lagging)} device(s) not running {expect}: {', '.join(lagging[:10])}", err=True)
        raise typer.Exit(1)

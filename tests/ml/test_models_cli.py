"""``iotctl models`` (the sub-app) against the Pub/Sub and Firestore emulators and the local BigQuery: deploy
publishes one compare-and-set config request per device with the model merged in; status joins the registry's
desired version with what devices report in device_logs. Signed URLs are checked offline."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

from iotbridge import cliutil
from iotbridge.edge_model import EdgeModel, Feature, sha256_hex
from iotbridge.local.provision import LocalNames, bigquery_client, provision_bigquery
from iotbridge.ml import cli as mcli
from iotbridge.targets import Target
from tests.waiting import TimedOut, wait_for

pytestmark = pytest.mark.emulator


def artifact(tmp_path, version="v2"):
    m = EdgeModel(version=version, features=(Feature("temperature", 20.0, 1.0),), centroids=((1, (20.0,)),),
                  threshold=3.0, contamination=0.01)
    p = tmp_path / f"{version}.json"
    p.write_bytes(m.to_bytes())
    return p, sha256_hex(m.to_bytes())


@pytest.fixture
def env(pubsub_emulator, firestore_emulator, bigquery_emulator, emulator_env, monkeypatch):
    from google.cloud import pubsub_v1

    from iotbridge.registry import Registry

    emulator_env(pubsub_emulator, firestore_emulator)
    run = uuid.uuid4().hex[:8]
    project = "local-project"
    topic = f"projects/{project}/topics/cfg-req-{run}"
    sub = f"projects/{project}/subscriptions/cfg-req-{run}"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(name=sub, topic=topic)
    names = LocalNames(dataset=f"ml_cli_{run}")
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    provision_bigquery(names, endpoint)
    t = Target(kind="local", name="local", project_id=project, region="us-central1", registry_id=f"reg-{run}",
               mqtt_host=None, mqtt_port=None, mqtt_ca_cert=None, topics={"config-requests": topic},
               bigquery_dataset=names.dataset, bigquery_endpoint=endpoint, env={})
    monkeypatch.setattr(cliutil, "resolve", lambda stack: t)
    registry = Registry(project, t.registry_id, t.region)
    for d in ("pump-1", "pump-2"):
        registry.create_device(d)
    registry.create_device("pump-blocked", blocked=True)
    registry.update_config("pump-1", b'{"sampling_s": 5}')

    def pull(n: int, timeout: float = 30.0) -> list[dict]:
        got: list[dict] = []

        def received() -> int:
            resp = subscriber.pull(subscription=sub, max_messages=10, timeout=5)
            if resp.received_messages:
                subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in resp.received_messages])
            got.extend(json.loads(m.message.data) for m in resp.received_messages)
            return len(got)

        wait_for(f"{n} config requests (the number received)", received, lambda k: k >= n, timeout=timeout,
                 interval=0)
        return got

    return t, registry, pull, bigquery_client(project, endpoint)


def invoke(*args: str):
    return CliRunner().invoke(mcli.models_app, list(args))


def test_deploy_all_publishes_merged_cas_requests(env, tmp_path):
    t, registry, pull, _ = env
    path, sha = artifact(tmp_path)
    res = invoke("deploy", "--uri", path.as_uri(), "--model-version", "v2", "--all", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["sha256"] == sha and [d["device_id"] for d in out["devices"]] == ["pump-1", "pump-2"]
    reqs = {r["device_id"]: r for r in pull(2)}
    assert set(reqs) == {"pump-1", "pump-2"}  # the blocked device is left out
    pointer = {"uri": path.as_uri(), "version": "v2", "sha256": sha}
    assert reqs["pump-1"] == {"device_id": "pump-1", "config": {"sampling_s": 5, "model": pointer},
                              "version_to_update": 1}
    assert reqs["pump-2"] == {"device_id": "pump-2", "config": {"model": pointer}, "version_to_update": 0}


def test_deploy_refuses_what_devices_would_refuse(env, tmp_path):
    _, _, pull, _ = env
    path, sha = artifact(tmp_path)
    cases = [
        (["--sha256", "0" * 64], "not the --sha256 given"),
        (["--model-version", "v3"], "artifact says version 'v2'"),
    ]
    for extra, msg in cases:
        args = ["deploy", "--uri", path.as_uri(), "--device", "pump-1", "--json"]
        if "--model-version" not in extra:
            args += ["--model-version", "v2"]
        res = invoke(*args, *extra)
        assert res.exit_code == 1 and msg in json.loads(res.output)["error"], res.output
    res = invoke("deploy", "--uri", path.as_uri(), "--model-version", "v2", "--json")
    assert res.exit_code == 1 and "--device ID" in json.loads(res.output)["error"]
    res = invoke("deploy", "--uri", "gs://b/o.json", "--model-version", "v2", "--all", "--json")
    assert res.exit_code == 1 and "--signer" in json.loads(res.output)["error"]
    with pytest.raises(TimedOut) as nothing:
        pull(1, timeout=6)
    assert nothing.value.last == 0  # nothing was requested


def test_deploy_unknown_device_fails_that_device_only(env, tmp_path):
    _, _, pull, _ = env
    path, _ = artifact(tmp_path)
    res = invoke("deploy", "--uri", path.as_uri(), "--model-version", "v2", "--device", "pump-2",
                 "--device", "ghost-1", "--json")
    assert res.exit_code == 1
    devices = {d["device_id"]: d for d in json.loads(res.output)["devices"]}
    assert "message_id" in devices["pump-2"] and "ghost-1" in devices["ghost-1"]["error"]
    assert [r["device_id"] for r in pull(1)] == ["pump-2"]


def test_status_joins_desired_and_running(env, tmp_path):
    t, registry, _, bq = env
    path, sha = artifact(tmp_path)
    registry.update_config("pump-2", json.dumps({"model": {"uri": path.as_uri(), "version": "v2",
                                                           "sha256": sha}}).encode())
    now = datetime.now(UTC)
    rows = [{"subscription_name": "s", "message_id": f"m{i}",
             "publish_time": (now - timedelta(seconds=10 - i)).isoformat(),
             "data": json.dumps(rec), "attributes": json.dumps({"deviceId": dev})}
            for i, (dev, rec) in enumerate([
                ("pump-2", {"kind": "model_loaded", "model_version": "v2"}),
                ("pump-2", {"kind": "inference", "model_version": "v2", "anomaly": True}),
                ("pump-1", {"kind": "model_rejected", "model_version": None, "requested_version": "v2",
                            "reason": "digest mismatch"})])]
    assert bq.insert_rows_json(f"{t.project_id}.{t.bigquery_dataset}.device_logs", rows, retry=None, timeout=30) == []
    res = invoke("status", "--json")
    assert res.exit_code == 0, res.output
    devices = {d["device_id"]: d for d in json.loads(res.output)["devices"]}
    assert devices["pump-2"]["desired_version"] == "v2" and devices["pump-2"]["running_version"] == "v2"
    assert devices["pump-2"]["inferences_24h"] == 1 and devices["pump-2"]["anomalies_24h"] == 1
    assert devices["pump-1"]["running_version"] is None
    assert devices["pump-1"]["last_rejected_reason"] == "digest mismatch"
    res = invoke("status", "--expect", "v2", "--json")
    assert res.exit_code == 1 and json.loads(res.output)["lagging"] == ["pump-1"]
    human = invoke("status")
    assert "pump-2" in human.output and "digest mismatch" in human.output


def test_sign_gcs_url_offline():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    creds = service_account.Credentials.from_service_account_info({
        "type": "service_account", "client_email": "models-signer@p.iam.gserviceaccount.com", "private_key": key,
        "token_uri": "https://oauth2.googleapis.com/token", "project_id": "p"})
    url = mcli.sign_gcs_url("iot-dev-models", "edge/v2/model-000000000000.json", creds, timedelta(hours=24))
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    assert parts.scheme == "https" and parts.path == "/iot-dev-models/edge/v2/model-000000000000.json"
    assert q["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"] and q["X-Goog-Expires"] == ["86400"]
    assert q["X-Goog-Credential"][0].startswith("models-signer@p.iam.gserviceaccount.com/")
    assert len(q["X-Goog-Signature"][0]) == 512  # RSA-2048 signature, hex
    with pytest.raises(mcli.DeployError, match="7 days"):
        mcli.sign_gcs_url("b", "o", creds, timedelta(days=8))


def test_model_config_merge_rules():
    from iotbridge.edge_model import ModelPointer

    p = ModelPointer("file:///m.json", "v1", "a" * 64)
    assert mcli.model_config(None, p, False) == {"model": p.to_dict()}
    assert mcli.model_config(b'{"a": 1, "model": {"version": "v0"}}', p, False) == {"a": 1, "model": p.to_dict()}
    with pytest.raises(mcli.DeployError, match="--replace"):
        mcli.model_config(b"\x00binary", p, False)
    assert mcli.model_config(b"\x00binary", p, True) == {"model": p.to_dict()}


def test_help_is_truthful():
    res = invoke("--help")
    assert res.exit_code == 0 and all(c in res.output for c in ("train", "deploy", "status"))
    assert "signed" in invoke("deploy", "--help").output.lower()

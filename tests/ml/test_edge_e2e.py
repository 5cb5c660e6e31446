"""Cloud-to-edge ML end to end on the real local stack (model trained, deployed through configs,
run on devices, monitored in the views).

``LocalStack.up()`` (Pub/Sub, Firestore, Bigtable emulators, local BigQuery, device-logs forwarder, Mosquitto,
bridge service, TLS front, config-push function, pipeline). The stack's config-requests push subscription is then
pointed at a second config-push function in fan-out delivery, the cloud's path through the bridge (the stack's own
function publishes to the loopback broker). Devices are the device SDK over TLS, each with a
:class:`ModelRunner`.

1. Training data goes into ``telemetry_raw`` directly (rows as the pipeline writes them, so the training set is
   known exactly), then ``iotctl models train`` trains v1 on the local BigQuery.
2. ``iotctl models deploy --all`` → config requests → function → registry → fan-out → bridge → devices; every
   device loads v1 and reports inferences to ``events/logs`` → device-logs topic → forwarder → ``device_logs``;
   ``iotctl models status --expect v1`` sees every device on v1.
3. v2 is deployed from a loopback HTTP server that hands the genuine artifact to the operator's pre-flight and a
   tampered one afterwards (an object replaced after sign-off): every device refuses it (digest mismatch), keeps
   v1, and says so in ``device_logs``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from iotbridge.device import Device, DeviceIdentity, generate_key
from iotbridge.local import services
from iotbridge.local.provision import LocalNames, bigquery_client
from iotbridge.local.stack import LocalStack
from iotbridge.ml.cli import models_app
from iotbridge.ml.runner import ModelRunner
from iotbridge.registry import Credential, Registry
from tests.waiting import wait_for

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(600)]
DEVICES = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[LocalStack, dict]]:
    state_dir = tmp_path_factory.mktemp("edge-e2e-stack")
    names = LocalNames(prefix=f"e2e{uuid.uuid4().hex[:6]}", registry_id="edge-e2e")
    st = LocalStack(state_dir=state_dir, names=names)
    try:
        st.up()
    except services.MissingPrerequisite as exc:
        st.down()
        pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
    status = st.status()
    env = {"PUBSUB_EMULATOR_HOST": str(status["pubsub_emulator_host"]),
           "FIRESTORE_EMULATOR_HOST": str(status["firestore_emulator_host"])}
    function = None
    try:
        port = services.free_port()
        workdir = state_dir / "config-push"
        workdir.mkdir()
        log_path = workdir / "function.log"
        fenv = {**os.environ, **env, "PROJECT_ID": names.project, "REGISTRY_ID": names.registry_id,
                "REGION": names.region, "CONFIG_DELIVERY": "fanout",
                "FANOUT_TOPIC": names.topic("device-commands"), "DEAD_LETTER_TOPIC": names.topic("dead-letter"),
                "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--source",
                 str(services.REPO_ROOT / "functions" / "config_push" / "main.py"), "--target", "handle",
                 "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port)],
                env=fenv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        function = services.Service("config-push", proc, "127.0.0.1", port, log_path, workdir=workdir)
        services.wait_for_port(function, timeout=60)
        from google.cloud import pubsub_v1

        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            sub = pubsub_v1.SubscriberClient()
            sub.modify_push_config(request={"subscription": names.subscription("config-requests-push"),
                                            "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/"}})
            sub.close()
        yield st, status
    finally:
        if function is not None:
            function.stop()
        st.down()


class EdgeDevice:
    """A device app: the SDK connection, its model runner, and a thread applying configs as they arrive."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.runner = ModelRunner.for_device(dev)
        self.results: queue.Queue[dict] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                cfg = self.dev.configs.get(timeout=0.2)
            except queue.Empty:
                continue
            rec = self.runner.apply_config(cfg)
            if rec is not None:
                self.results.put(rec)

    def send(self, seq: int, metrics: dict[str, float]) -> None:
        reading = {"ts": int(time.time() * 1000), "seq": seq, "metrics": metrics}
        self.dev.publish_event(json.dumps(reading).encode()).wait_for_publish(10)
        self.runner.observe(reading)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.dev.disconnect()


def seed_training_rows(status: dict, n: int = 300) -> None:
    rng = np.random.default_rng(3)
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        t, r = ((21.0, 1200.0), (30.0, 2800.0))[i % 2]
        rows.append({"device_id": f"edge-{i % DEVICES}", "event_time": (now - timedelta(seconds=i)).isoformat(),
                     "publish_time": now.isoformat(), "message_id": f"seed-{i}", "seq": i,
                     "metrics": [{"name": "temperature", "value": float(rng.normal(t, 0.5))},
                                 {"name": "rpm", "value": float(rng.normal(r, 25.0))}]})
    client = bigquery_client(str(status["project_id"]), str(status["bigquery_endpoint"]))
    table = f"{status['project_id']}.{status['bigquery_dataset']}.telemetry_raw"
    assert client.insert_rows_json(table, rows, retry=None, timeout=30) == []


def device_logs(status: dict) -> list[dict]:
    client = bigquery_client(str(status["project_id"]), str(status["bigquery_endpoint"]))
    q = (f"SELECT JSON_VALUE(attributes, '$.deviceId') AS device_id, data "
         f"FROM `{status['project_id']}.{status['bigquery_dataset']}.device_logs`")
    return [{"device_id": r["device_id"], **json.loads(r["data"])}
            for r in client.query(q, retry=None, job_retry=None, timeout=30).result(timeout=30)]


class _FlipHandler(BaseHTTPRequestHandler):
    """Serves the genuine bytes to the first request, tampered bytes to every later one."""

    genuine = b""
    tampered = b""
    served = 0

    def do_GET(self) -> None:  # noqa: N802
        body = self.genuine if type(self).served == 0 else self.tampered
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_train_rollout_monitor_and_refuse_tampered_model(stack, tmp_path, monkeypatch):
    st, status = stack
    monkeypatch.setenv("IOT_LOCAL_STATE_DIR", str(st.state_dir))
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", str(status["pubsub_emulator_host"]))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", str(status["firestore_emulator_host"]))
    cli = CliRunner()

    # --- devices: registered, connected over TLS, subscribed to their config
    registry = Registry(str(status["project_id"]), str(status["registry_id"]), str(status["region"]))
    fleet: list[EdgeDevice] = []
    try:
        for i in range(DEVICES):
            private, public = generate_key("ES256")
            registry.create_device(f"edge-{i}", [Credential("ES256_PEM", public)])
            dev = Device(DeviceIdentity(str(status["project_id"]), str(status["region"]), str(status["registry_id"]),
                                        f"edge-{i}", private, "ES256"),
                         str(status["mqtt_host"]), int(status["mqtt_port"]), str(status["mqtt_ca_cert"]))
            dev.connect()
            dev.subscribe_config()
            fleet.append(EdgeDevice(dev))

        # --- train v1 on the local BigQuery
        seed_training_rows(status)
        res = cli.invoke(models_app, ["train", "--metrics", "temperature,rpm", "--model-version", "v1",
                                      "--clusters", "2", "--out", str(tmp_path / "models"), "--json"])
        assert res.exit_code == 0, res.output
        v1 = json.loads(res.output)
        assert v1["training_rows"] == 300 and v1["size"] < 1024

        # --- roll out v1 to the whole registry
        res = cli.invoke(models_app, ["deploy", "--uri", v1["uri"], "--model-version", "v1", "--all", "--json"])
        assert res.exit_code == 0, res.output
        for d in fleet:
            rec = d.results.get(timeout=60)
            assert rec["kind"] == "model_loaded" and rec["model_version"] == "v1", rec
        for seq in range(5):
            for d in fleet:
                d.send(seq, {"temperature": 21.0 + 0.1 * seq, "rpm": 1200.0})
        fleet[0].send(99, {"temperature": 30.0, "rpm": 1200.0})  # hot while idle: an anomaly

        res = cli.invoke(models_app, ["status", "--expect", "v1", "--wait", "90", "--json"])
        assert res.exit_code == 0, res.output
        fleet_status = {r["device_id"]: r for r in json.loads(res.output)["devices"]}
        assert all(fleet_status[f"edge-{i}"]["running_version"] == "v1" for i in range(DEVICES))
        assert all(fleet_status[f"edge-{i}"]["desired_version"] == "v1" for i in range(DEVICES))
        wait_for("every inference in device_logs",
                 lambda: sum(1 for r in device_logs(status) if r["kind"] == "inference"),
                 lambda v: v >= 5 * DEVICES + 1,
                 timeout=60)
        logs = device_logs(status)
        # What a device says about itself matches the identity the bridge authenticated.
        assert {r["device_id"] for r in logs} == {f"edge-{i}" for i in range(DEVICES)}
        assert all(r["model_version"] == "v1" for r in logs if r["kind"] == "inference")
        assert [r["seq"] for r in logs if r["kind"] == "inference" and r["anomaly"]] == [99]

        # --- v2, tampered after the operator's pre-flight: refused by every device, v1 kept
        res = cli.invoke(models_app, ["train", "--metrics", "temperature,rpm", "--model-version", "v2",
                                      "--clusters", "3", "--out", str(tmp_path / "models"), "--json"])
        assert res.exit_code == 0, res.output
        v2 = json.loads(res.output)
        genuine = Path(v2["uri"].removeprefix("file://")).read_bytes()
        tampered = genuine.replace(b'"contamination":0.01', b'"contamination":0.49')
        assert tampered != genuine
        _FlipHandler.genuine, _FlipHandler.tampered, _FlipHandler.served = genuine, tampered, 0
        server = ThreadingHTTPServer(("127.0.0.1", 0), _FlipHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/edge/v2/model.json?X-Goog-Signature=s3cr3t"
            res = cli.invoke(models_app, ["deploy", "--uri", url, "--model-version", "v2", "--all", "--json"])
            assert res.exit_code == 0, res.output
            assert json.loads(res.output)["sha256"] == v2["sha256"]  # the pre-flight saw the genuine artifact
            for d in fleet:
                rec = d.results.get(timeout=60)
                assert rec["kind"] == "model_rejected" and "digest mismatch" in rec["reason"], rec
                assert rec["model_version"] == "v1" and rec["requested_version"] == "v2"
                assert d.runner.version == "v1"
        finally:
            server.shutdown()
            server.server_close()
        for d in fleet:
            d.send(100, {"temperature": 21.0, "rpm": 1200.0})

        def refusals_recorded() -> dict | None:
            rows = {r["device_id"]: r for r in json.loads(
                cli.invoke(models_app, ["status", "--json"]).output)["devices"]}
            ok = all(rows[f"edge-{i}"]["last_rejected_version"] == "v2" for i in range(DEVICES))
            return rows if ok else None

        rows = wait_for("every refusal in device_logs", refusals_recorded, timeout=90, interval=1.0)
        for i in range(DEVICES):
            r = rows[f"edge-{i}"]  # type: ignore[index]
            assert r["running_version"] == "v1" and r["desired_version"] == "v2"
            assert "digest mismatch" in r["last_rejected_reason"] and "s3cr3t" not in r["last_rejected_reason"]
        assert "s3cr3t" not in json.dumps(device_logs(status))
    finally:
        for d in fleet:
            d.close()

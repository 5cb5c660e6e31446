"""The device-side model runner without a broker: downloads over file:// and a real loopback HTTP server,
digest and version checks, refusal keeping the previous model, and the log records it publishes."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iotbridge.edge_model import EdgeModel, Feature, sha256_hex
from iotbridge.ml.runner import FetchError, ModelRunner, fetch, redact


def model(version: str, threshold: float = 2.0) -> EdgeModel:
    return EdgeModel(version=version, features=(Feature("temperature", 20.0, 2.0), Feature("rpm", 1000.0, 100.0)),
                     centroids=((1, (20.0, 1000.0)),), threshold=threshold, contamination=0.01)


class Logs:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def __call__(self, data: bytes) -> None:
        self.records.append(json.loads(data))


def write(tmp_path: Path, m: EdgeModel) -> tuple[str, str]:
    p = tmp_path / f"{m.version}.json"
    p.write_bytes(m.to_bytes())
    return p.as_uri(), sha256_hex(m.to_bytes())


def config(uri: str, version: str, sha: str, **extra) -> bytes:
    return json.dumps({"model": {"uri": uri, "version": version, "sha256": sha}, **extra}).encode()


NOW = float(int(time.time()))  # the runner's injected clock: whole seconds, so its ms timestamps are exact


@pytest.fixture
def runner() -> tuple[ModelRunner, Logs]:
    logs = Logs()
    return ModelRunner("pump-1", logs, clock=lambda: NOW), logs


def test_load_then_infer(runner, tmp_path):
    r, logs = runner
    uri, sha = write(tmp_path, model("v1"))
    rec = r.apply_config(config(uri, "v1", sha))
    assert rec == logs.records[-1]
    assert rec["kind"] == "model_loaded" and rec["model_version"] == "v1" and rec["model_sha256"] == sha
    assert rec["previous_version"] is None and rec["device_id"] == "pump-1" and rec["ts"] == int(NOW) * 1000
    inf = r.observe({"ts": 1, "seq": 7, "metrics": {"temperature": 20.0, "rpm": 1000.0}})
    assert inf == logs.records[-1]
    assert (inf["kind"], inf["model_version"], inf["seq"], inf["anomaly"], inf["cluster"]) == \
        ("inference", "v1", 7, False, 1)
    assert r.observe({"ts": 2, "metrics": {"temperature": 40.0}})["anomaly"] is True  # type: ignore[index]
    assert r.inferences == 2


def test_no_model_no_inference(runner):
    r, logs = runner
    assert r.observe({"ts": 1, "metrics": {"temperature": 1.0}}) is None
    assert logs.records == []


def test_tampered_artifact_refused_previous_kept(runner, tmp_path):
    r, logs = runner
    uri1, sha1 = write(tmp_path, model("v1"))
    r.apply_config(config(uri1, "v1", sha1))
    uri2, sha2 = write(tmp_path, model("v2"))
    Path(uri2.removeprefix("file://")).write_bytes(model("v2", threshold=99.0).to_bytes())  # swapped after digest
    rec = r.apply_config(config(uri2, "v2", sha2))
    assert rec["kind"] == "model_rejected" and "digest mismatch" in rec["reason"]  # type: ignore[index]
    assert rec["model_version"] == "v1" and rec["requested_version"] == "v2"  # type: ignore[index]
    assert r.version == "v1" and r.rejected == 1
    assert r.observe({"ts": 1, "metrics": {"rpm": 1000.0}})["model_version"] == "v1"  # type: ignore[index]


@pytest.mark.parametrize("case", ["missing", "wrong_version", "malformed", "bad_pointer", "gs_uri"])
def test_bad_models_refused(runner, tmp_path, case):
    r, logs = runner
    uri1, sha1 = write(tmp_path, model("v1"))
    r.apply_config(config(uri1, "v1", sha1))
    if case == "missing":
        cfg, why = config((tmp_path / "nope.json").as_uri(), "v2", "0" * 64), "No such file"
    elif case == "wrong_version":
        uri, sha = write(tmp_path, model("v3"))
        cfg, why = config(uri, "v2", sha), "artifact says version 'v3'"
    elif case == "malformed":
        p = tmp_path / "bad.json"
        p.write_bytes(b'{"format": "iotbridge-edge-model"}')
        cfg, why = config(p.as_uri(), "v2", sha256_hex(p.read_bytes())), "format_version"
    elif case == "bad_pointer":
        cfg, why = json.dumps({"model": {"uri": uri1, "version": "v2"}}).encode(), "sha256"
    else:
        cfg, why = config("gs://bucket/edge/v2/model.json", "v2", sha1), "signed https"
    rec = r.apply_config(cfg)
    assert rec["kind"] == "model_rejected" and why in rec["reason"], rec  # type: ignore[index]
    assert r.version == "v1" and logs.records[-1] == rec


def test_same_pointer_is_a_no_op_and_version_is_immutable(runner, tmp_path):
    r, logs = runner
    uri, sha = write(tmp_path, model("v1"))
    assert r.apply_config(config(uri, "v1", sha))["kind"] == "model_loaded"  # type: ignore[index]
    assert r.apply_config(config(uri, "v1", sha, sampling=3)) is None  # redelivered / other keys changed
    other = tmp_path / "other"
    other.mkdir()
    uri2, sha2 = write(other, model("v1", threshold=5.0))
    rec = r.apply_config(config(uri2, "v1", sha2))
    assert rec["kind"] == "model_rejected" and "a version names one artifact" in rec["reason"]  # type: ignore[index]
    assert r.model.threshold == 2.0  # type: ignore[union-attr]


def test_configs_without_model_are_ignored(runner, tmp_path):
    r, logs = runner
    uri, sha = write(tmp_path, model("v1"))
    r.apply_config(config(uri, "v1", sha))
    for cfg in (b"\xff binary", b"[1, 2]", b'{"sampling": 5}', b""):
        assert r.apply_config(cfg) is None
    assert r.version == "v1" and len(logs.records) == 1


def test_upgrade_reports_previous(runner, tmp_path):
    r, _ = runner
    for v in ("v1", "v2"):
        uri, sha = write(tmp_path, model(v))
        rec = r.apply_config(config(uri, v, sha))
    assert rec["previous_version"] == "v1" and rec["model_version"] == "v2"  # type: ignore[index]


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.files
    server.shutdown()
    server.server_close()
    _Handler.files.clear()


def test_http_download_with_signed_url_query_redacted(runner, http_server):
    base, files = http_server
    r, logs = runner
    m = model("v1")
    files["/edge/v1/model.json"] = m.to_bytes()
    signed = f"{base}/edge/v1/model.json?X-Goog-Signature=secretsig&X-Goog-Expires=600"
    assert r.apply_config(config(signed, "v1", sha256_hex(m.to_bytes())))["kind"] == "model_loaded"  # type: ignore[index]
    rec = r.apply_config(config(f"{base}/edge/v2/model.json?X-Goog-Signature=secretsig", "v2", "1" * 64))
    assert rec["kind"] == "model_rejected" and "HTTP 404" in rec["reason"]  # type: ignore[index]
    assert "secretsig" not in json.dumps(logs.records)
    assert r.version == "v1"


def test_fetch_size_cap(tmp_path, http_server):
    base, files = http_server
    files["/big"] = b"x" * 101
    with pytest.raises(FetchError, match="larger than 100"):
        fetch(f"{base}/big", max_bytes=100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(FetchError, match="larger than 100"):
        fetch((tmp_path / "big").as_uri(), max_bytes=100)
    with pytest.raises(FetchError, match="remote host"):
        fetch("file://evil.example/etc/passwd")


def test_redact():
    assert redact("https://storage.googleapis.com/b/o.json?X-Goog-Signature=abc#x") == \
        "https://storage.googleapis.com/b/o.json"


def test_for_device_publishes_to_logs_subfolder(tmp_path):
    sent = []

    class Dev:
        class identity:  # noqa: N801
            device_id = "pump-9"

        def publish_event(self, payload, sub_folder=None, qos=1):
            sent.append((sub_folder, json.loads(payload)))

    r = ModelRunner.for_device(Dev())
    uri, sha = write(tmp_path, model("v1"))
    r.apply_config(config(uri, "v1", sha))
    assert sent[0][0] == "logs" and sent[0][1]["device_id"] == "pump-9"

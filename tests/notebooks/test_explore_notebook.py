"""notebooks/explore.ipynb: committed without outputs, and executed for real against the local BigQuery.

The execution test provisions its own dataset from ``iotbridge.spec`` on the session's local BigQuery, inserts an
hour of realistic telemetry (three active devices, one that went silent 20 minutes ago, one last seen two days
ago), the pipeline's 1-minute windows and rejected messages, then runs every cell in a kernel of this
interpreter (nbclient) with only the environment telling the notebook where BigQuery is. It checks what the
notebook found, not only that it ran: readings and devices in the window, figures drawn, error reasons counted,
and exactly the silent device listed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from iotbridge import spec
from iotbridge.local import provision

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore.ipynb"
PROJECT = "local-project"  # the project the session's local BigQuery serves (tests/conftest.py)
DATASET = "iot_notebook"  # its own dataset: other tests write into the same local BigQuery

ACTIVE = ("pump-001", "pump-002", "fan-003")
SILENT = "valve-004"
GONE = "old-005"  # last seen two days ago: outside the notebook's one-day lookback


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [], f"cell {cell.id} has outputs: strip them before committing"
        assert cell.execution_count is None, f"cell {cell.id} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


# ---------------------------------------------------------------------------------------------- data


def _ts(t: dt.datetime) -> str:
    return t.isoformat()


def _telemetry(now: dt.datetime) -> tuple[list[dict], list[dict]]:
    """Raw rows and the pipeline's 1-minute windows. No reading lies within 5 minutes of the window's edge
    (60 minutes ago), so the notebook starting a little later than ``now`` cannot change what is in the window."""
    raw: list[dict] = []

    def reading(device: str, t: dt.datetime, seq: int, temperature: float, rpm: float) -> None:
        raw.append({
            "device_id": device, "device_num_id": str(1000 + len(raw)), "registry_id": "local-registry",
            "event_time": _ts(t), "publish_time": _ts(t + dt.timedelta(milliseconds=180)),
            "message_id": f"{device}-{seq}", "seq": seq,
            "metrics": [{"name": "temperature", "value": round(temperature, 3)}, {"name": "rpm", "value": rpm}],
        })

    for n, device in enumerate(ACTIVE):
        for i in range(109):  # every 30 s from 55 min ago to 1 min ago
            t = now - dt.timedelta(minutes=55) + dt.timedelta(seconds=30 * i)
            reading(device, t, i, 20 + 3 * n + 2 * math.sin(i / 12), 1200 + 150 * n + (i % 7) * 5)
    minutes_ago = [*range(90, 65, -2), *range(50, 19, -2)]  # gap 65..50: away from the window edge
    for i, m in enumerate(minutes_ago):
        reading(SILENT, now - dt.timedelta(minutes=m), i, 35 + i * 0.1, 900)
    for i in range(5):
        reading(GONE, now - dt.timedelta(days=2, minutes=i), i, 18.0, 0)

    windows: dict[tuple[str, str, dt.datetime], list[float]] = {}
    for row in raw:
        t = dt.datetime.fromisoformat(row["event_time"])
        if row["device_id"] not in ACTIVE:
            continue  # the pipeline's windows for the active devices only: enough to plot
        start = t.replace(second=0, microsecond=0)
        for m in row["metrics"]:
            windows.setdefault((row["device_id"], m["name"], start), []).append(m["value"])
    one_minute = [
        {"device_id": d, "metric": metric, "window_start": _ts(s), "window_end": _ts(s + dt.timedelta(minutes=1)),
         "count": len(v), "min": min(v), "max": max(v), "mean": sum(v) / len(v)}
        for (d, metric, s), v in sorted(windows.items())
    ]
    return raw, one_minute


def _errors(now: dt.datetime) -> list[dict]:
    def err(reason: str, device: str, minutes_ago: float, payload: bytes, detail: str) -> dict:
        return {"error": reason, "detail": detail, "payload": base64.b64encode(payload).decode(),
                "attributes": json.dumps({"deviceId": device}),
                "publish_time": _ts(now - dt.timedelta(minutes=minutes_ago)),
                "message_id": f"err-{reason}-{minutes_ago}", "device_id": device}

    return [
        err("invalid_json", "pump-001", 40, b"{temp: 21", "Expecting property name enclosed in double quotes"),
        err("invalid_json", "pump-001", 30, b"\xff\xfe", "not UTF-8"),
        err("invalid_json", "pump-002", 10, b"[1, 2", "Expecting ',' delimiter"),
        err("missing_ts", "fan-003", 25, b'{"metrics": {"rpm": 1}}', "no ts"),
        err("missing_ts", "fan-003", 15, b'{"metrics": {"rpm": 2}}', "no ts"),
        err("non_numeric_metric", "pump-002", 5, b'{"ts": 1, "metrics": {"rpm": "fast"}}', "rpm is a string"),
        err("old_reason", "pump-001", 180, b"{}", "three hours ago: outside the window"),
    ]


def _insert(client, dataset: str, table: str, rows: list[dict]) -> None:
    for i in range(0, len(rows), 200):
        # The local BigQuery answers a bad row with HTTP 500, which the client would retry for 10 minutes.
        problems = client.insert_rows_json(f"{PROJECT}.{dataset}.{table}", rows[i:i + 200], retry=None, timeout=60)
        assert problems == [], problems


# -------------------------------------------------------------------------------------------- running


def _outputs(nb, cell_id: str) -> tuple[str, list[str], int]:
    """(stdout, text/plain results, number of PNG figures) of one executed cell."""
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    stdout, texts, images = "", [], 0
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stdout":
            stdout += out.text
        elif out.output_type in ("execute_result", "display_data"):
            if "image/png" in out.data:
                images += 1
            if "text/plain" in out.data:
                texts.append(out.data["text/plain"])
    return stdout, texts, images


def _run_notebook(endpoint: str, dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel is this interpreter (the project's .venv), whatever other "python3" kernels are installed.
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (project)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files stay in the test
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("IOT_PROJECT", PROJECT)
    monkeypatch.setenv("IOT_DATASET", dataset)
    for var in ("IOT_WINDOW_MINUTES", "IOT_SILENT_AFTER_MINUTES"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises CellExecutionError
    return nb


def _provision(endpoint: str, dataset: str):
    made = provision.provision_bigquery(provision.LocalNames(project=PROJECT, dataset=dataset), endpoint)
    # provision_bigquery skips a view the local engine rejects; the report needs all of them.
    assert set(spec.VIEWS) <= set(made), f"views the local BigQuery did not accept: {set(spec.VIEWS) - set(made)}"
    return provision.bigquery_client(PROJECT, endpoint)


@pytest.mark.emulator
def test_notebook_runs_against_the_local_bigquery(bigquery_emulator, monkeypatch, tmp_path) -> None:
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    client = _provision(endpoint, DATASET)
    now = dt.datetime.now(dt.UTC)
    raw, one_minute = _telemetry(now)
    _insert(client, DATASET, "telemetry_raw", raw)
    _insert(client, DATASET, "telemetry_1m", one_minute)
    _insert(client, DATASET, "telemetry_errors", _errors(now))

    nb = _run_notebook(endpoint, DATASET, tmp_path, monkeypatch)

    since = now - dt.timedelta(hours=1)
    in_window = [r for r in raw if dt.datetime.fromisoformat(r["event_time"]) >= since]
    readings = sum(len(r["metrics"]) for r in in_window)
    stdout, texts, _ = _outputs(nb, "telemetry")
    assert f"{readings} readings from 4 devices" in stdout
    summary = texts[-1]
    for device in (*ACTIVE, SILENT):
        assert device in summary
    assert GONE not in summary

    _, _, series_figures = _outputs(nb, "series")
    assert series_figures == 1

    stdout, _, means_figures = _outputs(nb, "means")
    assert means_figures == 1
    windows = sum(1 for w in one_minute if dt.datetime.fromisoformat(w["window_start"]) >= since)
    assert f"{windows} windows from the pipeline (telemetry_1m)" in stdout

    _, texts, error_figures = _outputs(nb, "errors")
    assert error_figures == 1
    table = texts[-1]
    assert re.search(r"invalid_json\s+3\s+2\b", table), table  # 3 messages from 2 devices
    assert re.search(r"missing_ts\s+2\s+1\b", table), table
    assert re.search(r"non_numeric_metric\s+1\s+1\b", table), table
    assert "old_reason" not in table

    stdout, texts, _ = _outputs(nb, "silent")
    assert "1 device(s) silent" in stdout
    assert SILENT in texts[-1]
    assert not any(d in texts[-1] for d in (*ACTIVE, GONE))


@pytest.mark.emulator
def test_without_pipeline_windows_the_means_come_from_raw_readings(bigquery_emulator, monkeypatch,
                                                                   tmp_path) -> None:
    """The pipeline not running yet (no telemetry_1m rows, no errors): the notebook still draws 1-minute means."""
    endpoint = bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]
    dataset = f"{DATASET}_raw_only"
    client = _provision(endpoint, dataset)
    now = dt.datetime.now(dt.UTC)
    raw, _ = _telemetry(now)
    _insert(client, dataset, "telemetry_raw", raw)

    nb = _run_notebook(endpoint, dataset, tmp_path, monkeypatch)

    minutes = {(r["device_id"], m["name"], dt.datetime.fromisoformat(r["event_time"]).replace(second=0, microsecond=0))
               for r in raw if dt.datetime.fromisoformat(r["event_time"]) >= now - dt.timedelta(hours=1)
               for m in r["metrics"]}
    stdout, _, means_figures = _outputs(nb, "means")
    assert f"{len(minutes)} windows from telemetry_raw, computed here" in stdout
    assert means_figures == 1
    stdout, _, error_figures = _outputs(nb, "errors")
    assert "no rejected messages in the window" in stdout and error_figures == 0

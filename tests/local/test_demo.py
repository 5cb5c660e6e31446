"""`make demo`, shortened: the whole architecture end to end, nothing lost, every push delivered, a plot, and no
process left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.emulator


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_short_demo_loses_nothing_and_leaves_nothing_behind(tmp_path):
    state = tmp_path / "demo-state"
    proc = subprocess.run(
        [sys.executable, "-m", "iotbridge.demo", "--devices", "5", "--duration", "20", "--rate", "10",
         "--out", str(tmp_path), "--state-dir", str(state), "--drain-timeout", "150"],
        capture_output=True, text=True, timeout=480, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "demo-report.json").read_text())
    for key in ("sent", "bigquery_rows", "bigtable_rows", "error_rows", "duplicates_dropped", "lost",
                "config_pushes", "configs_delivered", "commands_delivered", "duration_s"):
        assert key in report, key
    assert report["lost"] == 0 and report["ok"] is True
    assert report["sent"] == 200 == report["bigquery_rows"] == report["bigtable_rows"]
    assert report["error_rows"] == report["bad_messages_sent"] == 5
    assert report["config_pushes"] >= 2 and report["configs_delivered"] == report["config_pushes"]
    assert report["commands_delivered"] == 1
    # The closed loop: a device ran hot, the pipeline's rule pushed {"fan": "max"}, the device cooled below it.
    assert report["closed_loops"] >= 1
    for loop in report["closed_loop_devices"].values():
        assert loop["hot_before"] > 80 > loop["last"] and loop["last_time"] > loop["config_time"]
    png = (tmp_path / "demo-plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert processes_mentioning(str(state)) == []

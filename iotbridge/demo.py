"""``make demo`` (``python -m iotbridge.demo``): the whole architecture on this machine, end to end.

1. brings the local stack up (emulators, local BigQuery, broker host, config-push function, streaming pipeline);
2. registers and connects a fleet (default 20 devices) and sends telemetry for ``--duration`` seconds, some
   devices drifting past the pipeline's temperature rule so that it asks for config pushes; a few malformed
   messages go in too, to show the errors path;
3. pushes a config to one device the operator's way (config-requests topic → function → MQTT) and sends a
   command to another; the drifting devices that cross the pipeline's rule get ``{"fan": "max"}`` and cool down
   (the closed loop, counted from telemetry_raw as ``closed_loops``);
4. waits until the pipeline has written every accepted message, then counts BigQuery rows, Bigtable rows,
   error rows and the duplicates the pipeline dropped;
5. prints a summary table, writes ``demo-report.json`` and ``demo-plot.png``, and stops everything it started.

Exit status 0 only when nothing was lost and every push and command arrived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from iotbridge.local.provision import bigquery_client
from iotbridge.local.stack import LOCAL_THRESHOLD_RULES, LocalStack
from iotbridge.targets import from_local

console = Console(stderr=True)
# The local pipeline's rule: above 80 °C, {"fan": "max"}; the simulated devices cool at full fan.
RULE = LOCAL_THRESHOLD_RULES["temperature"]


def log(msg: str) -> None:
    console.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


class Audit:
    """A pull subscription on the telemetry topic: every copy of every message the bridge published."""

    def __init__(self, project: str, topic: str, name: str) -> None:
        from google.cloud import pubsub_v1

        self.sub = pubsub_v1.SubscriberClient()
        self.path = self.sub.subscription_path(project, name)
        self.sub.create_subscription(request={"name": self.path, "topic": topic, "ack_deadline_seconds": 60})
        self.copies: Counter[tuple[str, int]] = Counter()
        self.total = 0
        self._lock = threading.Lock()
        self._future = self.sub.subscribe(self.path, self._on_message)

    def _on_message(self, message) -> None:  # noqa: ANN001
        try:
            seq = int(json.loads(message.data)["seq"])
            key = (message.attributes.get("deviceId", ""), seq)
        except (ValueError, KeyError, TypeError):
            key = ("<malformed>", hash(message.data))
        with self._lock:
            self.copies[key] += 1
            self.total += 1
        message.ack()

    def close(self) -> None:
        self._future.cancel()
        with contextlib.suppress(Exception):  # cancelled
            self._future.result(timeout=10)
        self.sub.close()


def scalar(client, sql: str) -> int:
    rows = list(client.query(sql).result(timeout=60))
    return int(rows[0][0]) if rows else 0


def bigtable_row_keys(project: str, instance: str, table: str, prefix: str) -> set[str]:
    from google.cloud import bigtable
    from google.cloud.bigtable.row_set import RowSet

    t = bigtable.Client(project=project, admin=False).instance(instance).table(table)
    rows = RowSet()
    rows.add_row_range_with_prefix(prefix)
    return {r.row_key.decode() for r in t.read_rows(row_set=rows)}


def rule_config_times(versions, rule_config: dict[str, Any]) -> list[datetime]:
    """When the registry stored a config version that is the rule's config (what the pipeline asked for)."""
    out = []
    for v in versions:
        try:
            doc = json.loads(v.data)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc and all(doc.get(k) == val for k, val in rule_config.items()):
            out.append(v.cloud_update_time)
    return sorted(out)


def closed_loops(temperatures: dict[str, list[tuple[datetime, float]]], rule_times: dict[str, list[datetime]],
                 threshold: float) -> dict[str, dict[str, Any]]:
    """Devices whose loop closed, read from the data: telemetry_raw shows the device above ``threshold`` before
    the registry stored its rule-triggered config, and its last reading after that config below the threshold
    again. A device that never got the config, or kept heating, is not counted."""
    out: dict[str, dict[str, Any]] = {}
    for device, times in rule_times.items():
        if not times:
            continue
        pushed = times[0]
        pts = sorted(temperatures.get(device, []))
        before = [v for t, v in pts if t <= pushed]
        after = [(t, v) for t, v in pts if t > pushed]
        if not before or max(before) <= threshold or len(after) < 2:
            continue
        peak = max([before[-1], *(v for _, v in after)])
        last_time, last = after[-1]
        if last < threshold:
            out[device] = {"config_time": pushed.isoformat(), "hot_before": round(max(before), 2),
                           "peak": round(peak, 2), "last": round(last, 2), "last_time": last_time.isoformat()}
    return out


def _x(when: datetime) -> float:
    """``when`` as an x value on the plot's time axis. matplotlib's stubs type ``axvline``'s x as float, but it
    takes any value its units machinery converts, datetimes included (the other calls get them unconverted)."""
    return cast(float, when)


def plot(path: Path, raw: list[dict[str, Any]], means: list[dict[str, Any]], push_time: datetime | None,
         device_ids: list[str], push_target: str = "", rule_pushes: dict[str, list[datetime]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dev in enumerate(device_ids):
        c = colors[i % len(colors)]
        pts = sorted((r["event_time"], r["value"]) for r in raw if r["device_id"] == dev)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9, alpha=0.6, color=c, label=f"{dev} readings")
        mpts = sorted((m["window_start"], m["mean"]) for m in means if m["device_id"] == dev)
        if mpts:
            # A 1-minute mean drawn across its whole window.
            for start, mean in mpts:
                ax.hlines(mean, start, start + timedelta(seconds=60), colors=c, lw=3)
            ax.plot([], [], color=c, lw=3, label=f"{dev} 1-minute mean")
    for i, dev in enumerate(device_ids):
        for when in (rule_pushes or {}).get(dev, []):
            ax.axvline(_x(when), color=colors[i % len(colors)], ls=":", lw=1.2)
            ax.annotate(f'pipeline rule → {{"fan": "max"}} to {dev}: it cools', (when, ax.get_ylim()[0]),
                        xytext=(4, 8), textcoords="offset points", fontsize=8, color=colors[i % len(colors)])
    if push_time is not None:
        ax.axvline(_x(push_time), color="black", ls="--", lw=1.2)
        ax.annotate(f"operator config push to {push_target}", (push_time, ax.get_ylim()[1]), xytext=(4, -14),
                    textcoords="offset points")
    ax.set_title("Telemetry in BigQuery: temperature per device (telemetry_raw) and 1-minute means (telemetry_1m)")
    ax.set_xlabel("event time (UTC)")
    ax.set_ylabel("temperature (°C)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(devices: int, duration: float, rate: float, out_dir: Path, drain_timeout: float,
        state_dir: Path | None = None) -> int:
    from google.cloud import pubsub_v1

    from iotbridge.bridge.fanout import send_command
    from iotbridge.registry import Registry
    from iotbridge.simulate import Fleet
    from iotbridge.spec import config_request

    t_start = time.monotonic()
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="iot-demo-"))
    stack = LocalStack(state_dir)
    report: dict[str, Any] = {}
    ok = False
    audit: Audit | None = None
    fleet: Fleet | None = None
    try:
        log("bringing the local stack up")
        stack.up(progress=lambda m: log(f"  {m}"))
        status = stack.status()
        target = from_local(status)
        if not (target.mqtt_host and target.mqtt_port and target.mqtt_ca_cert):
            raise RuntimeError("the local stack is up without an MQTT endpoint")
        os.environ.update(target.env)
        n = stack.names
        project = n.project
        registry = Registry(project, n.registry_id, n.region)
        publisher = pubsub_v1.PublisherClient()
        audit = Audit(project, n.topic("telemetry"), f"{n.prefix}-demo-audit")
        fleet = Fleet(project=project, region=n.region, registry=registry, host=target.mqtt_host,
                      port=target.mqtt_port, ca_certs=target.mqtt_ca_cert,
                      key_dir=state_dir / "keys", devices=devices, prefix="demo")
        log(f"registering {devices} devices")
        fleet.ensure_registered()
        log("connecting the fleet")
        fleet.connect()
        ids = [m.id for m in fleet.members]
        push_target, command_target = ids[1 % len(ids)], ids[2 % len(ids)]
        pushed_config = {"sampling_interval_s": 5, "note": "set by make demo"}
        events: dict[str, Any] = {}

        def operator() -> None:
            time.sleep(duration / 3)
            events["push_time"] = datetime.now(UTC)
            mid = publisher.publish(n.topic("config-requests"),
                                    config_request(push_target, json.dumps(pushed_config).encode())).result(30)
            events["push_request"] = mid
            log(f"pushed a config to {push_target} (request {mid})")
            time.sleep(duration / 6)
            try:
                events["command"] = send_command(registry, publisher, n.prefix, command_target, b'{"blink": 3}')
                log(f"sent a command to {command_target}")
            except Exception as exc:  # noqa: BLE001 - reported below as not delivered
                events["command_error"] = str(exc)

        op = threading.Thread(target=operator, daemon=True)
        op.start()
        # Malformed telemetry (the pipeline must route it to telemetry_errors, not die).
        bad = [b"not json", b'{"metrics": {"temperature": 20}}', b'{"ts": "yesterday", "metrics": {"t": 1}}',
               b'{"ts": 1764252000000, "metrics": {}}', b'{"ts": 1764252000000, "metrics": {"t": "hot"}}']
        bad_device = fleet.members[-1].device
        for payload in bad:
            bad_device.publish_event(payload).wait_for_publish(10)
        log(f"sending telemetry: {devices} devices, {rate:g} msg/s, {duration:g} s")
        last = [0.0]

        def progress(sent: int, acked: int) -> None:
            if time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                log(f"  sent {sent}, acknowledged {acked}")

        result = fleet.run(rate, duration, progress=progress)
        op.join(timeout=duration)
        log(f"sent {result.sent}, acknowledged by the bridge {result.acknowledged}")

        sent_keys = {(r["device_id"], r["seq"]) for r in result.records}
        bq = bigquery_client(project, str(status["bigquery_endpoint"]))
        table = f"`{project}.{n.dataset}.telemetry_raw`"
        log("waiting for the pipeline to write every message")
        deadline = time.monotonic() + drain_timeout
        rows_keys: set[tuple[str, int]] = set()
        while time.monotonic() < deadline:
            rows = bq.query(f"SELECT device_id, seq FROM {table} WHERE STARTS_WITH(device_id, 'demo-')").result(60)
            rows_keys = {(r["device_id"], int(r["seq"])) for r in rows}
            if sent_keys <= rows_keys:
                break
            log(f"  {len(rows_keys & sent_keys)}/{len(sent_keys)} rows in telemetry_raw")
            time.sleep(2)
        # The 1-minute aggregates: a window is written once the watermark passes its end, up to a minute after
        # its last reading. Wait for every window the fleet's readings fall in (bounded), for the plot and report.
        want_windows = {(r["device_id"], r["ts"] // 60_000 * 60) for r in result.records}
        log(f"waiting for {len(want_windows)} per-device 1-minute windows in telemetry_1m")
        windows: set[tuple[str, int]] = set()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            got = bq.query(f"SELECT DISTINCT device_id, window_start FROM `{project}.{n.dataset}.telemetry_1m` "
                           "WHERE metric = 'temperature' AND STARTS_WITH(device_id, 'demo-')").result(60)
            windows = {(r["device_id"], int(r["window_start"].timestamp())) for r in got}
            if want_windows <= windows:
                break
            log(f"  {len(want_windows & windows)}/{len(want_windows)} windows written")
            time.sleep(5)
        bq_rows = scalar(bq, f"SELECT COUNT(*) FROM {table} WHERE STARTS_WITH(device_id, 'demo-')")
        bt_keys = bigtable_row_keys(project, n.bigtable_instance, "telemetry", "demo-")
        error_rows = scalar(bq, f"SELECT COUNT(*) FROM `{project}.{n.dataset}.telemetry_errors`")
        # Configs: every version stored for the fleet (operator and pipeline rule) and whether the device has it.
        # Configs arrive on the devices' own threads: poll with a deadline.
        pushes, delivered = 0, 0
        wait_until = time.monotonic() + 30
        while True:
            pushes, delivered = 0, 0
            for m in fleet.members:
                # Version 1 is every device's empty first config, not a push.
                versions = [v for v in registry.list_config_versions(m.id) if v.version > 1]
                pushes += len(versions)
                got = set(m.configs)
                delivered += sum(1 for v in versions if v.data in got)
            if delivered >= pushes or time.monotonic() > wait_until:
                break
            time.sleep(0.5)
        push_configs = fleet.members[ids.index(push_target)].configs
        operator_push_arrived = any(json.loads(c) == pushed_config for c in push_configs if c.startswith(b"{"))
        fleet.drain_commands()
        commands_delivered = sum(len(m.commands) for m in fleet.members)
        lost = len(sent_keys - rows_keys)
        report = {
            "sent": result.sent, "acknowledged_by_bridge": result.acknowledged, "bad_messages_sent": len(bad),
            "bigquery_rows": bq_rows, "bigtable_rows": len(bt_keys), "error_rows": error_rows,
            "duplicates_dropped": audit.total - len(audit.copies), "lost": lost, "config_pushes": pushes,
            "configs_delivered": delivered, "operator_config_arrived": operator_push_arrived,
            "commands_sent": 1 if "command" in events else 0, "commands_delivered": commands_delivered,
            "aggregate_windows": len(want_windows & windows), "aggregate_windows_expected": len(want_windows),
            "devices": devices, "rate_msg_s": rate, "duration_s": round(time.monotonic() - t_start, 1),
        }
        ok = (lost == 0 and bq_rows == len(sent_keys) and len(bt_keys) == len(sent_keys)
              and delivered == pushes and operator_push_arrived and commands_delivered >= 1
              and error_rows == len(bad))
        # Versions the pipeline's threshold rule asked for (LOCAL_THRESHOLD_RULES: "fan": "max" above 80 °C), and
        # the loops they closed, counted from telemetry_raw: hot before the config, cooled below the limit after.
        rule_pushes = {dev: rule_config_times(registry.list_config_versions(dev), RULE["config"]) for dev in ids}
        temps: dict[str, list[tuple[datetime, float]]] = {}
        for r in temperature_rows(bq, table, [d for d, t in rule_pushes.items() if t]):
            temps.setdefault(r["device_id"], []).append((r["event_time"], float(r["value"])))
        loops = closed_loops(temps, rule_pushes, RULE["above"])
        report["closed_loops"] = len(loops)
        report["closed_loop_devices"] = loops
        ok = ok and len(loops) >= 1
        # The plot: a device whose loop closed first, then the others.
        shown = ([d for d in ids if d in loops][:1] + [d for d in ids if d not in loops])[: min(4, len(ids))]
        raw = temperature_rows(bq, table, shown)
        means = [dict(r) for r in bq.query(
            f"SELECT device_id, window_start, SUM(mean * `count`) / SUM(`count`) AS mean "
            f"FROM `{project}.{n.dataset}.telemetry_1m` WHERE metric = 'temperature' AND device_id IN UNNEST(@ids) "
            f"GROUP BY device_id, window_start", job_config=_ids_param(shown)).result(60)]
        plot(out_dir / "demo-plot.png", raw, means, events.get("push_time"), shown, push_target,
             {d: rule_pushes.get(d, []) for d in shown})
    finally:
        if fleet is not None:
            fleet.close()
        if audit is not None:
            audit.close()
        log("stopping the local stack")
        stopped = stack.down()
        log(f"  stopped {len(stopped)} processes")
    report["duration_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = ok
    (out_dir / "demo-report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = Table(title="make demo")
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    for k, v in report.items():
        summary.add_row(k, str(v))
    Console().print(summary)
    log(f"wrote {out_dir / 'demo-report.json'} and {out_dir / 'demo-plot.png'}")
    return 0 if ok else 1


def temperature_rows(bq, table: str, ids: list[str]) -> list[dict[str, Any]]:
    """Every temperature reading of ``ids`` in telemetry_raw: device_id, event_time, value."""
    return [dict(r) for r in bq.query(
        f"SELECT device_id, event_time, m.value AS value FROM {table}, UNNEST(metrics) AS m "
        f"WHERE m.name = 'temperature' AND device_id IN UNNEST(@ids)", job_config=_ids_param(ids)).result(60)]


def _ids_param(ids: list[str]):
    from google.cloud import bigquery

    return bigquery.QueryJobConfig(query_parameters=[bigquery.ArrayQueryParameter("ids", "STRING", ids)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iotbridge.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of telemetry")
    p.add_argument("--rate", type=float, default=20.0, help="messages per second, whole fleet")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for demo-report.json and demo-plot.png")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="seconds to wait for the pipeline to write every message (and every 1-minute window)")
    p.add_argument("--state-dir", type=Path, help="where the demo's local stack keeps its state and logs "
                                                  "(default: a new temporary folder)")
    a = p.parse_args(argv)
    if a.devices < 3:
        p.error("--devices must be at least 3 (one gets a config, one a command)")
    a.out.mkdir(parents=True, exist_ok=True)
    return run(a.devices, a.duration, a.rate, a.out, a.drain_timeout, a.state_dir)


if __name__ == "__main__":
    sys.exit(main())

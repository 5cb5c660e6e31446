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
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console
from rich.table import Table

from iotbridge.local.provision import LocalNames, bigquery_client
from iotbridge.local.stack import LOCAL_THRESHOLD_RULES, LocalStack, StackStatus
from iotbridge.targets import Target, from_local

if TYPE_CHECKING:
    from google.cloud import bigquery
    from google.cloud.pubsub_v1 import PublisherClient

    from iotbridge.registry import Registry
    from iotbridge.simulate import Fleet, FleetResult

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


# (device id, seq) of a message, or (device id, window start) of a 1-minute aggregate.
Keys = set[tuple[str, int]]
# Malformed telemetry: the pipeline must route it to telemetry_errors, not die.
BAD_MESSAGES = [b"not json", b'{"metrics": {"temperature": 20}}', b'{"ts": "yesterday", "metrics": {"t": 1}}',
                b'{"ts": 1764252000000, "metrics": {}}', b'{"ts": 1764252000000, "metrics": {"t": "hot"}}']
# What the operator pushes to one device, the operator's way (config-requests topic -> function -> MQTT).
OPERATOR_CONFIG = {"sampling_interval_s": 5, "note": "set by make demo"}


def run(devices: int, duration: float, rate: float, out_dir: Path, drain_timeout: float,
        state_dir: Path | None = None) -> int:
    """The demo, phase by phase; the local stack, the fleet and the audit subscription are stopped whatever
    happens. Returns the exit status: 0 only when every figure is as it should be."""
    from google.cloud import pubsub_v1

    from iotbridge.registry import Registry
    from iotbridge.simulate import Fleet

    t_start = time.monotonic()
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="iot-demo-"))
    stack = LocalStack(state_dir)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_stack, stack)  # last: after the fleet and the audit subscription
        status, target = start_stack(stack)
        n = stack.names
        registry = Registry(n.project, n.registry_id, n.region)
        publisher = pubsub_v1.PublisherClient()
        audit = Audit(n.project, n.topic("telemetry"), f"{n.prefix}-demo-audit")
        cleanup.callback(audit.close)
        fleet = Fleet(project=n.project, region=n.region, registry=registry, host=target.mqtt_host or "",
                      port=target.mqtt_port or 0, ca_certs=target.mqtt_ca_cert,
                      key_dir=state_dir / "keys", devices=devices, prefix="demo")
        cleanup.callback(fleet.close)
        connect_fleet(fleet, devices)
        ids = [m.id for m in fleet.members]
        push_target, command_target = ids[1 % len(ids)], ids[2 % len(ids)]
        events: dict[str, Any] = {}
        operator = start_operator(publisher, registry, n, push_target, command_target, duration, events)
        send_malformed(fleet)
        result = send_telemetry(fleet, rate, duration)
        operator.join(timeout=duration)
        log(f"sent {result.sent}, acknowledged by the bridge {result.acknowledged}")

        sent_keys = {(r["device_id"], r["seq"]) for r in result.records}
        bq = bigquery_client(n.project, str(status["bigquery_endpoint"]))
        table = f"`{n.project}.{n.dataset}.telemetry_raw`"
        rows_keys = wait_for_rows(bq, table, sent_keys, drain_timeout)
        want_windows = {(r["device_id"], r["ts"] // 60_000 * 60) for r in result.records}
        windows = wait_for_windows(bq, f"`{n.project}.{n.dataset}.telemetry_1m`", want_windows, drain_timeout)
        c = count_arrivals(bq, n, fleet, registry, push_target)
        lost = len(sent_keys - rows_keys)
        report: dict[str, Any] = {
            "sent": result.sent, "acknowledged_by_bridge": result.acknowledged, "bad_messages_sent": len(BAD_MESSAGES),
            "bigquery_rows": c["bigquery_rows"], "bigtable_rows": c["bigtable_rows"], "error_rows": c["error_rows"],
            "duplicates_dropped": audit.total - len(audit.copies), "lost": lost, "config_pushes": c["config_pushes"],
            "configs_delivered": c["configs_delivered"], "operator_config_arrived": c["operator_config_arrived"],
            "commands_sent": 1 if "command" in events else 0, "commands_delivered": c["commands_delivered"],
            "aggregate_windows": len(want_windows & windows), "aggregate_windows_expected": len(want_windows),
            "devices": devices, "rate_msg_s": rate, "duration_s": round(time.monotonic() - t_start, 1),
        }
        ok = (lost == 0 and c["bigquery_rows"] == len(sent_keys) == c["bigtable_rows"]
              and c["configs_delivered"] == c["config_pushes"] and c["operator_config_arrived"]
              and c["commands_delivered"] >= 1 and c["error_rows"] == len(BAD_MESSAGES))
        rule_pushes, loops = find_closed_loops(bq, table, registry, ids)
        report["closed_loops"] = len(loops)
        report["closed_loop_devices"] = loops
        ok = ok and len(loops) >= 1
        plot_demo(out_dir / "demo-plot.png", bq, table, f"`{n.project}.{n.dataset}.telemetry_1m`", ids, loops,
                  rule_pushes, events.get("push_time"), push_target)
    report["duration_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = ok
    write_report(out_dir, report)
    return 0 if ok else 1


def start_stack(stack: LocalStack) -> tuple[StackStatus, Target]:
    """The whole local stack up; its endpoints' environment applied to this process."""
    log("bringing the local stack up")
    stack.up(progress=lambda m: log(f"  {m}"))
    status = stack.status()
    target = from_local(status)
    if not (target.mqtt_host and target.mqtt_port and target.mqtt_ca_cert):
        raise RuntimeError("the local stack is up without an MQTT endpoint")
    os.environ.update(target.env)
    return status, target


def stop_stack(stack: LocalStack) -> None:
    """Whatever happened: every process the demo started is stopped."""
    log("stopping the local stack")
    stopped = stack.down()
    log(f"  stopped {len(stopped)} processes")


def connect_fleet(fleet: Fleet, devices: int) -> None:
    """The fleet's devices registered (keys made on first use) and connected over MQTT/TLS."""
    log(f"registering {devices} devices")
    fleet.ensure_registered()
    log("connecting the fleet")
    fleet.connect()


def start_operator(publisher: PublisherClient, registry: Registry, names: LocalNames, push_target: str,
                   command_target: str, duration: float, events: dict[str, Any]) -> threading.Thread:
    """A third of the way in, the operator pushes a config to ``push_target``
    through the config-requests topic; a sixth later, sends ``command_target`` a command. What happened, and
    when, goes into ``events``."""
    from iotbridge.bridge.fanout import send_command
    from iotbridge.cli import config_request

    def operator() -> None:
        time.sleep(duration / 3)
        events["push_time"] = datetime.now(UTC)
        mid = publisher.publish(names.topic("config-requests"),
                                config_request(push_target, json.dumps(OPERATOR_CONFIG).encode(), 0)).result(30)
        events["push_request"] = mid
        log(f"pushed a config to {push_target} (request {mid})")
        time.sleep(duration / 6)
        try:
            events["command"] = send_command(registry, publisher, names.prefix, command_target, b'{"blink": 3}')
            log(f"sent a command to {command_target}")
        except Exception as exc:  # noqa: BLE001 - reported below as not delivered
            events["command_error"] = str(exc)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    return thread


def send_malformed(fleet: Fleet) -> None:
    """The last device publishes BAD_MESSAGES, which the pipeline must write to telemetry_errors."""
    bad_device = fleet.members[-1].device
    for payload in BAD_MESSAGES:
        bad_device.publish_event(payload).wait_for_publish(10)


def send_telemetry(fleet: Fleet, rate: float, duration: float) -> FleetResult:
    """The fleet's telemetry, ``rate`` messages per second for ``duration`` seconds, QoS 1."""
    log(f"sending telemetry: {len(fleet.members)} devices, {rate:g} msg/s, {duration:g} s")
    last = [0.0]

    def progress(sent: int, acked: int) -> None:
        if time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            log(f"  sent {sent}, acknowledged {acked}")

    return fleet.run(rate, duration, progress=progress)


def wait_for_rows(bq: bigquery.Client, table: str, sent_keys: Keys, timeout: float) -> Keys:
    """Until telemetry_raw holds every message sent (at most ``timeout`` s); the (device, seq) it
    holds."""
    log("waiting for the pipeline to write every message")
    deadline = time.monotonic() + timeout
    rows_keys: Keys = set()
    while time.monotonic() < deadline:
        rows = bq.query(f"SELECT device_id, seq FROM {table} WHERE STARTS_WITH(device_id, 'demo-')").result(60)
        rows_keys = {(r["device_id"], int(r["seq"])) for r in rows}
        if sent_keys <= rows_keys:
            break
        log(f"  {len(rows_keys & sent_keys)}/{len(sent_keys)} rows in telemetry_raw")
        time.sleep(2)
    return rows_keys


def wait_for_windows(bq: bigquery.Client, table_1m: str, want: Keys, timeout: float) -> Keys:
    """The 1-minute aggregates. A window is written once the watermark passes its end, up to a minute
    after its last reading: wait (at most ``timeout`` s) for every window the fleet's readings fall in."""
    log(f"waiting for {len(want)} per-device 1-minute windows in telemetry_1m")
    windows: Keys = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = bq.query(f"SELECT DISTINCT device_id, window_start FROM {table_1m} "
                       "WHERE metric = 'temperature' AND STARTS_WITH(device_id, 'demo-')").result(60)
        windows = {(r["device_id"], int(r["window_start"].timestamp())) for r in got}
        if want <= windows:
            break
        log(f"  {len(want & windows)}/{len(want)} windows written")
        time.sleep(5)
    return windows


def wait_for_configs(fleet: Fleet, registry: Registry, timeout: float = 30.0) -> tuple[int, int]:
    """Every config version stored for the fleet (the operator's and the pipeline rule's) and how many
    of them reached their device. Configs arrive on the devices' own threads: polled up to ``timeout`` s."""
    wait_until = time.monotonic() + timeout
    while True:
        pushes, delivered = 0, 0
        for m in fleet.members:
            versions = registry.list_config_versions(m.id)
            pushes += len(versions)
            got = set(m.configs)
            delivered += sum(1 for v in versions if v.data in got)
        if delivered >= pushes or time.monotonic() > wait_until:
            return pushes, delivered
        time.sleep(0.5)


def count_arrivals(bq: bigquery.Client, names: LocalNames, fleet: Fleet, registry: Registry,
                   push_target: str) -> dict[str, Any]:
    """What arrived where: the fleet's rows in BigQuery and Bigtable, the error rows, the config versions
    stored for the fleet and how many reached their device, whether the operator's config did, the commands."""
    raw = f"`{names.project}.{names.dataset}.telemetry_raw`"
    bigquery_rows = scalar(bq, f"SELECT COUNT(*) FROM {raw} WHERE STARTS_WITH(device_id, 'demo-')")
    bigtable_rows = len(bigtable_row_keys(names.project, names.bigtable_instance, "telemetry", "demo-"))
    error_rows = scalar(bq, f"SELECT COUNT(*) FROM `{names.project}.{names.dataset}.telemetry_errors`")
    pushes, delivered = wait_for_configs(fleet, registry)
    push_configs = next(m for m in fleet.members if m.id == push_target).configs
    operator_config_arrived = any(json.loads(c) == OPERATOR_CONFIG for c in push_configs if c.startswith(b"{"))
    fleet.drain_commands()
    return {"bigquery_rows": bigquery_rows, "bigtable_rows": bigtable_rows, "error_rows": error_rows,
            "config_pushes": pushes, "configs_delivered": delivered, "operator_config_arrived": operator_config_arrived,
            "commands_delivered": sum(len(m.commands) for m in fleet.members)}


def find_closed_loops(bq: bigquery.Client, table: str, registry: Registry, ids: list[str]
                      ) -> tuple[dict[str, list[datetime]], dict[str, dict[str, Any]]]:
    """The versions the pipeline's threshold rule asked for (LOCAL_THRESHOLD_RULES: "fan": "max" above
    80 °C), per device, and the loops they closed, counted from telemetry_raw: hot before the config, cooled below
    the limit after."""
    rule_pushes = {dev: rule_config_times(registry.list_config_versions(dev), RULE["config"]) for dev in ids}
    temps: dict[str, list[tuple[datetime, float]]] = {}
    for r in temperature_rows(bq, table, [d for d, t in rule_pushes.items() if t]):
        temps.setdefault(r["device_id"], []).append((r["event_time"], float(r["value"])))
    return rule_pushes, closed_loops(temps, rule_pushes, RULE["above"])


def plot_demo(path: Path, bq: bigquery.Client, table: str, table_1m: str, ids: list[str], loops: dict[str, Any],
              rule_pushes: dict[str, list[datetime]], push_time: datetime | None, push_target: str) -> None:
    """``demo-plot.png``, four devices at most: a device whose loop closed first, then the others."""
    shown = ([d for d in ids if d in loops][:1] + [d for d in ids if d not in loops])[: min(4, len(ids))]
    raw = temperature_rows(bq, table, shown)
    means = [dict(r) for r in bq.query(
        f"SELECT device_id, window_start, SUM(mean * `count`) / SUM(`count`) AS mean "
        f"FROM {table_1m} WHERE metric = 'temperature' AND device_id IN UNNEST(@ids) "
        f"GROUP BY device_id, window_start", job_config=_ids_param(shown)).result(60)]
    plot(path, raw, means, push_time, shown, push_target, {d: rule_pushes.get(d, []) for d in shown})


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """``demo-report.json`` and the summary table."""
    (out_dir / "demo-report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = Table(title="make demo")
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    for k, v in report.items():
        summary.add_row(k, str(v))
    Console().print(summary)
    log(f"wrote {out_dir / 'demo-report.json'} and {out_dir / 'demo-plot.png'}")


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

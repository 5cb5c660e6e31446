"""What a fleet needs: broker hosts, Dataflow workers, Bigtable nodes, BigQuery volume, registry traffic.

Inputs: the fleet (devices, messages per second per device, payload size), the stack's config
(``Pulumi.<stack>.yaml``: region, machine types, Bigtable shape and retention, table expiration) and the bench's
per-host figures from its committed reference run (``bench/reference/results.json``). docs/capacity.md gives the
model; every constant below is named there with the reason for its value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iotbridge import spec
from iotbridge.bridge.settings import EVENTS_MAX_BYTES
from iotbridge.planning import host_sizing

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "bench" / "reference" / "results.json"

HOURS_PER_MONTH = 730  # Google's billing month
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
DAYS_PER_MONTH = HOURS_PER_MONTH / 24
GIB = 2**30

# Hosts, workers and nodes are planned at half of what was measured: the bench's latency figures are at 50% of
# the maximum rate, and a host must absorb a peer's devices when one restarts.
PLANNED_UTILIZATION = 0.5
KEEPALIVE_S = 60  # the device SDK's keep-alive; IoT Core devices commonly use 60 s too
# A device's session lasts its token's lifetime (the front ends it at the JWT's exp), then it reconnects: the device
# SDK's default token lifetime (iotbridge/device.py; tests/test_planning.py holds them equal).
SESSION_S = 3600

# Bytes on the wire per device message (MQTT PUBLISH QoS 1 with a /devices/{20-char id}/events topic: 2 + 2 + 31
# + 2 bytes of MQTT, a TLS 1.3 record's 22 bytes, 52 bytes of TCP/IP headers) and per reply (PUBACK or PINGRESP:
# 4 or 2 bytes of MQTT, the same TLS and TCP/IP overhead).
MQTT_IN_OVERHEAD = 2 + 2 + 31 + 2 + 22 + 52
PUBACK_OUT = 4 + 22 + 52
PING_BYTES = 2 + 22 + 52

# Pub/Sub bills data + attributes + 20 bytes of publish time + the message id (16 bytes here). The attribute values
# of a 20-character device id, a 19-digit numeric id, a 20-character registry and project, a region name:
ATTRIBUTE_VALUE_BYTES = 20 + 19 + 20 + 12 + 20
# A device's own message; one a gateway publishes for a bound device also carries gatewayId and its value.
DEVICE_ATTRIBUTES = tuple(a for a in spec.ATTRIBUTES if a != "gatewayId")
PUBSUB_OVERHEAD = sum(len(a) for a in DEVICE_ATTRIBUTES) + ATTRIBUTE_VALUE_BYTES + 20 + 16

# BigQuery logical bytes (STRING and BYTES: 2 + length; INT64, FLOAT64, TIMESTAMP: 8) of a telemetry_raw row
# without its payload and metrics: ids 22 + 21 + 22, sub_folder 2, two timestamps 16, message id 18, seq 8,
# extra 2, profile 14, event_time_source 9, the payload column's 2. Each metric: a 10-character name + 8.
RAW_ROW_FIXED = 22 + 21 + 22 + 2 + 16 + 18 + 8 + 2 + 14 + 9 + 2
RAW_ROW_PER_METRIC = 2 + 10 + 8
AGG_ROW = 22 + 12 + 8 * 6 + 9  # telemetry_1m: device, metric, 2 timestamps + 4 numbers, pane_timing
STREAMING_INSERT_MIN_ROW = 1024  # legacy streaming inserts bill each row as at least 1 KiB

# Bigtable: one row per message; a cell per metric and ~6 attribute cells, each storing the row key (45 bytes),
# family (1), qualifier (~12), timestamp (8) and value (~10): uncompressed, so an upper bound.
BIGTABLE_ATTRIBUTE_CELLS = 6
BIGTABLE_CELL_BYTES = 45 + 1 + 12 + 8 + 10
# Rows per second one node writes (1 KB rows), and the storage one node may hold.
BIGTABLE_WRITES_PER_NODE = {"SSD": 14_000, "HDD": 10_000}
BIGTABLE_TIB_PER_NODE = {"SSD": 5, "HDD": 16}

# Streaming Engine: the message read from Pub/Sub, and per metric one keyed element to the 1-minute aggregation.
STREAMING_ENGINE_BYTES_PER_METRIC = 48
DATAFLOW_WORKER_DISK_GIB = 30  # a Streaming Engine worker's boot disk
BROKER_DISK_GIB = 20  # gcp_iot_bridge/infra/broker.py: pd-balanced, 20 GB

# The config-push function (gcp_iot_bridge/infra/config_push.py: 256 MiB, which Cloud Run functions give 1/6 vCPU).
FUNCTION_MEMORY_GIB = 0.25
FUNCTION_VCPU = 1 / 6

# Pulumi.yaml defaults of the keys planning reads (tests/test_planning.py holds them equal to StackConfig's).
STACK_DEFAULTS: dict[str, Any] = {
    "broker_min_hosts": 2,
    "broker_max_hosts": 10,
    "broker_machine_type": "e2-standard-2",
    "broker_device_auth": "front",
    "pipeline_max_workers": 3,
    "pipeline_machine_type": "n2-standard-2",
    "bigtable_storage_type": "SSD",
    "bigtable_min_nodes": 1,
    "bigtable_max_nodes": 3,
    "bigtable_cpu_target": 60,
    "bigtable_gc_max_age_days": 30,
    "bigquery_table_expiration_days": 0,
}
_CAMEL = {k: re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k) for k in STACK_DEFAULTS}


class PlanningError(ValueError):
    """Bad input or a missing figure; the message is one line."""


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PlanningError(f"{name}={value!r}: expected an integer {low}..{high}")
    try:
        n = int(value)
    except ValueError:
        raise PlanningError(f"{name}={value!r}: expected an integer {low}..{high}") from None
    if not low <= n <= high:
        raise PlanningError(f"{name}={n}: expected an integer {low}..{high}")
    return n


@dataclass(frozen=True)
class Fleet:
    devices: int
    rate: float  # messages per second, per device
    payload_bytes: int = 100
    metrics_per_message: int = 2
    config_pushes_per_device_day: float = 0.0

    def __post_init__(self) -> None:
        _int("--devices", self.devices, 1, 100_000_000)
        if not (isinstance(self.rate, int | float) and math.isfinite(self.rate) and 0 < self.rate <= 100):
            raise PlanningError(f"--rate={self.rate}: expected messages per second per device, > 0 and <= 100 "
                                "(the bridge's per-device limit)")
        _int("--payload-bytes", self.payload_bytes, 1, EVENTS_MAX_BYTES)
        _int("--metrics", self.metrics_per_message, 0, 1000)
        if not (math.isfinite(self.config_pushes_per_device_day) and self.config_pushes_per_device_day >= 0):
            raise PlanningError(f"--pushes-per-day={self.config_pushes_per_device_day}: expected >= 0")

    @classmethod
    def parse(cls, devices: str, rate: str, payload_bytes: str = "100", metrics: str = "2",
              pushes: str = "0") -> Fleet:
        """A fleet from command-line text; a bad value raises PlanningError naming the option."""
        def number(name: str, text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                raise PlanningError(f"{name}={text!r}: not a number") from None
            if not math.isfinite(value):
                raise PlanningError(f"{name}={text!r}: not a finite number")
            return value

        def integer(name: str, text: str) -> int:
            value = number(name, text)
            if value != int(value):
                raise PlanningError(f"{name}={text!r}: expected a whole number")
            return int(value)

        return cls(integer("--devices", devices), number("--rate", rate), integer("--payload-bytes", payload_bytes),
                   integer("--metrics", metrics), number("--pushes-per-day", pushes))

    @property
    def messages_per_s(self) -> float:
        return self.devices * self.rate

    @property
    def messages_per_month(self) -> float:
        return self.messages_per_s * SECONDS_PER_MONTH


@dataclass(frozen=True)
class StackShape:
    """What planning reads of a stack's config."""

    name: str
    region: str
    bigquery_location: str
    bigtable_clusters: int
    broker_min_hosts: int
    broker_max_hosts: int
    broker_machine_type: str
    broker_device_auth: str  # who authenticates devices on the hosts: "front" or "mosquitto" (host_sizing)
    pipeline_max_workers: int
    pipeline_machine_type: str
    bigtable_storage_type: str
    bigtable_min_nodes: int
    bigtable_max_nodes: int
    bigtable_cpu_target: int
    bigtable_gc_max_age_days: int
    bigquery_table_expiration_days: int


def read_stack(path: Path) -> StackShape:
    """The planning-relevant keys of ``Pulumi.<stack>.yaml``, with Pulumi.yaml's defaults for those not set."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PlanningError(f"cannot read stack config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanningError(f"stack config {path} is not YAML: {str(exc).splitlines()[0]}") from None
    config = (doc or {}).get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise PlanningError(f"stack config {path} has no config: mapping")

    def get(key: str, default: object = None) -> object:
        return config.get(f"gcp-iot-bridge:{key}", default)

    region = config.get("gcp:region")
    if not isinstance(region, str) or not region:
        raise PlanningError(f"stack config {path}: gcp:region is not set")
    zones = get("bigtableZones", [])
    if not isinstance(zones, list) or not zones:
        raise PlanningError(f"stack config {path}: gcp-iot-bridge:bigtableZones is not a list of zones")
    values: dict[str, Any] = {}
    fixed = get("brokerHosts")  # deprecated: a fixed count, read as equal bounds
    for key, default in STACK_DEFAULTS.items():
        raw = get(_CAMEL[key], default)
        if isinstance(default, int):
            values[key] = _int(f"gcp-iot-bridge:{_CAMEL[key]}", raw, 0, 1_000_000)
        else:
            values[key] = str(raw)
    if fixed is not None:
        values["broker_min_hosts"] = values["broker_max_hosts"] = _int("gcp-iot-bridge:brokerHosts", fixed, 1,
                                                                       1_000_000)
    if values["broker_device_auth"] not in spec.DEVICE_AUTH_MODES:
        raise PlanningError(f"gcp-iot-bridge:brokerDeviceAuth={values['broker_device_auth']}: expected "
                            f"{' or '.join(spec.DEVICE_AUTH_MODES)}")
    if values["bigtable_storage_type"] not in BIGTABLE_WRITES_PER_NODE:
        raise PlanningError(f"gcp-iot-bridge:bigtableStorageType={values['bigtable_storage_type']}: expected SSD "
                            "or HDD")
    return StackShape(name=path.stem.removeprefix("Pulumi."), region=region,
                      bigquery_location=str(get("bigqueryLocation", "US")), bigtable_clusters=len(zones), **values)


@dataclass(frozen=True)
class HostFigures:
    """The bench's per-host figures, from one reference run."""

    cores: int  # of the machine the reference ran on (shared by the load, the emulators and the host)
    qos1_msgs_per_s: float  # one host, QoS 1, mosquitto_pub devices, device → Pub/Sub
    connections_held: int  # idle authenticated connections one host held
    connections_per_s: float  # new authenticated connections per second
    memory_per_connection_kib: float
    pipeline_us_per_msg: float  # CPU of the pipeline's parse DoFn and row building per message
    config_push_ms: float  # request → device p50 of a config push (bounds the function's billed time)
    # Fan-out (bench fanout section), hosts -> messages per host per config or command: what each host's filtered
    # subscription kept (its devices' share), and what the emulator's unfiltered one handed it (the broadcast cost).
    fanout_kept_per_host: dict[int, float]
    fanout_received_unfiltered: dict[int, float]
    source: str

    @property
    def fanout_deliveries_per_message(self) -> float:
        """Deliveries per config or command summed over the hosts (kept per host x hosts), averaged over the host
        counts measured: 1.0 when each message reaches only the host that holds its device."""
        return sum(kept * hosts for hosts, kept in self.fanout_kept_per_host.items()) / len(self.fanout_kept_per_host)


_FIGURES = {
    "qos1_msgs_per_s": ("bridge", "bridge QoS 1, 1 host, C devices"),
    "connections_held": ("connections", "idle authenticated connections held, 1 host"),
    "connections_per_s": ("connections", "connection rate (TLS + JWT + registry)"),
    "memory_per_connection_kib": ("connections", "memory per connection (front + Mosquitto RSS)"),
    "pipeline_us_per_msg": ("pipeline", "ParseTelemetry DoFn + rows"),
    "config_push_ms": ("config_push", "request→device p50 (fanout)"),
}


_FANOUT_KEPT = re.compile(r"messages kept per host per config or command, (\d+) hosts")
_FANOUT_RECEIVED = re.compile(r"messages received per host per config or command, (\d+) hosts, unfiltered")


def _fanout(figures: list[dict[str, Any]], pattern: re.Pattern[str]) -> dict[int, float]:
    out = {}
    for f in figures:
        m = pattern.fullmatch(str(f.get("name", "")))
        value = f.get("value")
        if f.get("section") == "fanout" and m and isinstance(value, int | float) and value > 0:
            out[int(m.group(1))] = float(value)
    return out


def read_reference(path: Path = REFERENCE) -> HostFigures:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PlanningError(f"no bench reference run at {path} ({exc.strerror}); run `make bench` and copy "
                            "bench/results.json there") from None
    except ValueError:
        raise PlanningError(f"bench reference {path} is not JSON") from None
    by_name = {(f.get("section"), f.get("name")): f.get("value") for f in data.get("figures", [])}
    values: dict[str, Any] = {}
    for attr, key in _FIGURES.items():
        value = by_name.get(key)
        if not isinstance(value, int | float) or value <= 0:
            raise PlanningError(f"bench reference {path} has no figure {key[1]!r} (section {key[0]})")
        values[attr] = value
    kept = _fanout(data.get("figures", []), _FANOUT_KEPT)
    received = _fanout(data.get("figures", []), _FANOUT_RECEIVED)
    if not kept or not received:
        raise PlanningError(f"bench reference {path} has no fan-out figures (section fanout: messages kept and "
                            "received per host per config or command); run `python -m bench fanout`")
    cores = (data.get("machine") or {}).get("cores")
    if not isinstance(cores, int) or cores < 1:
        raise PlanningError(f"bench reference {path} does not say how many cores it ran on")
    return HostFigures(cores=cores, connections_held=int(values.pop("connections_held")), source=str(path),
                       fanout_kept_per_host=kept, fanout_received_unfiltered=received, **values)


def machine_shape(machine_type: str) -> tuple[int, float]:
    """(vCPUs, memory GiB) of a predefined Compute Engine machine type of the general-purpose families."""
    m = re.fullmatch(r"(e2|n1|n2|n2d|n4|c3|c3d|c4)-(standard|highmem|highcpu)-(\d+)", machine_type)
    if not m:
        raise PlanningError(f"machine type {machine_type}: planning knows the standard, highmem and highcpu types "
                            "of e2, n1, n2, n2d, n4, c3, c3d and c4")
    family, kind, n = m.group(1), m.group(2), int(m.group(3))
    per_vcpu = {"standard": 3.75 if family == "n1" else 4.0, "highmem": 6.5 if family == "n1" else 8.0,
                "highcpu": 0.9 if family == "n1" else (1.0 if family == "e2" else 2.0)}[kind]
    return n, n * per_vcpu


@dataclass
class Capacity:
    fleet: Fleet
    stack: StackShape
    figures: HostFigures
    messages_per_s: float
    # Broker hosts
    host_msgs_per_s: float  # planned capacity of one host (measured max x vCPU share x utilization)
    hosts_for_rate: int
    devices_per_host: int  # connected devices one host of the stack's machine type is kept at (host_sizing)
    hosts_for_connections: int
    broker_hosts: int  # what the fleet needs (at least the stack's brokerMinHosts)
    reconnect_storm_s: float  # every device reconnecting at once, spread over the hosts
    # Configs (and as many commands, at the same cost each) fanned out to the hosts: in all, what each host receives
    # through its filtered subscription, and what it would receive if every host got every message.
    fanout_messages_per_s: float
    fanout_per_host_per_s: float
    fanout_per_host_per_s_unfiltered: float
    lb_inbound_gib_month: float
    egress_gib_month: float
    # Pub/Sub
    pubsub_message_bytes: int
    pubsub_deliveries: int  # subscriptions of the stack on the telemetry topic
    pubsub_tib_month: float
    # Dataflow
    dataflow_vcpus_needed: float
    dataflow_workers: int
    streaming_engine_gib_month: float
    # BigQuery
    bigquery_raw_row_bytes: int
    bigquery_rows_month: float
    bigquery_streaming_gib_month: float
    bigquery_storage_growth_gib_month: float
    bigquery_active_gib: float  # stored in the 12th month, per storage class
    bigquery_long_term_gib: float
    # Bigtable
    bigtable_writes_per_s: float
    bigtable_nodes_per_cluster: int
    bigtable_storage_gib_per_cluster: float
    # Registry (Firestore)
    registry_reads_month: float
    registry_writes_month: float
    # Config-push function
    function_invocations_month: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stack"] = asdict(self.stack)
        return out


def plan(fleet: Fleet, stack: StackShape, figures: HostFigures,
         recheck_interval_s: float = spec.CLOUD_RECHECK_INTERVAL_S) -> Capacity:
    notes: list[str] = []
    rate = fleet.messages_per_s
    month = fleet.messages_per_month

    # Broker hosts: throughput (the reference host's maximum, per core, scaled to this machine type's vCPUs and
    # planned at half) and connections: what the deployed autoscaler keeps on one host of the stack's machine type,
    # from the same arithmetic the stack sizes its hosts with (host_sizing: measured memory per device and the
    # measured idle CPU of the process that binds, for the stack's brokerDeviceAuth). With "mosquitto" each host's
    # auth daemon holds the whole registry in memory: the fleet's devices.
    vcpus, _ = machine_shape(stack.broker_machine_type)
    host_rate = figures.qos1_msgs_per_s / figures.cores * vcpus * PLANNED_UTILIZATION
    hosts_for_rate = math.ceil(rate / host_rate)
    try:
        size = host_sizing.sizing(stack.broker_machine_type, stack.broker_device_auth,
                                  registry_devices=fleet.devices if stack.broker_device_auth == "mosquitto" else 0)
    except ValueError as exc:
        raise PlanningError(f"broker machine type: {exc}") from None
    if size.autoscale_target < 1:
        raise PlanningError(f"a {stack.broker_machine_type} broker host with brokerDeviceAuth mosquitto cannot hold "
                            f"the auth daemon's map of {fleet.devices:,} registry devices (docs/capacity.md)")
    hosts_for_connections = math.ceil(fleet.devices / size.autoscale_target)
    hosts = max(1, hosts_for_rate, hosts_for_connections, stack.broker_min_hosts)
    if hosts > stack.broker_max_hosts:
        notes.append(f"needs {hosts} broker hosts; the stack's brokerMaxHosts is {stack.broker_max_hosts}")
    binds = ("the front's idle CPU" if stack.broker_device_auth == "front" else
             "Mosquitto's and the auth daemon's idle CPU, the daemon holding the fleet's registry")
    notes.append(f"connections per host: {size.autoscale_target:,}, what the autoscaler keeps on a "
                 f"{stack.broker_machine_type} ({size.devices:,} it carries by memory and {binds}, "
                 f"docs/broker-scaling.md); the reference host held {figures.connections_held:,} idle connections "
                 "in the bench, where that machine's open-files limit stopped it")
    storm_s = fleet.devices / (hosts * figures.connections_per_s)
    # Fan-out: each config push is published once with the holding host; the bench's deliveries per message over
    # the hosts (1.0 measured: one host gets it) spread over this plan's hosts. Unfiltered, each host would get the
    # bench's unfiltered share (1.0: every message), the cost the per-host filter removes.
    fanout_rate = fleet.devices * fleet.config_pushes_per_device_day / 86_400
    fanout_per_host = fanout_rate * figures.fanout_deliveries_per_message / hosts
    unfiltered = fanout_rate * max(figures.fanout_received_unfiltered.values())
    keepalives = fleet.devices * SECONDS_PER_MONTH / KEEPALIVE_S
    lb_in = (month * (fleet.payload_bytes + MQTT_IN_OVERHEAD) + keepalives * PING_BYTES) / GIB
    egress = (month * PUBACK_OUT + keepalives * PING_BYTES) / GIB

    # Pub/Sub: the bridge publishes each message once; each subscription of the stack's on the topic delivers it.
    deliveries = sum(1 for s in spec.SUBSCRIPTIONS.values() if s.topic == "telemetry" and s.cloud)
    message_bytes = fleet.payload_bytes + PUBSUB_OVERHEAD
    pubsub_tib = month * message_bytes * (1 + deliveries) / 2**40

    # Dataflow: the measured CPU per message of the pipeline's parse, planned at half of each worker's vCPUs.
    worker_vcpus, _ = machine_shape(stack.pipeline_machine_type)
    vcpus_needed = rate * figures.pipeline_us_per_msg * 1e-6 / PLANNED_UTILIZATION
    workers = max(1, math.ceil(vcpus_needed / worker_vcpus))
    notes.append("Dataflow workers come from the pipeline's parse cost alone (bench pipeline section); the "
                 "runner's and the sinks' cost per message is not measured here, so the count is a floor")
    if workers > stack.pipeline_max_workers:
        notes.append(f"needs {workers} Dataflow workers; the stack's pipelineMaxWorkers is "
                     f"{stack.pipeline_max_workers}")
    se_gib = month * (message_bytes + fleet.metrics_per_message * STREAMING_ENGINE_BYTES_PER_METRIC) / GIB

    # BigQuery: telemetry_raw gets a row per message, telemetry_1m a row per device, metric and minute that had a
    # reading. Legacy streaming inserts bill each row as at least 1 KiB.
    raw_row = RAW_ROW_FIXED + fleet.payload_bytes + fleet.metrics_per_message * RAW_ROW_PER_METRIC
    agg_rows = fleet.devices * fleet.metrics_per_message * HOURS_PER_MONTH * 60 * min(1.0, fleet.rate * 60)
    streaming_gib = (month * max(raw_row, STREAMING_INSERT_MIN_ROW) + agg_rows * STREAMING_INSERT_MIN_ROW) / GIB
    growth_gib = (month * raw_row + agg_rows * AGG_ROW) / GIB
    kept_days = min(stack.bigquery_table_expiration_days or 365, 365)
    per_day = growth_gib / DAYS_PER_MONTH
    active_gib = per_day * min(90, kept_days)
    long_term_gib = per_day * max(0, kept_days - 90)

    # Bigtable: a row per message, written by every cluster (replication); nodes for the writes at the stack's CPU
    # target, and for the storage its garbage collection keeps.
    per_node = BIGTABLE_WRITES_PER_NODE[stack.bigtable_storage_type] * stack.bigtable_cpu_target / 100
    row_bytes = (fleet.metrics_per_message + BIGTABLE_ATTRIBUTE_CELLS) * BIGTABLE_CELL_BYTES
    bt_gib = rate * 86_400 * stack.bigtable_gc_max_age_days * row_bytes / GIB
    nodes = max(stack.bigtable_min_nodes, math.ceil(rate / per_node),
                math.ceil(bt_gib / (BIGTABLE_TIB_PER_NODE[stack.bigtable_storage_type] * 1024)))
    if nodes > stack.bigtable_max_nodes:
        notes.append(f"needs {nodes} Bigtable nodes per cluster; the stack's bigtableMaxNodes is "
                     f"{stack.bigtable_max_nodes}")

    # The registry: each host's re-check round reads what changed (a query) and the registry's settings, whatever
    # its number of devices; each session (one per device and token lifetime) reads the device at CONNECT and
    # writes and removes its presence record; a device's PINGREQ is written at most every HEARTBEAT_RECORD_S.
    # Devices changed by operators are re-read on top (a read per change and host holding the device).
    sessions = fleet.devices * SECONDS_PER_MONTH / SESSION_S
    rounds = SECONDS_PER_MONTH / recheck_interval_s
    reads = hosts * spec.RECHECK_READS_PER_ROUND * rounds + sessions * spec.CONNECT_READS
    heartbeats = fleet.devices * SECONDS_PER_MONTH / max(KEEPALIVE_S, spec.HEARTBEAT_RECORD_S, recheck_interval_s)
    writes = heartbeats + sessions * spec.PRESENCE_WRITES_PER_SESSION
    if stack.broker_device_auth == "mosquitto":
        notes.append("registry reads and writes are counted as the front's: with brokerDeviceAuth mosquitto the "
                     "auth daemon reads no device at CONNECT (its map) and writes no heartbeat records, so they are "
                     "an upper bound")
    invocations = fleet.devices * fleet.config_pushes_per_device_day * DAYS_PER_MONTH

    return Capacity(
        fleet=fleet, stack=stack, figures=figures, messages_per_s=rate,
        host_msgs_per_s=host_rate, hosts_for_rate=hosts_for_rate, devices_per_host=size.autoscale_target,
        hosts_for_connections=hosts_for_connections,
        broker_hosts=hosts, reconnect_storm_s=storm_s, fanout_messages_per_s=fanout_rate,
        fanout_per_host_per_s=fanout_per_host, fanout_per_host_per_s_unfiltered=unfiltered,
        lb_inbound_gib_month=lb_in, egress_gib_month=egress,
        pubsub_message_bytes=message_bytes, pubsub_deliveries=deliveries, pubsub_tib_month=pubsub_tib,
        dataflow_vcpus_needed=vcpus_needed, dataflow_workers=workers, streaming_engine_gib_month=se_gib,
        bigquery_raw_row_bytes=raw_row, bigquery_rows_month=month + agg_rows,
        bigquery_streaming_gib_month=streaming_gib, bigquery_storage_growth_gib_month=growth_gib,
        bigquery_active_gib=active_gib, bigquery_long_term_gib=long_term_gib,
        bigtable_writes_per_s=rate, bigtable_nodes_per_cluster=nodes, bigtable_storage_gib_per_cluster=bt_gib,
        registry_reads_month=reads, registry_writes_month=writes, function_invocations_month=invocations,
        notes=notes)


def render(c: Capacity) -> str:
    f = c.fleet
    lines = [
        f"fleet: {f.devices:,} devices x {f.rate:g} msg/s = {c.messages_per_s:,.1f} msg/s, {f.payload_bytes} B "
        f"payloads, {f.metrics_per_message} metrics each; stack {c.stack.name} ({c.stack.region})",
        f"broker hosts ({c.stack.broker_machine_type}, devices authenticated by the "
        f"{'front' if c.stack.broker_device_auth == 'front' else 'Mosquitto plugin'}): {c.broker_hosts} "
        f"(rate needs {c.hosts_for_rate} at "
        f"{c.host_msgs_per_s:,.0f} msg/s each, connections need {c.hosts_for_connections} at "
        f"{c.devices_per_host:,} each, the stack keeps {c.stack.broker_min_hosts}.."
        f"{c.stack.broker_max_hosts}); every device reconnecting at once takes {c.reconnect_storm_s:,.0f} s",
        f"config fan-out: {c.fanout_messages_per_s:,.2f} configs/s, each host receives "
        f"{c.fanout_per_host_per_s:,.3f}/s "
        f"through its filtered subscription ({c.figures.fanout_deliveries_per_message:.2f} deliveries per config in "
        f"all, bench fanout) instead of {c.fanout_per_host_per_s_unfiltered:,.2f}/s if every host got every config; "
        "a command costs the same per message",
        f"Pub/Sub: {c.pubsub_message_bytes} B per message, published once and delivered {c.pubsub_deliveries}x: "
        f"{c.pubsub_tib_month:,.3f} TiB/month",
        f"Dataflow workers ({c.stack.pipeline_machine_type}): {c.dataflow_workers} ({c.dataflow_vcpus_needed:.2f} "
        f"vCPU needed); Streaming Engine {c.streaming_engine_gib_month:,.1f} GiB/month",
        f"Bigtable ({c.stack.bigtable_storage_type}, {c.stack.bigtable_clusters} cluster(s)): "
        f"{c.bigtable_nodes_per_cluster} node(s) per cluster for {c.bigtable_writes_per_s:,.1f} writes/s, "
        f"{c.bigtable_storage_gib_per_cluster:,.1f} GiB per cluster after {c.stack.bigtable_gc_max_age_days} days",
        f"BigQuery: {c.bigquery_rows_month:,.0f} rows/month streamed ({c.bigquery_streaming_gib_month:,.1f} GiB "
        f"billed), storage grows {c.bigquery_storage_growth_gib_month:,.1f} GiB/month; month 12 holds "
        f"{c.bigquery_active_gib:,.1f} GiB active + {c.bigquery_long_term_gib:,.1f} GiB long-term",
        f"registry (Firestore): {c.registry_reads_month:,.0f} reads/month (hosts' re-check rounds, device reads at "
        f"connect), {c.registry_writes_month:,.0f} writes/month (presence records, heartbeats)",
        f"config pushes: {c.function_invocations_month:,.0f} function invocations/month",
        f"per-host figures: {c.figures.source} ({c.figures.cores} cores shared by the load, the emulators and the "
        "host)",
    ]
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)

"""iotctl capacity and iotctl cost: a known fleet gives known numbers (each worked out by hand below), bad input
gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gcp_iot_bridge.infra.config import StackConfig
from iotbridge.cli import app
from iotbridge.planning import capacity, cost
from iotbridge.planning.capacity import Fleet, HostFigures, PlanningError

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# The known fleet: 10,000 devices, one message every 10 s each (1,000 msg/s), 100-byte payloads with 2 metrics,
# one config push per device and day, on a dev-like stack in us-central1 (one SSD Bigtable cluster).
STACK_YAML = """config:
  gcp:project: my-iot-dev-project
  gcp:region: us-central1
  gcp-iot-bridge:prefix: iot-dev
  gcp-iot-bridge:deletionProtection: false
  gcp-iot-bridge:bigqueryLocation: US
  gcp-iot-bridge:bigtableZones:
    - us-central1-b
"""
# Per-host figures as a reference run would give them (made-up round numbers, so the arithmetic can be followed).
FIGURES = HostFigures(cores=2, qos1_msgs_per_s=14_000, connections_held=10_000, connections_per_s=250,
                      memory_per_connection_kib=73, pipeline_us_per_msg=20, config_push_ms=50,
                      fanout_kept_per_host={2: 0.5, 6: 0.25}, fanout_received_unfiltered={2: 1.0, 6: 1.0},
                      source="test")


@pytest.fixture
def stack_file(tmp_path: Path) -> Path:
    p = tmp_path / "Pulumi.known.yaml"
    p.write_text(STACK_YAML)
    return p


@pytest.fixture
def known(stack_file: Path) -> capacity.Capacity:
    fleet = Fleet(devices=10_000, rate=0.1, payload_bytes=100, metrics_per_message=2, config_pushes_per_device_day=1)
    return capacity.plan(fleet, capacity.read_stack(stack_file), FIGURES, recheck_interval_s=5.0)


def test_known_fleet_capacity(known: capacity.Capacity) -> None:
    c = known
    # 10,000 devices x 0.1 msg/s = 1,000 msg/s; a month of 730 h = 2,628,000 s -> 2.628e9 messages.
    assert c.messages_per_s == pytest.approx(1000)
    month = 2.628e9
    # One host: 14,000 msg/s on the reference's 2 cores = 7,000 per vCPU; e2-standard-2 has 2 vCPUs; planned at
    # half: 7,000 msg/s. 1,000 msg/s needs 1 host. Connections: what the autoscaler keeps on an e2-standard-2
    # (host_sizing): memory 2 x 4,096 = 8,192 MiB less max(512, 8,192 / 4) = 2,048 reserved = 6,144 MiB x 1,024 /
    # 42 KiB = 149,796 devices; the front's idle CPU: half a core = 500 permille x 10,000 / 62 permille = 80,645;
    # the smaller, 80,645, x 0.7 = 56,451 kept. 10,000 devices need 1; the stack's default brokerMinHosts is 2,
    # so 2 hosts.
    assert c.host_msgs_per_s == pytest.approx(7000)
    assert c.devices_per_host == 56_451
    assert (c.hosts_for_rate, c.hosts_for_connections, c.broker_hosts) == (1, 1, 2)
    # Every device reconnecting: 10,000 / (2 hosts x 250 connections/s) = 20 s.
    assert c.reconnect_storm_s == pytest.approx(20)
    # Config fan-out: 10,000 pushes a day = 0.11574/s. Deliveries per config over the hosts: (0.5 x 2 + 0.25 x 6)
    # / 2 = 1.25 (made up above to be told apart from 1); over 2 hosts: 0.11574 x 1.25 / 2 = 0.072338/s each.
    # Unfiltered, every host gets every config: 0.11574/s each.
    assert c.fanout_messages_per_s == pytest.approx(10_000 / 86_400)
    assert c.fanout_per_host_per_s == pytest.approx(10_000 / 86_400 * 1.25 / 2)
    assert c.fanout_per_host_per_s_unfiltered == pytest.approx(10_000 / 86_400)
    # Keep-alives: 10,000 devices x 2,628,000 s / 60 s = 4.38e8 a month, 76 bytes each way.
    # Inbound: 2.628e9 x (100 + 111) + 4.38e8 x 76 = 5.87796e11 B = 547.43 GiB.
    assert c.lb_inbound_gib_month == pytest.approx(5.87796e11 / GIB)
    assert c.lb_inbound_gib_month == pytest.approx(547.43, rel=1e-4)
    # Egress: 2.628e9 PUBACKs x 78 + 4.38e8 x 76 = 2.38272e11 B = 221.91 GiB.
    assert c.egress_gib_month == pytest.approx(221.91, rel=1e-4)
    # Pub/Sub message: 100 B + attribute names 75 + values 91 + publish time 20 + id 16 = 302 B; published once and
    # delivered once (the pipeline's subscription): 2.628e9 x 302 x 2 = 1.587312e12 B = 1.4437 TiB.
    assert (c.pubsub_message_bytes, c.pubsub_deliveries) == (302, 1)
    assert c.pubsub_tib_month == pytest.approx(1.4437, rel=1e-4)
    # Dataflow: 1,000 msg/s x 20 us = 0.02 vCPU, planned at half: 0.04 vCPU -> 1 worker (n2-standard-2).
    assert c.dataflow_vcpus_needed == pytest.approx(0.04)
    assert c.dataflow_workers == 1
    # Streaming Engine: 2.628e9 x (302 + 2 x 48) = 1.045944e12 B = 974.11 GiB.
    assert c.streaming_engine_gib_month == pytest.approx(974.11, rel=1e-4)
    # BigQuery raw row: 136 fixed + 100 payload + 2 x 20 metrics = 276 B. telemetry_1m: 10,000 devices x 2 metrics
    # x 43,800 minutes (each minute has a reading at 6/min) = 8.76e8 rows. Streamed rows bill 1 KiB each:
    # (2.628e9 + 8.76e8) x 1024 B = 3,341.67 GiB.
    assert c.bigquery_raw_row_bytes == 276
    assert c.bigquery_rows_month == pytest.approx(month + 8.76e8)
    assert c.bigquery_streaming_gib_month == pytest.approx(3341.67, rel=1e-5)
    # Storage growth: 2.628e9 x 276 + 8.76e8 x 91 = 8.05044e11 B = 749.76 GiB a month = 24.649 GiB a day; month 12
    # (no table expiration: a year kept) holds 90 days active = 2,218.4 GiB and 275 days long-term = 6,778.5 GiB.
    assert c.bigquery_storage_growth_gib_month == pytest.approx(749.76, rel=1e-5)
    assert c.bigquery_active_gib == pytest.approx(2218.4, rel=1e-4)
    assert c.bigquery_long_term_gib == pytest.approx(6778.5, rel=1e-4)
    # Bigtable: SSD 14,000 writes/s per node at the 60% CPU target = 8,400 -> 1 node for 1,000 writes/s. Rows of
    # (2 + 6) cells x 76 B = 608 B for 30 days: 1,000 x 86,400 x 30 x 608 = 1.575936e12 B = 1,467.7 GiB (< 5 TiB).
    assert c.bigtable_nodes_per_cluster == 1
    assert c.bigtable_storage_gib_per_cluster == pytest.approx(1467.7, rel=1e-4)
    # Registry: 2 hosts x 2 reads a round (the change query, the registry's settings) x 2,628,000 s / 5 s = 2,102,400
    # reads, whatever the devices; a session per device and hour (its token's lifetime): 10,000 x 730 = 7.3e6
    # sessions, each reading the device once: 9,402,400 reads. Writes: a heartbeat per device per 300 s = 8.76e7,
    # and each session's presence record written and removed = 1.46e7: 1.022e8.
    assert c.registry_reads_month == pytest.approx(9_402_400)
    assert c.registry_writes_month == pytest.approx(1.022e8)
    # Config pushes: 10,000 x 1 a day x 30.4167 days = 304,166.7 invocations.
    assert c.function_invocations_month == pytest.approx(304_166.7, rel=1e-6)


def test_known_fleet_cost(known: capacity.Capacity) -> None:
    book, as_of = cost.table_prices("us-central1")
    lines = {(ln.component, ln.price_key): ln for ln in cost.estimate(known, book)}

    def check(component: str, key: str, quantity: float, unit_price: float, monthly: float) -> None:
        ln = lines[(component, key)]
        assert ln.quantity == pytest.approx(quantity, rel=1e-4), (component, key)
        assert ln.unit_price == pytest.approx(unit_price), (component, key)
        assert ln.monthly == pytest.approx(monthly, rel=1e-3), (component, key)

    # 2 hosts x 730 h = 1,460 h x $0.06701142 = $97.84; 2 x 20 GiB pd-balanced x $0.10 = $4.00.
    check("Compute Engine", "compute.e2_standard_2_hour", 1460, 0.06701142, 97.84)
    check("Compute Engine", "compute.pd_balanced_gib_month", 40, 0.10, 4.00)
    # Forwarding rule 730 h x $0.025 = $18.25; 547.43 GiB inbound x $0.008 = $4.38.
    check("Load balancer", "lb.forwarding_rule_hour", 730, 0.025, 18.25)
    check("Load balancer", "lb.data_processed_gib", 547.43, 0.008, 4.379)
    # Pub/Sub 1.4437 TiB x $40 = $57.75.
    check("Pub/Sub", "pubsub.throughput_tib", 1.4437, 40, 57.75)
    # Dataflow: 1 worker x 2 vCPU x 730 h = 1,460 x $0.069 = $100.74; 8 GiB x 730 h = 5,840 x $0.003557 = $20.77;
    # 30 GiB disk x 730 h = 21,900 x $0.000054 = $1.18; Streaming Engine 974.11 GiB x $0.018 = $17.53.
    check("Dataflow", "dataflow.streaming_vcpu_hour", 1460, 0.069, 100.74)
    check("Dataflow", "dataflow.memory_gib_hour", 5840, 0.003557, 20.77)
    check("Dataflow", "dataflow.pd_standard_gib_hour", 21_900, 0.000054, 1.1826)
    check("Dataflow", "dataflow.streaming_engine_gib", 974.11, 0.018, 17.53)
    # BigQuery: 3,341.67 GiB streamed x $0.05 = $167.08; 2,218.4 GiB active x $0.02 = $44.37; 6,778.5 GiB
    # long-term x $0.01 = $67.79.
    check("BigQuery", "bigquery.streaming_insert_gib", 3341.67, 0.05, 167.08)
    check("BigQuery", "bigquery.active_storage_gib_month", 2218.4, 0.02, 44.37)
    check("BigQuery", "bigquery.long_term_storage_gib_month", 6778.5, 0.01, 67.79)
    # Bigtable: 1 node x 1 cluster x 730 h x $0.65 = $474.50; 1,467.7 GiB SSD x $0.17 = $249.51.
    check("Bigtable", "bigtable.node_hour", 730, 0.65, 474.50)
    check("Bigtable", "bigtable.ssd_gib_month", 1467.7, 0.17, 249.51)
    # Firestore: 9,402,400 reads = 94.024 x 100k x $0.03 = $2.82; 1.022e8 writes = 1,022 x $0.09 = $91.98.
    check("Firestore (registry)", "firestore.reads_100k", 94.024, 0.03, 2.82072)
    check("Firestore (registry)", "firestore.writes_100k", 1022, 0.09, 91.98)
    # Function: 0.30417 M invocations x $0.40 = $0.1217; 304,166.7 x 1/6 vCPU x 0.05 s = 2,534.7 vCPU-s x $0.000024
    # = $0.0608; x 0.25 GiB x 0.05 s = 3,802.1 GiB-s x $0.0000025 = $0.0095.
    check("Cloud Functions (config push)", "run.requests_million", 0.304167, 0.40, 0.12167)
    check("Cloud Functions (config push)", "run.vcpu_second", 2534.72, 0.000024, 0.060833)
    check("Cloud Functions (config push)", "run.gib_second", 3802.08, 0.0000025, 0.0095052)
    check("Cloud Run", "run.requests_million", 0, 0.40, 0)
    # Egress 221.91 GiB, all in the first TiB at $0.12 = $26.63.
    check("Egress", "egress.internet_gib", 221.91, 0.12, 26.63)
    assert len(lines) == 21
    # Total: the sum of the lines above = $1,447.31.
    assert sum(ln.monthly for ln in lines.values()) == pytest.approx(1447.31, rel=1e-3)
    assert as_of == json.loads(cost.PRICES.read_text())["as_of"]


def test_egress_tiers_are_applied_in_order() -> None:
    price = cost.Price("egress.internet_gib", 0.12, "GiB", "t", False, ((1, 0.12), (10, 0.11), (None, 0.08)))
    # 20 TiB: 1,024 GiB x 0.12 + 9,216 GiB x 0.11 + 10,240 GiB x 0.08 = 122.88 + 1,013.76 + 819.20 = 1,955.84.
    assert cost._tiered(20 * 1024, price) == pytest.approx(1955.84)
    assert cost._tiered(100, price) == pytest.approx(12.0)


def test_a_fleet_over_the_stack_limits_says_so(stack_file: Path) -> None:
    # 1,000,000 devices need 1,000,000 / 56,451 = 17.7 -> 18 hosts for their connections (56,451 kept on each
    # e2-standard-2, worked out in test_known_fleet_capacity), not the 100 that the reference's 10,000 held
    # connections would give; brokerMaxHosts is 10.
    c = capacity.plan(Fleet(1_000_000, 1 / 60), capacity.read_stack(stack_file), FIGURES)
    assert c.hosts_for_connections == 18
    assert any("needs 18 broker hosts; the stack's brokerMaxHosts is 10" in n for n in c.notes)


def test_a_broker_machine_type_the_host_sizing_does_not_know_is_a_one_line_error(tmp_path: Path) -> None:
    # c3 is a family the price table and machine_shape know, but no broker host of it has been sized.
    p = tmp_path / "Pulumi.c3.yaml"
    p.write_text(STACK_YAML + "  gcp-iot-bridge:brokerMachineType: c3-standard-4\n")
    with pytest.raises(capacity.PlanningError, match=r"broker machine type: unknown machine type 'c3-standard-4'"):
        capacity.plan(Fleet(1_000, 1.0), capacity.read_stack(p), FIGURES)


def test_the_deprecated_fixed_host_count_is_read_as_equal_bounds(tmp_path: Path) -> None:
    p = tmp_path / "Pulumi.fixed.yaml"
    p.write_text(STACK_YAML + "  gcp-iot-bridge:brokerHosts: 3\n")
    s = capacity.read_stack(p)
    assert (s.broker_min_hosts, s.broker_max_hosts) == (3, 3)


def test_planning_defaults_are_the_stack_configs() -> None:
    fields = StackConfig.model_fields
    for key, default in capacity.STACK_DEFAULTS.items():
        assert fields[key].default == default, key


def test_the_example_stacks_are_read() -> None:
    prod = capacity.read_stack(ROOT / "Pulumi.prod.yaml")
    assert (prod.region, prod.bigtable_clusters, prod.bigtable_max_nodes, prod.bigtable_gc_max_age_days) == \
        ("europe-west1", 2, 10, 365)
    demo = capacity.read_stack(ROOT / "Pulumi.demo.yaml")
    assert (demo.bigquery_table_expiration_days, demo.bigtable_storage_type) == (7, "HDD")


def test_a_region_outside_the_table_is_an_error_not_a_guess() -> None:
    book, _ = cost.table_prices("asia-east1")
    with pytest.raises(PlanningError, match="no compute.e2_standard_2_hour price for region asia-east1"):
        book("compute.e2_standard_2_hour")


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    out = result.output.strip()
    assert "\n" not in out and out.startswith("error: "), out
    return out


@pytest.mark.parametrize(("args", "says"), [
    (["--devices", "abc", "--rate", "1"], "--devices='abc': not a number"),
    (["--devices", "0", "--rate", "1"], "--devices=0: expected an integer 1..100000000"),
    (["--devices", "10", "--rate", "0"], "--rate=0.0: expected messages per second per device"),
    (["--devices", "10", "--rate", "1", "--payload-bytes", "300000"], "--payload-bytes=300000"),
    (["--devices", "1.5", "--rate", "1"], "expected a whole number"),
    (["--rate", "1"], "--devices and --rate are required"),
    (["--devices", "10", "--rate", "1", "--stack-config", "/nonexistent/Pulumi.x.yaml"], "cannot read stack config"),
])
@pytest.mark.parametrize("command", ["capacity", "cost"])
def test_bad_input_gets_one_line(command: str, args: list[str], says: str) -> None:
    config = [] if "--stack-config" in args else ["--stack-config", str(ROOT / "Pulumi.dev.yaml")]
    assert says in one_line_error([command, *args, *config])


def test_unknown_prices_mode_and_missing_reference(tmp_path: Path) -> None:
    base = ["cost", "--devices", "10", "--rate", "1", "--stack-config", str(ROOT / "Pulumi.dev.yaml")]
    assert "--prices=cheap: expected table or live" in one_line_error([*base, "--prices", "cheap"])
    assert "no bench reference run" in one_line_error([*base, "--reference", str(tmp_path / "none.json")])


def test_live_prices_without_credentials_fail_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud application-default credentials
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on Compute Engine: do not wait for the metadata server
    out = one_line_error(["cost", "--devices", "10", "--rate", "1", "--stack-config", str(ROOT / "Pulumi.dev.yaml"),
                          "--prices", "live"])
    assert "live prices need Google credentials" in out


def test_commands_print_the_plan_and_the_estimate() -> None:
    args = ["--devices", "1000", "--rate", "0.0167", "--stack-config", str(ROOT / "Pulumi.prod.yaml"), "--json"]
    result = CliRunner().invoke(app, ["capacity", *args])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["stack"]["region"] == "europe-west1" and plan["broker_hosts"] >= 2
    result = CliRunner().invoke(app, ["cost", *args])
    assert result.exit_code == 0, result.output
    est = json.loads(result.output)
    assert est["region"] == "europe-west1"
    assert est["total"] == pytest.approx(sum(ln["monthly"] for ln in est["lines"]), abs=0.01)
    assert all(ln["quantity"] >= 0 and ln["unit_price"] > 0 for ln in est["lines"])


def test_the_registry_reads_are_those_of_the_deployed_hosts_recheck(stack_file: Path) -> None:
    """The estimate's re-check rounds are as frequent as a deployed broker host's (its startup settings), not the
    local stack's faster default."""
    import json

    from gcp_iot_bridge.infra import broker

    script = broker.startup_script(
        project="p-1", region="us-central1", registry_id="fleet", prefix="iot", code_url="gs://b/code.zip",
        tls_key_secret="k", passwords_secret="s", server_cert_pem="PEM", database="(default)", routes={},
        health_port=8080)
    interval = json.loads(script.split("<<'JSON'\n", 1)[1].split("\nJSON", 1)[0])["recheck_interval_s"]
    fleet = Fleet(devices=1000, rate=0.1, payload_bytes=100, metrics_per_message=2, config_pushes_per_device_day=1)
    c = capacity.plan(fleet, capacity.read_stack(stack_file), FIGURES)
    # 2 hosts x 2 reads a round x 2,628,000 s a month (730 h) / the hosts' interval, and 1,000 devices x 730
    # sessions (one per hour) reading the device once.
    assert c.broker_hosts == 2
    assert c.registry_reads_month == pytest.approx(2 * 2 * 730 * 3600 / interval + 1000 * 730)


def test_the_fan_out_figures_come_from_the_bench_reference(tmp_path: Path) -> None:
    """The committed reference run's fanout section (bench/fanout_cost.py, 2 and 6 hosts) is what the plan reads:
    each host keeps its devices' share, one delivery per config in all. Changed in a copy of the reference, the plan
    changes with it; without the section, planning says what to run."""
    figures = capacity.read_reference()
    assert set(figures.fanout_kept_per_host) == {2, 6}
    assert figures.fanout_kept_per_host[2] == pytest.approx(1 / 2, abs=0.01)
    assert figures.fanout_kept_per_host[6] == pytest.approx(1 / 6, abs=0.01)
    assert figures.fanout_received_unfiltered == {2: 1.0, 6: 1.0}  # the emulator hands every host every message
    assert figures.fanout_deliveries_per_message == pytest.approx(1.0, abs=0.01)

    data = json.loads(capacity.REFERENCE.read_text())
    for f in data["figures"]:
        if f["name"] == "messages kept per host per config or command, 6 hosts":
            f["value"] = 0.5  # as if every message went to three of the six hosts
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps(data))
    assert capacity.read_reference(changed).fanout_deliveries_per_message == pytest.approx((1.0 + 3.0) / 2, abs=0.01)

    data["figures"] = [f for f in data["figures"] if f["section"] != "fanout"]
    changed.write_text(json.dumps(data))
    with pytest.raises(PlanningError, match="no fan-out figures"):
        capacity.read_reference(changed)


def test_a_session_lasts_the_device_sdks_token_lifetime() -> None:
    import inspect

    from iotbridge.device import Device

    assert capacity.SESSION_S == inspect.signature(Device.__init__).parameters["token_lifetime_s"].default


def test_a_stack_of_devices_authenticated_by_mosquitto_sizes_hosts_by_mosquittos_cpu_and_the_daemons_map(
        tmp_path: Path, stack_file: Path) -> None:
    """brokerDeviceAuth mosquitto: no front. Mosquitto holds 18 KiB per connected device and binds by its one core;
    the auth daemon holds 4 KiB per device of the registry (the fleet's) on every host."""
    p = tmp_path / "Pulumi.mq.yaml"
    p.write_text(STACK_YAML + "  gcp-iot-bridge:brokerDeviceAuth: mosquitto\n")
    stack = capacity.read_stack(p)
    assert stack.broker_device_auth == "mosquitto"
    # 10,000 devices: the map 10,000 x 4 = 40,000 KiB; memory 6,144 MiB x 1,024 = 6,291,456 KiB less it =
    # 6,251,456 / 18 = 347,303 devices; Mosquitto's CPU: half its core, 500 x 10,000 / 22 permille = 227,272, the
    # smaller; x 0.7 = 159,090 kept (the front's 56,451). 10,000 devices need 1 host; brokerMinHosts makes 2.
    small = capacity.plan(Fleet(10_000, 0.1), stack, FIGURES)
    assert small.devices_per_host == 159_090
    assert (small.hosts_for_connections, small.broker_hosts) == (1, 2)
    assert any("registry reads and writes are counted as the front's" in n for n in small.notes)
    # 1,000,000 devices: the map 4,000,000 KiB leaves 2,291,456 / 18 = 127,303 devices by memory, under the CPU's
    # 227,272; x 0.7 = 89,112 kept; 1,000,000 / 89,112 = 11.2 -> 12 hosts (the front: 18).
    big = capacity.plan(Fleet(1_000_000, 1 / 60), stack, FIGURES)
    assert big.devices_per_host == 89_112
    assert big.hosts_for_connections == 12
    # 1,600,000 devices: their map, 6,400,000 KiB, is more than the 6,291,456 KiB a host has for devices.
    with pytest.raises(PlanningError, match="cannot hold the auth daemon's map of 1,600,000 registry devices"):
        capacity.plan(Fleet(1_600_000, 1 / 60), stack, FIGURES)
    # The same stack in the front mode keeps 56,451 (test_known_fleet_capacity), the map ignored.
    front = capacity.plan(Fleet(1_000_000, 1 / 60), capacity.read_stack(stack_file), FIGURES)
    assert front.devices_per_host == 56_451


def test_an_unknown_broker_device_auth_is_a_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "Pulumi.bad.yaml"
    p.write_text(STACK_YAML + "  gcp-iot-bridge:brokerDeviceAuth: plugin\n")
    with pytest.raises(PlanningError, match=r"^gcp-iot-bridge:brokerDeviceAuth=plugin: expected front or mosquitto$"):
        capacity.read_stack(p)


def test_host_sizing_of_the_mosquitto_mode_known_numbers() -> None:
    from iotbridge.planning import host_sizing

    # e2-standard-2, no registry: 6,291,456 KiB / 18 = 349,525 by memory; 227,272 by Mosquitto's CPU (the daemon's
    # 1 permille per 10,000 on its own core would allow 5,000,000). Mosquitto: one descriptor per device,
    # 227,272 + 4,096; no front; fs.file-max: 227,272 + 2 x 4,096 + 65,536 + 65,536 = 366,536 < 1,048,576.
    bare = host_sizing.sizing("e2-standard-2", "mosquitto")
    assert (bare.devices_by_memory, bare.devices_by_cpu, bare.devices) == (349_525, 227_272, 227_272)
    assert (bare.broker_nofile, bare.front_nofile, bare.file_max) == (231_368, 4_096, 1_048_576)
    # e2-micro sustains a quarter of a core, which both processes share: 125 x 10,000 / (22 + 1) = 54,347; its
    # 512 MiB for devices: 524,288 / 18 = 29,127, the smaller; x 0.7 = 20,388.
    micro = host_sizing.sizing("e2-micro", "mosquitto")
    assert (micro.devices_by_memory, micro.devices_by_cpu, micro.autoscale_target) == (29_127, 54_347, 20_388)
    # The stack's group of at most 10 hosts: d = 6,291,456 / (18 + 0.7 x 10 x 4 = 46) = 136,770; the registry
    # taken as 10 x 0.7 x 136,770 = 957,390 devices: its map 3,829,560 KiB leaves 2,461,896 / 18 = 136,772, the
    # capacity (under 227,272); x 0.7 = 95,740 kept.
    group = host_sizing.group_sizing("e2-standard-2", "mosquitto", max_hosts=10)
    assert (group.devices, group.autoscale_target) == (136_772, 95_740)
    # A devices_per_host given: the registry is 10 x 50,000 = 500,000 (2,000,000 KiB): 4,291,456 / 18 = 238,414 by
    # memory, so Mosquitto's CPU binds again: 227,272.
    assert host_sizing.group_sizing("e2-standard-2", "mosquitto", 10, 50_000).devices == 227_272
    # The front's sizing takes no map.
    assert host_sizing.group_sizing("e2-standard-2", "front", 10).devices == host_sizing.sizing("e2-standard-2").devices
    with pytest.raises(ValueError, match="device_auth must be one of front, mosquitto, got 'plugin'"):
        host_sizing.sizing("e2-standard-2", "plugin")

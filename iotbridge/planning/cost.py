"""The monthly list-price estimate of a :class:`~iotbridge.planning.capacity.Capacity`, one line per billed item.

Prices come from the dated table ``prices.json`` next to this module (``--prices table``) or from the Cloud Billing
Catalog API (``--prices live``, which needs network access and Google credentials). Every line shows its quantity,
unit and unit price, so each can be checked by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iotbridge.planning.capacity import (
    BROKER_DISK_GIB,
    DATAFLOW_WORKER_DISK_GIB,
    FUNCTION_MEMORY_GIB,
    FUNCTION_VCPU,
    HOURS_PER_MONTH,
    Capacity,
    PlanningError,
    machine_shape,
)

PRICES = Path(__file__).with_name("prices.json")


@dataclass(frozen=True)
class Price:
    key: str
    value: float  # USD per unit
    unit: str
    source: str
    checked: bool
    tiers_tib: tuple[tuple[float | None, float], ...] = ()  # (up to TiB, USD per GiB) for tiered prices


@dataclass(frozen=True)
class Line:
    component: str
    item: str
    quantity: float
    unit: str
    unit_price: float
    monthly: float  # USD
    price_key: str
    checked: bool  # the unit price was checked against a published copy (table) or read live

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PriceBook = Callable[[str], Price]


def table_prices(region: str, path: Path = PRICES) -> tuple[PriceBook, str]:
    """A price lookup for ``region`` from the dated table; returns it and the table's date."""
    data = json.loads(path.read_text())

    def lookup(key: str) -> Price:
        entry = data["prices"].get(key)
        if entry is None:
            raise PlanningError(f"no price {key} in {path.name}")
        regions = entry["regions"]
        value = regions.get(region, regions.get("*"))
        if value is None:
            raise PlanningError(f"{path.name} has no {key} price for region {region} (it has "
                                f"{', '.join(sorted(regions))}); add it or use --prices live")
        tiers = tuple((t[0], float(t[1])) for t in entry.get("tiers_tib", []))
        return Price(key, float(value), entry["unit"], entry["source"], bool(entry["checked"]), tiers)

    return lookup, str(data["as_of"])


def live_prices(region: str) -> tuple[PriceBook, str]:
    """A price lookup from the Cloud Billing Catalog API (services.skus.list), by SKU description and region.
    Fails with one line when there are no credentials or no network."""
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from googleapiclient.discovery import build
    except ImportError as exc:  # pragma: no cover - both are dependencies of the project
        raise PlanningError(f"live prices need google-auth and google-api-python-client: {exc}") from None
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-billing.readonly"])
    except DefaultCredentialsError as exc:
        raise PlanningError(f"live prices need Google credentials: {str(exc).splitlines()[0]}") from None
    try:
        billing = build("cloudbilling", "v1", credentials=credentials, cache_discovery=False)
        services = {s["displayName"]: s["name"]
                    for s in _all(billing.services().list, "services", {})}
    except Exception as exc:  # noqa: BLE001 - network, auth or API errors: one line
        raise PlanningError(f"the Cloud Billing Catalog could not be read: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}") from None
    skus: dict[str, list[dict]] = {}

    def sku_list(service: str) -> list[dict]:
        if service not in skus:
            if service not in services:
                raise PlanningError(f"the Cloud Billing Catalog has no service {service!r}")
            skus[service] = _all(billing.services().skus().list, "skus", {"parent": services[service]})
        return skus[service]

    def find(service: str, pattern: str) -> tuple[float, str]:
        for sku in sku_list(service):
            regions = sku.get("serviceRegions", [])
            if not re.search(pattern, sku.get("description", "")) or (regions and region not in regions
                                                                       and "global" not in regions):
                continue
            rates = sku["pricingInfo"][0]["pricingExpression"]["tieredRates"]
            paid = [r["unitPrice"] for r in rates if int(r["unitPrice"].get("units", 0)) or r["unitPrice"].get("nanos")]
            money = paid[0] if paid else rates[0]["unitPrice"]
            return int(money.get("units", 0)) + money.get("nanos", 0) / 1e9, sku["description"]
        raise PlanningError(f"the Cloud Billing Catalog has no SKU matching {pattern!r} of {service} in {region}")

    def lookup(key: str) -> Price:
        service, pattern, unit = LIVE_SKUS[key]
        value, description = find(service, pattern)
        if key == "compute.e2_standard_2_hour":  # 2 cores (value) + 8 GiB of RAM
            ram, ram_description = find(service, r"^E2 Instance Ram running in")
            value, description = 2 * value + 8 * ram, f"2 x {description} + 8 x {ram_description}"
        return Price(key, value * LIVE_SCALE.get(key, 1.0), unit, f"Cloud Billing Catalog: {description}", True)

    return lookup, "live"


def _all(method: Callable[..., Any], field: str, kwargs: dict[str, Any]) -> list[dict]:
    out: list[dict] = []
    token = None
    while True:
        resp = method(**kwargs, pageToken=token).execute() if token else method(**kwargs).execute()
        out += resp.get(field, [])
        token = resp.get("nextPageToken")
        if not token:
            return out


# price key -> (Catalog service display name, SKU description pattern, unit the lookup returns)
LIVE_SKUS: dict[str, tuple[str, str, str]] = {
    "compute.e2_standard_2_hour": ("Compute Engine", r"^E2 Instance Core running in", "hour"),
    "compute.pd_balanced_gib_month": ("Compute Engine", r"^Balanced PD Capacity in", "GiB-month"),
    "lb.forwarding_rule_hour": ("Compute Engine", r"Network Load Balancing: Forwarding Rule Minimum", "hour"),
    "lb.data_processed_gib": ("Compute Engine", r"Network Load Balancing: Data Processing Charge", "GiB"),
    "pubsub.throughput_tib": ("Cloud Pub/Sub", r"^Message Delivery Basic", "TiB"),
    "dataflow.streaming_vcpu_hour": ("Dataflow", r"^Streaming vCPU Time", "vCPU-hour"),
    "dataflow.memory_gib_hour": ("Dataflow", r"^Streaming RAM Time", "GiB-hour"),
    "dataflow.pd_standard_gib_hour": ("Dataflow", r"^Streaming PD Time", "GiB-hour"),
    "dataflow.streaming_engine_gib": ("Dataflow", r"^Streaming Engine Data Processed", "GiB"),
    "bigquery.streaming_insert_gib": ("BigQuery", r"^Streaming Insert", "GiB"),
    "bigquery.active_storage_gib_month": ("BigQuery", r"^Active Logical Storage", "GiB-month"),
    "bigquery.long_term_storage_gib_month": ("BigQuery", r"^Long Term Logical Storage", "GiB-month"),
    "bigtable.node_hour": ("Cloud Bigtable", r"^Bigtable Nodes? ", "node-hour"),
    "bigtable.ssd_gib_month": ("Cloud Bigtable", r"^Bigtable SSD Storage", "GiB-month"),
    "bigtable.hdd_gib_month": ("Cloud Bigtable", r"^Bigtable HDD Storage", "GiB-month"),
    "firestore.reads_100k": ("Cloud Firestore", r"^Cloud Firestore Read Ops", "100k reads"),
    "firestore.writes_100k": ("Cloud Firestore", r"^Cloud Firestore Entity Writes", "100k writes"),
    "run.requests_million": ("Cloud Run", r"^Requests", "million requests"),
    "run.vcpu_second": ("Cloud Run", r"^CPU Allocation Time", "vCPU-second"),
    "run.gib_second": ("Cloud Run", r"^Memory Allocation Time", "GiB-second"),
    "egress.internet_gib": ("Compute Engine", r"^Network Internet Egress from .* to Americas", "GiB"),
}
# The Catalog prices Firestore operations and Cloud Run requests one by one; the table per 100k and per million.
LIVE_SCALE = {"firestore.reads_100k": 100_000, "firestore.writes_100k": 100_000, "run.requests_million": 1_000_000}


def _tiered(gib: float, price: Price) -> float:
    if not price.tiers_tib:
        return gib * price.value
    total, done = 0.0, 0.0
    for upto_tib, per_gib in price.tiers_tib:
        top = gib if upto_tib is None else min(gib, upto_tib * 1024)
        if top > done:
            total += (top - done) * per_gib
            done = top
    return total


def estimate(c: Capacity, prices: PriceBook) -> list[Line]:
    """One line per billed item of the month."""
    s, hours = c.stack, HOURS_PER_MONTH
    lines: list[Line] = []

    def add(component: str, item: str, quantity: float, key: str, monthly: Callable[[float, Price], float]
            | None = None) -> None:
        p = prices(key)
        lines.append(Line(component, item, quantity, p.unit, p.value,
                          monthly(quantity, p) if monthly else quantity * p.value, key, p.checked))

    vcpus, _ = machine_shape(s.broker_machine_type)
    if not s.broker_machine_type.startswith("e2-standard-"):
        raise PlanningError(f"brokerMachineType {s.broker_machine_type}: the price table has E2 standard types only; "
                            "use --prices live")
    add("Compute Engine", f"{c.broker_hosts} broker hosts ({s.broker_machine_type}) x {hours} h",
        c.broker_hosts * hours, "compute.e2_standard_2_hour", lambda q, p: q * p.value * vcpus / 2)
    add("Compute Engine", f"{c.broker_hosts} boot disks x {BROKER_DISK_GIB} GiB", c.broker_hosts * BROKER_DISK_GIB,
        "compute.pd_balanced_gib_month")
    add("Load balancer", f"1 forwarding rule (MQTT 8883) x {hours} h", hours, "lb.forwarding_rule_hour")
    add("Load balancer", "device traffic processed (inbound)", c.lb_inbound_gib_month, "lb.data_processed_gib")
    add("Pub/Sub", f"telemetry throughput (publish + {c.pubsub_deliveries} delivery)", c.pubsub_tib_month,
        "pubsub.throughput_tib")
    wv, wm = machine_shape(s.pipeline_machine_type)
    add("Dataflow", f"{c.dataflow_workers} workers x {wv} vCPU x {hours} h", c.dataflow_workers * wv * hours,
        "dataflow.streaming_vcpu_hour")
    add("Dataflow", f"{c.dataflow_workers} workers x {wm:g} GiB x {hours} h", c.dataflow_workers * wm * hours,
        "dataflow.memory_gib_hour")
    add("Dataflow", f"{c.dataflow_workers} workers x {DATAFLOW_WORKER_DISK_GIB} GiB disk x {hours} h",
        c.dataflow_workers * DATAFLOW_WORKER_DISK_GIB * hours, "dataflow.pd_standard_gib_hour")
    add("Dataflow", "Streaming Engine data processed", c.streaming_engine_gib_month, "dataflow.streaming_engine_gib")
    add("BigQuery", "streaming inserts (rows billed at >= 1 KiB)", c.bigquery_streaming_gib_month,
        "bigquery.streaming_insert_gib")
    add("BigQuery", "active storage in month 12", c.bigquery_active_gib, "bigquery.active_storage_gib_month")
    add("BigQuery", "long-term storage in month 12", c.bigquery_long_term_gib, "bigquery.long_term_storage_gib_month")
    add("Bigtable", f"{c.bigtable_nodes_per_cluster} node(s) x {s.bigtable_clusters} cluster(s) x {hours} h",
        c.bigtable_nodes_per_cluster * s.bigtable_clusters * hours, "bigtable.node_hour")
    add("Bigtable", f"{s.bigtable_storage_type} storage x {s.bigtable_clusters} cluster(s) (uncompressed)",
        c.bigtable_storage_gib_per_cluster * s.bigtable_clusters,
        "bigtable.ssd_gib_month" if s.bigtable_storage_type == "SSD" else "bigtable.hdd_gib_month")
    add("Firestore (registry)", "reads: the hosts' re-check rounds and devices read at connect",
        c.registry_reads_month / 1e5, "firestore.reads_100k")
    add("Firestore (registry)", "writes: presence records and heartbeats", c.registry_writes_month / 1e5,
        "firestore.writes_100k")
    billed_s = c.figures.config_push_ms / 1000
    add("Cloud Functions (config push)", "invocations", c.function_invocations_month / 1e6, "run.requests_million")
    add("Cloud Functions (config push)", f"CPU ({FUNCTION_VCPU:.3f} vCPU x {billed_s:.3f} s each)",
        c.function_invocations_month * FUNCTION_VCPU * billed_s, "run.vcpu_second")
    add("Cloud Functions (config push)", f"memory ({FUNCTION_MEMORY_GIB} GiB x {billed_s:.3f} s each)",
        c.function_invocations_month * FUNCTION_MEMORY_GIB * billed_s, "run.gib_second")
    add("Cloud Run", "services of the stack's own besides the function: none", 0, "run.requests_million")
    add("Egress", "to devices (PUBACKs, PINGRESPs)", c.egress_gib_month, "egress.internet_gib", _tiered)
    return lines


def unchecked(lines: list[Line]) -> list[str]:
    return sorted({ln.price_key for ln in lines if not ln.checked})


def render(lines: list[Line], as_of: str) -> str:
    rows = [f"{'component':<30} {'item':<58} {'quantity':>16} {'unit':<16} {'unit price':>12} {'USD/month':>12}"]
    for ln in lines:
        rows.append(f"{ln.component:<30} {ln.item:<58} {ln.quantity:>16,.3f} {ln.unit:<16} {ln.unit_price:>12.6g} "
                    f"{ln.monthly:>12,.2f}")
    rows.append(f"{'total':<30} {'':<58} {'':>16} {'':<16} {'':>12} {sum(ln.monthly for ln in lines):>12,.2f}")
    rows.append(f"prices: {as_of} (list prices, no discounts or free tiers)")
    if unchecked(lines):
        rows.append("prices not checked against a published copy when the table was written: "
                    + ", ".join(unchecked(lines)))
    return "\n".join(rows)


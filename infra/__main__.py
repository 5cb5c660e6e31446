"""gcp-iot-bridge: Google's IoT reference architecture, one stack per environment (Pulumi.<stack>.yaml).

Reads like the diagram: validated config first (nothing is declared if it is wrong), then the foundation
(APIs, service accounts), the stores the data lands in, and the Pub/Sub paths that feed them.
"""

import pulumi

import config
from components.foundation import Foundation, FoundationArgs
from components.messaging import Messaging, MessagingArgs
from components.timeseries import TimeSeries, TimeSeriesArgs
from components.warehouse import Warehouse, WarehouseArgs

cfg = config.load()
labels = cfg.all_labels

foundation = Foundation("foundation", FoundationArgs(project=cfg.project, prefix=cfg.prefix))

# Stores first: the device-logs BigQuery subscription in Messaging writes into the warehouse.
warehouse = Warehouse("warehouse", WarehouseArgs(
    project=cfg.project,
    dataset_id=cfg.bigquery_dataset,
    location=cfg.bigquery_location,
    deletion_protection=cfg.deletion_protection,
    data_expiration_days=cfg.bigquery_table_expiration_days,
    labels=labels,
    depends_on=foundation.needs("bigquery.googleapis.com"),
))

timeseries = TimeSeries("timeseries", TimeSeriesArgs(
    project=cfg.project,
    prefix=cfg.prefix,
    zones=cfg.bigtable_zones,
    deletion_protection=cfg.deletion_protection,
    storage_type=cfg.bigtable_storage_type,
    min_nodes=cfg.bigtable_min_nodes,
    max_nodes=cfg.bigtable_max_nodes,
    cpu_target=cfg.bigtable_cpu_target,
    gc_max_age=cfg.bigtable_gc_max_age,
    labels=labels,
    depends_on=foundation.needs("bigtableadmin.googleapis.com"),
))

messaging = Messaging("messaging", MessagingArgs(
    project=cfg.project,
    prefix=cfg.prefix,
    pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
    bigquery_dataset=warehouse.dataset.dataset_id,
    bigquery_tables=warehouse.table_ids,
    message_retention_seconds=cfg.pubsub_message_retention_seconds,
    max_delivery_attempts=cfg.pubsub_max_delivery_attempts,
    labels=labels,
    depends_on=foundation.needs("pubsub.googleapis.com", "bigquery.googleapis.com"),
))

# CONTRACTS §5 (the outputs that exist so far).
pulumi.export("project_id", cfg.project)
pulumi.export("region", cfg.region)
pulumi.export("telemetry_topic", messaging.topics["telemetry"].name)
pulumi.export("state_topic", messaging.topics["state"].name)
pulumi.export("config_requests_topic", messaging.topics["config-requests"].name)
pulumi.export("dead_letter_topic", messaging.topics["dead-letter"].name)
pulumi.export("device_logs_topic", messaging.topics["device-logs"].name)
pulumi.export("bigquery_dataset", warehouse.dataset.dataset_id)
pulumi.export("bigtable_instance", timeseries.instance.name)
pulumi.export("bigtable_table", timeseries.table.name)

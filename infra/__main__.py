"""gcp-iot-bridge: Google's IoT reference architecture, one stack per environment (Pulumi.<stack>.yaml).

Reads like the diagram: validated config first (nothing is declared if it is wrong), then the foundation
(APIs, service accounts, network), the stores the data lands in, the Pub/Sub paths that feed them, the device
side (registry + MQTT broker hosts), the streaming pipeline, the config push-back, cloud-to-edge ML, and what
operators look at (monitoring, the Looker Studio report, Workbench).
"""

import pulumi

import config
from components.broker import Broker, BrokerArgs
from components.config_push import APIS as CONFIG_PUSH_APIS
from components.config_push import ConfigPush, ConfigPushArgs
from components.dashboard import dashboard_url
from components.edge_ml import EdgeMl, EdgeMlArgs
from components.foundation import Foundation, FoundationArgs
from components.messaging import Messaging, MessagingArgs
from components.monitoring import Monitoring, MonitoringArgs
from components.network import Network, NetworkArgs
from components.pipeline import Pipeline, PipelineArgs
from components.timeseries import TimeSeries, TimeSeriesArgs
from components.warehouse import Warehouse, WarehouseArgs
from components.workbench import Workbench, WorkbenchArgs

cfg = config.load()
labels = cfg.all_labels
# CMEK (kmsKeyName): Foundation grants the key to each Google agent that encrypts with it; every store below gets
# the key and waits for its agent's grant (foundation.key_grants, empty without a key).
kms_key = cfg.kms_key_name or None

foundation = Foundation("foundation", FoundationArgs(project=cfg.project, prefix=cfg.prefix, kms_key_name=kms_key))
network = Network("network", NetworkArgs(
    project=cfg.project, region=cfg.region, prefix=cfg.prefix,
    depends_on=foundation.needs("compute.googleapis.com"),
))

# Stores first: the device-logs BigQuery subscription in Messaging writes into the warehouse.
warehouse = Warehouse("warehouse", WarehouseArgs(
    project=cfg.project,
    dataset_id=cfg.bigquery_dataset,
    location=cfg.bigquery_location,
    deletion_protection=cfg.deletion_protection,
    data_expiration_days=cfg.bigquery_table_expiration_days,
    labels=labels,
    kms_key_name=kms_key,
    depends_on=[*foundation.needs("bigquery.googleapis.com"), *foundation.key_grants("bigquery.googleapis.com")],
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
    kms_key_name=kms_key,
    depends_on=[*foundation.needs("bigtableadmin.googleapis.com"),
                *foundation.key_grants("bigtableadmin.googleapis.com")],
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
    kms_key_name=kms_key,
    depends_on=[*foundation.needs("pubsub.googleapis.com", "bigquery.googleapis.com"),
                *foundation.key_grants("pubsub.googleapis.com")],
))

# Devices → broker hosts (registry in Firestore, TLS front, Mosquitto, bridge) → telemetry and state topics.
broker = Broker("broker", BrokerArgs(
    project=cfg.project,
    region=cfg.region,
    prefix=cfg.prefix,
    registry_id=cfg.registry,
    service_account_email=foundation.service_accounts["bridge"].email,
    telemetry_topic=messaging.topics["telemetry"].id,
    state_topic=messaging.topics["state"].id,
    commands_topic=messaging.topics["device-commands"].id,
    routes={"logs": messaging.topics["device-logs"].id},
    deletion_protection=cfg.deletion_protection,
    network=network.vpc.id,
    subnetwork=network.subnet.id,
    machine_type=cfg.broker_machine_type,
    hosts=cfg.broker_hosts,
    device_source_ranges=cfg.broker_device_source_ranges,
    dead_letter_topic=messaging.topics["dead-letter"].id,
    pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
    max_delivery_attempts=cfg.pubsub_max_delivery_attempts,
    labels=labels,
    kms_key_name=kms_key,
    # cloudresourcemanager: its datastore.user grant is a project IAM binding.
    depends_on=[*foundation.needs("compute.googleapis.com", "firestore.googleapis.com",
                                  "secretmanager.googleapis.com", "pubsub.googleapis.com", "storage.googleapis.com",
                                  "cloudresourcemanager.googleapis.com"),
                *foundation.key_grants("storage.googleapis.com")],
))

# Telemetry → the streaming pipeline → BigQuery, Bigtable, and config requests when a rule fires.
pipeline = Pipeline("pipeline", PipelineArgs(
    project=cfg.project,
    region=cfg.region,
    prefix=cfg.prefix,
    worker_service_account=foundation.service_accounts["dataflow"],
    subnetwork=network.subnet,
    input_subscription=messaging.subscriptions["telemetry-pipeline"],
    config_requests_topic=messaging.topics["config-requests"],
    dataset_id=warehouse.dataset.dataset_id,
    tables=warehouse.tables,
    bigtable_instance=timeseries.instance.name,
    bigtable_table=timeseries.table.name,
    deletion_protection=cfg.deletion_protection,
    threshold_rules=cfg.pipeline_threshold_rules,
    payload_profiles=cfg.pipeline_payload_profiles,
    max_workers=cfg.pipeline_max_workers,
    machine_type=cfg.pipeline_machine_type,
    prebuilt_image=cfg.pipeline_image or None,
    labels=labels,
    kms_key_name=kms_key,
    # The workers call the data APIs of Pub/Sub, BigQuery and Bigtable from their first bundle.
    depends_on=[*foundation.needs("dataflow.googleapis.com", "artifactregistry.googleapis.com",
                                  "storage.googleapis.com", "compute.googleapis.com", "pubsub.googleapis.com",
                                  "bigquery.googleapis.com", "bigtable.googleapis.com"),
                *foundation.key_grants("storage.googleapis.com", "dataflow.googleapis.com", "compute.googleapis.com")],
))

# Config requests (operators, the pipeline's rules) → the function → the registry → every broker host (fan-out),
# which delivers the version to the device wherever it is connected.
config_push = ConfigPush("config-push", ConfigPushArgs(
    project=cfg.project,
    region=cfg.region,
    prefix=cfg.prefix,
    registry_id=cfg.registry,
    service_account_email=foundation.service_accounts["config-push"].email,
    requests_topic=messaging.topics["config-requests"].id,
    dead_letter_topic=messaging.topics["dead-letter"].id,
    delivery="fanout",
    fanout_topic=messaging.topics["device-commands"].id,
    pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
    eventarc_agent=foundation.service_agent("eventarc.googleapis.com"),
    deletion_protection=cfg.deletion_protection,
    labels=labels,
    kms_key_name=kms_key,
    depends_on=[*foundation.needs(*CONFIG_PUSH_APIS), broker.database, *foundation.key_grants("storage.googleapis.com")],
))

# Cloud to edge: a model trained on the warehouse, exported small, rolled out through device configs.
edge_ml = EdgeMl("edge-ml", EdgeMlArgs(
    project=cfg.project,
    prefix=cfg.prefix,
    location=cfg.bigquery_location,
    dataset_id=cfg.bigquery_dataset,
    deletion_protection=cfg.deletion_protection,
    model_version=cfg.edge_ml_model_version,
    train=cfg.edge_ml_train,
    signer_members=cfg.edge_ml_signers,
    labels=labels,
    kms_key_name=kms_key,
    depends_on=[*foundation.needs("bigquery.googleapis.com", "storage.googleapis.com", "iam.googleapis.com",
                                  "iamcredentials.googleapis.com"), warehouse.tables["telemetry_raw"],
                *foundation.key_grants("storage.googleapis.com")],
))

# What operators look at.
monitoring = Monitoring("monitoring", MonitoringArgs(
    project=cfg.project,
    prefix=cfg.prefix,
    dataflow_job_name=pipeline.job.name,
    config_push_function=config_push.function.name,
    mqtt_host=broker.address.address,
    notification_email=cfg.alert_email or None,
    labels=labels,
    depends_on=foundation.needs("monitoring.googleapis.com"),
))

if cfg.workbench_enabled:
    workbench = Workbench("workbench", WorkbenchArgs(
        project=cfg.project,
        prefix=cfg.prefix,
        zone=cfg.workbench_zone,
        subnetwork=network.subnet,
        dataset_id=warehouse.dataset.dataset_id,
        deletion_protection=cfg.deletion_protection,
        idle_timeout_seconds=cfg.workbench_idle_timeout_minutes * 60,
        users=cfg.workbench_users,
        labels=labels,
        depends_on=foundation.needs("notebooks.googleapis.com", "compute.googleapis.com",
                                    "bigquery.googleapis.com", "iam.googleapis.com"),
    ))
    pulumi.export("workbench_proxy_uri", workbench.proxy_uri)

# Every stack's outputs (docs/outputs.md).
pulumi.export("project_id", cfg.project)
pulumi.export("region", cfg.region)
pulumi.export("registry_id", broker.registry_id)
pulumi.export("mqtt_endpoint", broker.mqtt_endpoint)
pulumi.export("mqtt_ca_cert", broker.mqtt_ca_cert)
pulumi.export("telemetry_topic", messaging.topics["telemetry"].name)
pulumi.export("state_topic", messaging.topics["state"].name)
pulumi.export("config_requests_topic", messaging.topics["config-requests"].name)
pulumi.export("dead_letter_topic", messaging.topics["dead-letter"].name)
pulumi.export("device_logs_topic", messaging.topics["device-logs"].name)
pulumi.export("bigquery_dataset", warehouse.dataset.dataset_id)
pulumi.export("bigtable_instance", timeseries.instance.name)
pulumi.export("bigtable_table", timeseries.table.name)
pulumi.export("dataflow_job_name", pipeline.job.name)
pulumi.export("config_push_function", config_push.function.name)
pulumi.export("models_bucket", edge_ml.bucket.name)
pulumi.export("models_signer", edge_ml.signer.email)
pulumi.export("dashboard_url", dashboard_url(cfg.project, warehouse.dataset.dataset_id, warehouse.views))
pulumi.export("monitoring_dashboard_url", monitoring.dashboard_url)

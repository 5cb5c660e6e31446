"""A user's own Pulumi program: their VPC, subnet and BigQuery dataset, with the gcp-iot-bridge broker and pipeline.

Only the installed package is used (``pip install gcp-iot-bridge``); nothing here reads the gcp-iot-bridge
repository. The platform team owns the network and the dataset; the bridge's components are wired to them:

- the device registry's Firestore database (``RegistryDatabase``), which the broker hosts read and write;
- the broker hosts (``Broker``) run in the user's subnet, behind the load balancer on 8883;
- the warehouse's tables and views go into the user's dataset (``WarehouseArgs(dataset=...)``);
- the streaming pipeline (``Pipeline``) runs its workers in the user's subnet and writes those tables.

The stack needs ``gcp:project`` and ``gcp:region``; the rest is written down here.
"""

import pulumi
import pulumi_gcp as gcp

from gcp_iot_bridge.infra import (
    Broker,
    BrokerArgs,
    FormerBroker,
    Foundation,
    FoundationArgs,
    Messaging,
    MessagingArgs,
    Pipeline,
    PipelineArgs,
    RegistryDatabase,
    RegistryDatabaseArgs,
    TimeSeries,
    TimeSeriesArgs,
    Warehouse,
    WarehouseArgs,
)
from gcp_iot_bridge.infra.broker import REGISTRAR_APIS as BROKER_REGISTRAR_APIS

gcp_config = pulumi.Config("gcp")
project = gcp_config.require("project")
region = gcp_config.require("region")
prefix = "acme-iot"
labels = {"team": "platform"}

# ----------------------------------------------------------------------------- what the platform team owns
vpc = gcp.compute.Network("acme-vpc", project=project, name="acme-vpc", auto_create_subnetworks=False)
# Private Google Access: the broker hosts and the Dataflow workers have no external IP.
subnet = gcp.compute.Subnetwork("acme-subnet", project=project, region=region, name="acme-iot-subnet",
                                network=vpc.id, ip_cidr_range="10.42.0.0/20", private_ip_google_access=True)
dataset = gcp.bigquery.Dataset("acme-dataset", project=project, dataset_id="acme_telemetry", location="US",
                               labels=labels)

# ----------------------------------------------------------------------------- the bridge, wired to them
foundation = Foundation("iot-foundation", FoundationArgs(project=project, prefix=prefix))
warehouse = Warehouse("iot-warehouse", WarehouseArgs(
    project=project, dataset_id="acme_telemetry", location="US", deletion_protection=True, labels=labels,
    dataset=dataset, depends_on=foundation.needs("bigquery.googleapis.com"),
))
timeseries = TimeSeries("iot-timeseries", TimeSeriesArgs(
    project=project, prefix=prefix, zones=[f"{region}-a"], deletion_protection=True, labels=labels,
    depends_on=foundation.needs("bigtableadmin.googleapis.com"),
))
messaging = Messaging("iot-messaging", MessagingArgs(
    project=project, prefix=prefix, pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
    bigquery_dataset=dataset.dataset_id, bigquery_tables=warehouse.table_ids, labels=labels,
    depends_on=foundation.needs("pubsub.googleapis.com", "bigquery.googleapis.com"),
))
# Earlier versions of this program had the Broker declare the database; FormerBroker keeps that database (and every
# device in it) through the move instead of replacing it. A program written today leaves former_brokers out.
registry = RegistryDatabase("iot-registry", RegistryDatabaseArgs(
    project=project, location=region, deletion_protection=True, former_brokers=[FormerBroker("iot-broker")],
    depends_on=foundation.needs("firestore.googleapis.com"),
))
broker = Broker("iot-broker", BrokerArgs(
    project=project, region=region, prefix=prefix, registry_id="acme-registry",
    service_account_email=foundation.service_accounts["bridge"].email,
    telemetry_topic=messaging.topics["telemetry"].id,
    state_topic=messaging.topics["state"].id,
    commands_topic=messaging.topics["device-commands"].id,
    dead_letter_topic=messaging.topics["dead-letter"].id,
    pubsub_agent=foundation.service_agent("pubsub.googleapis.com"),
    project_number=foundation.project_number,
    deletion_protection=True,
    registry=registry,
    network=vpc.id,
    subnetwork=subnet.id,
    min_hosts=2,
    max_hosts=4,
    labels=labels,
    depends_on=foundation.needs("compute.googleapis.com", "firestore.googleapis.com", "secretmanager.googleapis.com",
                                "pubsub.googleapis.com", "storage.googleapis.com",
                                "cloudresourcemanager.googleapis.com", "iam.googleapis.com", *BROKER_REGISTRAR_APIS)
    + [messaging.dead_letter_publisher],
))
pipeline = Pipeline("iot-pipeline", PipelineArgs(
    project=project, region=region, prefix=prefix,
    worker_service_account=foundation.service_accounts["dataflow"],
    subnetwork=subnet,
    input_subscription=messaging.subscriptions["telemetry-pipeline"],
    config_requests_topic=messaging.topics["config-requests"],
    dataset_id=dataset.dataset_id,
    tables=warehouse.tables,
    bigtable_instance=timeseries.instance.name,
    bigtable_table=timeseries.table.name,
    deletion_protection=True,
    labels=labels,
    depends_on=foundation.needs("dataflow.googleapis.com", "artifactregistry.googleapis.com",
                                "storage.googleapis.com", "compute.googleapis.com", "pubsub.googleapis.com",
                                "bigquery.googleapis.com", "bigtable.googleapis.com"),
))

pulumi.export("mqtt_endpoint", broker.mqtt_endpoint)
pulumi.export("mqtt_ca_cert", broker.mqtt_ca_cert)
pulumi.export("telemetry_topic", messaging.topics["telemetry"].name)
pulumi.export("dataflow_job_name", pipeline.job.name)
pulumi.export("bigquery_dataset", dataset.dataset_id)

"""IotBridge: the whole architecture from one validated ``StackConfig``, the component ``infra/__main__.py`` declares.

Reads like the diagram: the foundation (APIs, service accounts, network), the stores the data lands in, the
Pub/Sub paths that feed them, the device side (registry + MQTT broker hosts), the streaming pipeline, the config
push-back, cloud-to-edge ML, and what operators look at (monitoring, the Looker Studio report, Workbench). Each
piece is a component of this package with its own ``*Args``; a program that needs only some of them (its own
network, its own dataset) builds those pieces itself (examples/byo_network_and_dataset).

The pieces keep the logical names the program gave them before this component existed ("foundation", "broker",
...), with an alias to the stack root as their former parent, so a stack deployed before moves under
``IotBridge`` without replacing anything. Those fixed names make one ``IotBridge`` per stack.

No ``from __future__ import annotations``: the component provider (provider.py) reads the outputs' annotations
as objects.
"""

from dataclasses import dataclass

import pulumi

from gcp_iot_bridge.infra.admin_api import APIS as ADMIN_API_APIS
from gcp_iot_bridge.infra.admin_api import AdminApi, AdminApiArgs
from gcp_iot_bridge.infra.broker import REGISTRAR_APIS as BROKER_REGISTRAR_APIS
from gcp_iot_bridge.infra.broker import Broker, BrokerArgs
from gcp_iot_bridge.infra.config import StackConfig
from gcp_iot_bridge.infra.config_push import APIS as CONFIG_PUSH_APIS
from gcp_iot_bridge.infra.config_push import ConfigPush, ConfigPushArgs
from gcp_iot_bridge.infra.dashboard import dashboard_url
from gcp_iot_bridge.infra.edge_ml import EdgeMl, EdgeMlArgs
from gcp_iot_bridge.infra.foundation import Foundation, FoundationArgs
from gcp_iot_bridge.infra.messaging import Messaging, MessagingArgs
from gcp_iot_bridge.infra.monitoring import Monitoring, MonitoringArgs
from gcp_iot_bridge.infra.network import Network, NetworkArgs
from gcp_iot_bridge.infra.pipeline import Pipeline, PipelineArgs
from gcp_iot_bridge.infra.registry_database import FormerBroker, RegistryDatabase, RegistryDatabaseArgs
from gcp_iot_bridge.infra.timeseries import TimeSeries, TimeSeriesArgs
from gcp_iot_bridge.infra.warehouse import Warehouse, WarehouseArgs
from gcp_iot_bridge.infra.workbench import Workbench, WorkbenchArgs


@dataclass(frozen=True)
class IotBridgeArgs:
    # The validated configuration: ``config.load()`` in a Pulumi program over this project's stack files, or
    # ``config.parse({...}, stack)`` / ``StackConfig(...)`` in another program.
    config: StackConfig


class IotBridge(pulumi.ComponentResource):
    """Every component of the architecture, wired in data-flow order.

    Outputs (the stack outputs of docs/outputs.md are built from these):

    - ``registry_id``, ``mqtt_endpoint`` (host:8883), ``http_bridge_url`` (``https://host:8443``, the HTTP device
      bridge), ``mqtt_ca_cert`` (PEM devices verify the broker with);
    - ``topics``: spec key -> topic name (``telemetry``, ``state``, ``config-requests``, ``dead-letter``, ...);
    - ``bigquery_dataset``, ``bigtable_instance``, ``bigtable_table``;
    - ``dataflow_job_name``, ``config_push_function``, ``models_bucket``, ``models_signer``;
    - ``admin_api_url``: the admin API (IoT Core's device manager API) operators' clients set as their endpoint;
    - ``dashboard_url`` (Looker Studio), ``monitoring_dashboard_url`` (Cloud Monitoring);
    - ``workbench_proxy_uri``, None unless the config enables Workbench.

    The pieces themselves are attributes (``foundation``, ``network``, ``warehouse``, ``timeseries``,
    ``messaging``, ``registry``, ``broker``, ``pipeline``, ``config_push``, ``admin_api``, ``edge_ml``,
    ``monitoring``, ``workbench``).
    """

    registry_id: pulumi.Output[str]
    mqtt_endpoint: pulumi.Output[str]
    http_bridge_url: pulumi.Output[str]
    mqtt_ca_cert: pulumi.Output[str]
    topics: dict[str, pulumi.Output[str]]
    bigquery_dataset: pulumi.Output[str]
    bigtable_instance: pulumi.Output[str]
    bigtable_table: pulumi.Output[str]
    dataflow_job_name: pulumi.Output[str]
    config_push_function: pulumi.Output[str]
    admin_api_url: pulumi.Output[str]
    models_bucket: pulumi.Output[str]
    models_signer: pulumi.Output[str]
    dashboard_url: pulumi.Output[str]
    monitoring_dashboard_url: pulumi.Output[str]
    workbench_proxy_uri: pulumi.Output[str] | None

    def __init__(self, name: str, args: IotBridgeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gcp-iot-bridge:index:IotBridge", name, None, opts)
        cfg = args.config
        labels = cfg.all_labels
        # CMEK (kmsKeyName): Foundation grants the key to each Google agent that encrypts with it; every store
        # below gets the key and waits for its agent's grant (foundation.key_grants, empty without a key).
        kms_key = cfg.kms_key_name or None
        # The pieces were children of the stack itself before; the alias keeps their URNs' history.
        child = pulumi.ResourceOptions(parent=self, aliases=[pulumi.Alias(parent=pulumi.ROOT_STACK_RESOURCE)])

        self.foundation = Foundation(
            "foundation", FoundationArgs(project=cfg.project, prefix=cfg.prefix, kms_key_name=kms_key), opts=child)
        self.network = Network("network", NetworkArgs(
            project=cfg.project, region=cfg.region, prefix=cfg.prefix,
            depends_on=self.foundation.needs("compute.googleapis.com"),
        ), opts=child)

        # Stores first: the device-logs BigQuery subscription in Messaging writes into the warehouse.
        self.warehouse = Warehouse("warehouse", WarehouseArgs(
            project=cfg.project,
            dataset_id=cfg.bigquery_dataset,
            location=cfg.bigquery_location,
            deletion_protection=cfg.deletion_protection,
            data_expiration_days=cfg.bigquery_table_expiration_days,
            labels=labels,
            kms_key_name=kms_key,
            depends_on=[*self.foundation.needs("bigquery.googleapis.com"),
                        *self.foundation.key_grants("bigquery.googleapis.com")],
        ), opts=child)

        self.timeseries = TimeSeries("timeseries", TimeSeriesArgs(
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
            depends_on=[*self.foundation.needs("bigtableadmin.googleapis.com"),
                        *self.foundation.key_grants("bigtableadmin.googleapis.com")],
        ), opts=child)

        self.messaging = Messaging("messaging", MessagingArgs(
            project=cfg.project,
            prefix=cfg.prefix,
            pubsub_agent=self.foundation.service_agent("pubsub.googleapis.com"),
            bigquery_dataset=self.warehouse.dataset.dataset_id,
            bigquery_tables=self.warehouse.table_ids,
            message_retention_seconds=cfg.pubsub_message_retention_seconds,
            max_delivery_attempts=cfg.pubsub_max_delivery_attempts,
            labels=labels,
            kms_key_name=kms_key,
            depends_on=[*self.foundation.needs("pubsub.googleapis.com", "bigquery.googleapis.com"),
                        *self.foundation.key_grants("pubsub.googleapis.com")],
        ), opts=child)

        # The device registry: the broker hosts and the config-push function read and write it. Broker declared it
        # before it was a component of its own, under this component and, earlier still, under the stack.
        self.registry = RegistryDatabase("registry", RegistryDatabaseArgs(
            project=cfg.project,
            location=cfg.region,
            deletion_protection=cfg.deletion_protection,
            former_brokers=[FormerBroker("broker", parent=self), FormerBroker("broker")],
            depends_on=self.foundation.needs("firestore.googleapis.com"),
        ), opts=pulumi.ResourceOptions(parent=self))

        # Devices → broker hosts (TLS front, Mosquitto, bridge) → telemetry and state topics.
        self.broker = Broker("broker", BrokerArgs(
            project=cfg.project,
            region=cfg.region,
            prefix=cfg.prefix,
            registry_id=cfg.registry,
            service_account_email=self.foundation.service_accounts["bridge"].email,
            telemetry_topic=self.messaging.topics["telemetry"].id,
            state_topic=self.messaging.topics["state"].id,
            commands_topic=self.messaging.topics["device-commands"].id,
            routes={"logs": self.messaging.topics["device-logs"].id},
            deletion_protection=cfg.deletion_protection,
            registry=self.registry,
            network=self.network.vpc.id,
            subnetwork=self.network.subnet.id,
            machine_type=cfg.broker_machine_type,
            min_hosts=cfg.broker_min_hosts,
            max_hosts=cfg.broker_max_hosts,
            device_source_ranges=cfg.broker_device_source_ranges,
            device_auth=cfg.broker_device_auth,
            dead_letter_topic=self.messaging.topics["dead-letter"].id,
            pubsub_agent=self.foundation.service_agent("pubsub.googleapis.com"),
            project_number=self.foundation.project_number,
            labels=labels,
            kms_key_name=kms_key,
            # cloudresourcemanager: its project IAM bindings; iam: the registrar's accounts and custom role.
            depends_on=[*self.foundation.needs("compute.googleapis.com", "firestore.googleapis.com",
                                          "secretmanager.googleapis.com", "pubsub.googleapis.com",
                                          "storage.googleapis.com", "cloudresourcemanager.googleapis.com",
                                          "iam.googleapis.com", *BROKER_REGISTRAR_APIS),
                        *self.foundation.key_grants("storage.googleapis.com"),
                        # Pub/Sub's agent publishes what the hosts' subscriptions dead-letter.
                        self.messaging.dead_letter_publisher],
        ), opts=child)

        # Telemetry → the streaming pipeline → BigQuery, Bigtable, and config requests when a rule fires.
        self.pipeline = Pipeline("pipeline", PipelineArgs(
            project=cfg.project,
            region=cfg.region,
            prefix=cfg.prefix,
            worker_service_account=self.foundation.service_accounts["dataflow"],
            subnetwork=self.network.subnet,
            input_subscription=self.messaging.subscriptions["telemetry-pipeline"],
            config_requests_topic=self.messaging.topics["config-requests"],
            dataset_id=self.warehouse.dataset.dataset_id,
            tables=self.warehouse.tables,
            bigtable_instance=self.timeseries.instance.name,
            bigtable_table=self.timeseries.table.name,
            deletion_protection=cfg.deletion_protection,
            threshold_rules=cfg.pipeline_threshold_rules,
            payload_profiles=cfg.pipeline_payload_profiles,
            max_workers=cfg.pipeline_max_workers,
            machine_type=cfg.pipeline_machine_type,
            prebuilt_image=cfg.pipeline_image or None,
            labels=labels,
            kms_key_name=kms_key,
            # The workers call the data APIs of Pub/Sub, BigQuery and Bigtable from their first bundle.
            depends_on=[*self.foundation.needs("dataflow.googleapis.com", "artifactregistry.googleapis.com",
                                          "storage.googleapis.com", "compute.googleapis.com", "pubsub.googleapis.com",
                                          "bigquery.googleapis.com", "bigtable.googleapis.com"),
                        *self.foundation.key_grants("storage.googleapis.com", "dataflow.googleapis.com",
                                                    "compute.googleapis.com")],
        ), opts=child)

        # Config requests (operators, the pipeline's rules) → the function → the registry → the broker host that holds
        # the device (its presence record); a device connected nowhere gets the version when it next connects.
        self.config_push = ConfigPush("config-push", ConfigPushArgs(
            project=cfg.project,
            region=cfg.region,
            prefix=cfg.prefix,
            registry_id=cfg.registry,
            service_account_email=self.foundation.service_accounts["config-push"].email,
            requests_topic=self.messaging.topics["config-requests"].id,
            dead_letter_topic=self.messaging.topics["dead-letter"].id,
            delivery="fanout",
            fanout_topic=self.messaging.topics["device-commands"].id,
            pubsub_agent=self.foundation.service_agent("pubsub.googleapis.com"),
            eventarc_agent=self.foundation.service_agent("eventarc.googleapis.com"),
            deletion_protection=cfg.deletion_protection,
            registry=self.registry,
            labels=labels,
            kms_key_name=kms_key,
            depends_on=[*self.foundation.needs(*CONFIG_PUSH_APIS),
                        *self.foundation.key_grants("storage.googleapis.com")],
        ), opts=child)

        # Operators' code written for IoT Core → the admin API → the registry, and configs and commands onto the
        # device-commands fan-out, as the config-push function sends them.
        self.admin_api = AdminApi("admin-api", AdminApiArgs(
            project=cfg.project,
            region=cfg.region,
            prefix=cfg.prefix,
            registry_id=cfg.registry,
            service_account_email=self.foundation.service_accounts["admin-api"].email,
            project_number=self.foundation.project_number,
            deletion_protection=cfg.deletion_protection,
            registry=self.registry,
            publish_topics=[self.messaging.topics["device-commands"].id],
            readers=cfg.admin_api_readers,
            writers=cfg.admin_api_writers,
            public_access=cfg.admin_api_public_access,
            min_instances=cfg.admin_api_min_instances,
            max_instances=cfg.admin_api_max_instances,
            prebuilt_image=cfg.admin_api_image or None,
            labels=labels,
            depends_on=self.foundation.needs(*ADMIN_API_APIS),
        ), opts=pulumi.ResourceOptions(parent=self))  # newer than IotBridge: no former URN to alias

        # Cloud to edge: a model trained on the warehouse, exported small, rolled out through device configs.
        self.edge_ml = EdgeMl("edge-ml", EdgeMlArgs(
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
            depends_on=[*self.foundation.needs("bigquery.googleapis.com", "storage.googleapis.com",
                                          "iam.googleapis.com",
                                          "iamcredentials.googleapis.com"), self.warehouse.tables["telemetry_raw"],
                        *self.foundation.key_grants("storage.googleapis.com")],
        ), opts=child)

        # What operators look at.
        self.monitoring = Monitoring("monitoring", MonitoringArgs(
            project=cfg.project,
            prefix=cfg.prefix,
            dataflow_job_name=self.pipeline.job.name,
            config_push_function=self.config_push.function.name,
            mqtt_host=self.broker.address.address,
            notification_email=cfg.alert_email or None,
            labels=labels,
            depends_on=self.foundation.needs("monitoring.googleapis.com"),
        ), opts=child)

        if cfg.workbench_enabled:
            self.workbench: Workbench | None = Workbench("workbench", WorkbenchArgs(
                project=cfg.project,
                prefix=cfg.prefix,
                zone=cfg.workbench_zone,
                subnetwork=self.network.subnet,
                dataset_id=self.warehouse.dataset.dataset_id,
                deletion_protection=cfg.deletion_protection,
                idle_timeout_seconds=cfg.workbench_idle_timeout_minutes * 60,
                users=cfg.workbench_users,
                labels=labels,
                depends_on=self.foundation.needs("notebooks.googleapis.com", "compute.googleapis.com",
                                            "bigquery.googleapis.com", "iam.googleapis.com"),
            ), opts=child)

        else:
            self.workbench = None

        self.registry_id = self.broker.registry_id
        self.mqtt_endpoint = self.broker.mqtt_endpoint
        self.http_bridge_url = self.broker.http_bridge_url
        self.mqtt_ca_cert = self.broker.mqtt_ca_cert
        self.topics = {key: topic.name for key, topic in self.messaging.topics.items()}
        self.bigquery_dataset = self.warehouse.dataset.dataset_id
        self.bigtable_instance = self.timeseries.instance.name
        self.bigtable_table = self.timeseries.table.name
        self.dataflow_job_name = self.pipeline.job.name
        self.config_push_function = self.config_push.function.name
        self.admin_api_url = self.admin_api.url
        self.models_bucket = self.edge_ml.bucket.name
        self.models_signer = self.edge_ml.signer.email
        self.dashboard_url = dashboard_url(cfg.project, self.warehouse.dataset.dataset_id, self.warehouse.views)
        self.monitoring_dashboard_url = self.monitoring.dashboard_url
        self.workbench_proxy_uri = self.workbench.proxy_uri if self.workbench else None
        self.register_outputs({
            "registry_id": self.registry_id,
            "mqtt_endpoint": self.mqtt_endpoint,
            "http_bridge_url": self.http_bridge_url,
            "topics": self.topics,
            "bigquery_dataset": self.bigquery_dataset,
            "bigtable_instance": self.bigtable_instance,
            "bigtable_table": self.bigtable_table,
            "dataflow_job_name": self.dataflow_job_name,
            "config_push_function": self.config_push_function,
            "models_bucket": self.models_bucket,
            "models_signer": self.models_signer,
            "dashboard_url": self.dashboard_url,
            "monitoring_dashboard_url": self.monitoring_dashboard_url,
        })

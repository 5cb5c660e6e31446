"""gcp-iot-bridge: Google's IoT reference architecture, one stack per environment (Pulumi.<stack>.yaml).

A thin program over the library: the stack's validated config (nothing is declared if it is wrong), the one
``IotBridge`` component built from it (gcp_iot_bridge/infra/iot_bridge.py), and the stack outputs.
"""

import pulumi

from gcp_iot_bridge.infra import config
from gcp_iot_bridge.infra.iot_bridge import IotBridge, IotBridgeArgs

cfg = config.load()
bridge = IotBridge("gcp-iot-bridge", IotBridgeArgs(config=cfg))

if bridge.workbench_proxy_uri is not None:
    pulumi.export("workbench_proxy_uri", bridge.workbench_proxy_uri)

# Every stack's outputs (docs/outputs.md).
pulumi.export("project_id", cfg.project)
pulumi.export("region", cfg.region)
pulumi.export("registry_id", bridge.registry_id)
pulumi.export("mqtt_endpoint", bridge.mqtt_endpoint)
pulumi.export("http_bridge_url", bridge.http_bridge_url)
pulumi.export("mqtt_ca_cert", bridge.mqtt_ca_cert)
pulumi.export("telemetry_topic", bridge.topics["telemetry"])
pulumi.export("state_topic", bridge.topics["state"])
pulumi.export("config_requests_topic", bridge.topics["config-requests"])
pulumi.export("dead_letter_topic", bridge.topics["dead-letter"])
pulumi.export("device_logs_topic", bridge.topics["device-logs"])
pulumi.export("bigquery_dataset", bridge.bigquery_dataset)
pulumi.export("bigtable_instance", bridge.bigtable_instance)
pulumi.export("bigtable_table", bridge.bigtable_table)
pulumi.export("dataflow_job_name", bridge.dataflow_job_name)
pulumi.export("config_push_function", bridge.config_push_function)
pulumi.export("admin_api_url", bridge.admin_api_url)
pulumi.export("models_bucket", bridge.models_bucket)
pulumi.export("models_signer", bridge.models_signer)
pulumi.export("dashboard_url", bridge.dashboard_url)
pulumi.export("monitoring_dashboard_url", bridge.monitoring_dashboard_url)

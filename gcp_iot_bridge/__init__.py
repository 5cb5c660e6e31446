"""gcp-iot-bridge as a library: ``gcp_iot_bridge.infra`` holds the Pulumi components of the architecture."""

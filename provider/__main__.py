"""The gcp-iot-bridge component provider: hosts ``IotBridge`` for Pulumi programs in other languages.

Pulumi runs this file when a program that added the package (``pulumi package add``) builds an ``IotBridge``; the
schema comes from the component's annotations (``gcp_iot_bridge/infra/provider.py``).
"""

from importlib.metadata import version

from pulumi.provider.experimental import component_provider_host

from gcp_iot_bridge.infra.provider import PROVIDER_NAME, IotBridge

if __name__ == "__main__":
    component_provider_host([IotBridge], name=PROVIDER_NAME, version=version("gcp-iot-bridge"))

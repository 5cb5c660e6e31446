"""The Pulumi components of gcp-iot-bridge: one ``pulumi.ComponentResource`` per logical piece of the architecture
(see each module's docstring), each built from a frozen ``*Args`` dataclass, and ``IotBridge``, which builds them
all from one validated ``StackConfig``.

    from gcp_iot_bridge.infra import IotBridge, IotBridgeArgs, config
    bridge = IotBridge("iot", IotBridgeArgs(config=config.load()))
"""

from gcp_iot_bridge.infra.broker import Broker, BrokerArgs
from gcp_iot_bridge.infra.config import StackConfig
from gcp_iot_bridge.infra.config_push import ConfigPush, ConfigPushArgs
from gcp_iot_bridge.infra.edge_ml import EdgeMl, EdgeMlArgs
from gcp_iot_bridge.infra.foundation import Foundation, FoundationArgs
from gcp_iot_bridge.infra.iot_bridge import IotBridge, IotBridgeArgs
from gcp_iot_bridge.infra.messaging import Messaging, MessagingArgs
from gcp_iot_bridge.infra.monitoring import Monitoring, MonitoringArgs
from gcp_iot_bridge.infra.network import Network, NetworkArgs
from gcp_iot_bridge.infra.pipeline import Pipeline, PipelineArgs
from gcp_iot_bridge.infra.registry_database import FormerBroker, RegistryDatabase, RegistryDatabaseArgs
from gcp_iot_bridge.infra.timeseries import TimeSeries, TimeSeriesArgs
from gcp_iot_bridge.infra.warehouse import Warehouse, WarehouseArgs
from gcp_iot_bridge.infra.workbench import Workbench, WorkbenchArgs

__all__ = [
    "Broker", "BrokerArgs", "ConfigPush", "ConfigPushArgs", "EdgeMl", "EdgeMlArgs", "FormerBroker", "Foundation",
    "FoundationArgs", "IotBridge", "IotBridgeArgs", "Messaging", "MessagingArgs", "Monitoring", "MonitoringArgs",
    "Network", "NetworkArgs", "Pipeline", "PipelineArgs", "RegistryDatabase", "RegistryDatabaseArgs", "StackConfig",
    "TimeSeries", "TimeSeriesArgs", "Warehouse", "WarehouseArgs", "Workbench", "WorkbenchArgs",
]

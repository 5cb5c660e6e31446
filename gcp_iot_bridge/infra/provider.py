"""IotBridge as a Pulumi component provider: the whole architecture for programs in any Pulumi language.

Pulumi's Python component providers (``pulumi.provider.experimental``) read a component's schema from its type
annotations. ``IotBridge`` here takes the stack configuration keys themselves (``project``, ``region``,
``prefix``, ``deletionProtection``, ``bigtableZones``, ... as in Pulumi.yaml) and validates them with the same
``config.parse`` as a stack of this repository, then builds ``gcp_iot_bridge.infra.IotBridge``. Its outputs are
that component's. ``provider/__main__.py`` hosts it; the README says how another language uses it.

No ``from __future__ import annotations`` here: the analyzer reads annotations as objects, not strings.
"""

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Required, TypedDict

import pulumi

from gcp_iot_bridge.infra import config
from gcp_iot_bridge.infra.iot_bridge import IotBridge as _IotBridge
from gcp_iot_bridge.infra.iot_bridge import IotBridgeArgs

PROVIDER_NAME = "gcp-iot-bridge"
_PYTHON_TYPES: dict[str, Any] = {"string": str, "integer": int, "boolean": bool, "array": list[str]}

# One property per config key, typed as Pulumi.yaml types it (config.KEYS), named by its StackConfig field: the
# schema's camelCase of a field is the key's own name. Built from KEYS so that the two cannot differ; a type
# checker, which cannot follow a TypedDict built at run time, sees the mapping it is.
if TYPE_CHECKING:
    IotBridgeConfig = Mapping[str, Any]
else:
    IotBridgeConfig = TypedDict("IotBridgeConfig", {
        key.field: Required[_PYTHON_TYPES[key.kind]] if key.required else _PYTHON_TYPES[key.kind]
        for key in config.KEYS
    }, total=False)


def _text(value: object) -> str:
    """A value as the Pulumi CLI passes a config value: booleans lower-case, lists as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


class IotBridge(_IotBridge):
    """The whole gcp-iot-bridge architecture (MQTT bridge, Pub/Sub, Dataflow, BigQuery, Bigtable, config push,
    edge ML, monitoring) from the stack configuration keys of gcp-iot-bridge."""

    def __init__(self, name: str, args: IotBridgeConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        raw = {config.KEY_BY_FIELD[field].key: _text(value) for field, value in dict(args).items()
               if value is not None}
        super().__init__(name, IotBridgeArgs(config=config.parse(raw, pulumi.get_stack())), opts)

"""The IoT-Core-compatible MQTT bridge: a TLS front that authenticates devices, Mosquitto, and the bridge
service that forwards to Pub/Sub. See :mod:`iotbridge.bridge.front`, :mod:`iotbridge.bridge.service` and
:mod:`iotbridge.bridge.stack` (``start_bridge_stack``)."""

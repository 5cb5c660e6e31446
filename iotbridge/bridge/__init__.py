"""The IoT-Core-compatible MQTT bridge as a broker host runs it: the TLS front that authenticates devices,
Mosquitto's configuration, and the bridge service that forwards to Pub/Sub. See :mod:`iotbridge.bridge.front` and
:mod:`iotbridge.bridge.service`; :mod:`iotbridge.local.broker_host` runs one host on this machine."""

"""gcp-iot-bridge data plane: device registry, MQTT bridge, device SDK, operator CLI and local stack.

Nothing here imports Pulumi; the Pulumi program in ``infra/`` reads only descriptions from here (:mod:`iotbridge.spec`,
the one description of topics, subscriptions and tables shared with the local stack, the dashboard link and the
edge model's SQL). Which part may import which: docs/architecture.md.
"""

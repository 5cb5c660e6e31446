"""Dataflow jobs of gcp-iot-bridge: the streaming telemetry pipeline (:mod:`dataflow_jobs.telemetry_pipeline`)
and its Flex Template packaging (``Dockerfile``, ``metadata.json``). No Pulumi here."""

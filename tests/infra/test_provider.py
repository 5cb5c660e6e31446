"""IotBridge as a component provider: the schema Pulumi infers offline, and a construct through it under mocks.

Both run in a child process, as the provider itself does: pulumi.provider's gRPC modules register
``google.rpc.Status`` in protobuf's default pool, which googleapis-common-protos (loaded by other tests through
the Google Cloud clients) registers too, and one process refuses the second registration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from gcp_iot_bridge.infra import config
from tests.infra import harness

TOKEN = "gcp-iot-bridge:index:IotBridge"

_SCHEMA = """
from pulumi.provider.experimental.component import ComponentProvider
from gcp_iot_bridge.infra.provider import PROVIDER_NAME, IotBridge
print(ComponentProvider([IotBridge], PROVIDER_NAME).schema)
"""

_CONSTRUCT = """
import json, sys
from pulumi.provider.experimental.component import ComponentProvider
from gcp_iot_bridge.infra.provider import PROVIDER_NAME, IotBridge
from tests.infra import harness
provider = ComponentProvider([IotBridge], PROVIDER_NAME)
inputs = json.loads(sys.argv[1])
run = harness.run_program("dev", program=lambda: provider.construct("gcp-iot-bridge", sys.argv[2], inputs, None))
print(json.dumps(sorted(r.urn for r in run.resources)))
"""


def child(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=harness.ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(harness.ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_schema_takes_the_stack_config_keys_and_gives_the_bridges_outputs():
    resource = json.loads(child(_SCHEMA))["resources"][TOKEN]
    inputs = resource["inputProperties"]
    # Exactly the keys of Pulumi.yaml (the project's, by their own names) plus gcp:project and gcp:region.
    declared = yaml.safe_load((harness.ROOT / "Pulumi.yaml").read_text())["config"]
    assert set(inputs) == {*declared, "project", "region"}
    for key in config.KEYS:
        name = key.key.partition(":")[2]
        assert inputs[name]["type"] == key.kind, name  # Pulumi.yaml's type names are the schema's
        assert inputs[name].get("plain") is True, name  # validated when built, as a stack's config is
        if key.kind == "array":
            assert inputs[name]["items"]["type"] == "string", name
    assert sorted(resource["requiredInputs"]) == sorted(k.key.partition(":")[2] for k in config.KEYS if k.required)
    assert set(resource["properties"]) == {
        "registryId", "mqttEndpoint", "httpBridgeUrl", "mqttCaCert", "topics", "bigqueryDataset", "bigtableInstance",
        "bigtableTable",
        "dataflowJobName", "configPushFunction", "adminApiUrl", "modelsBucket", "modelsSigner", "dashboardUrl",
        "monitoringDashboardUrl", "workbenchProxyUri"}
    assert resource["isComponent"] is True


def test_a_construct_through_the_provider_declares_what_the_program_does():
    raw = harness.stack_config("dev")
    parsed = config.parse(raw, "dev")
    inputs = {}
    for key in config.KEYS:
        if raw.get(key.key) in (None, ""):
            continue
        value = getattr(parsed, key.field)
        if key.field == "labels":
            value = [f"{k}={v}" for k, v in value.items()]
        inputs[key.key.partition(":")[2]] = list(value) if isinstance(value, tuple) else value

    urns = json.loads(child(_CONSTRUCT, json.dumps(inputs), TOKEN))
    assert urns == sorted(r.urn for r in harness.stack_run("dev").resources)

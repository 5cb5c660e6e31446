"""The mock harness itself: it must wait for everything and surface failures that happen inside outputs."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
import pytest

from tests.infra import harness


def test_an_exception_inside_an_apply_fails_the_run() -> None:
    def program() -> None:
        topic = gcp.pubsub.Topic("t", name="iot-x-telemetry")

        def explode(name: str) -> str:
            raise RuntimeError(f"boom in apply for {name}")

        pulumi.export("broken", topic.name.apply(explode))

    with pytest.raises(harness.ProgramFailed, match="boom in apply for iot-x-telemetry"):
        harness.run_program("dev", program=program)


def test_a_resource_declared_inside_an_apply_is_waited_for() -> None:
    def program() -> None:
        topic = gcp.pubsub.Topic("t", name="iot-x-telemetry")
        topic.name.apply(lambda n: gcp.pubsub.Topic("late", name=f"{n}-late"))

    run = harness.run_program("dev", program=program)
    assert run.one("gcp:pubsub/topic:Topic", "late").get("name") == "iot-x-telemetry-late"


def test_outputs_are_resolved_to_plain_values() -> None:
    def program() -> None:
        topic = gcp.pubsub.Topic("t", name="iot-x-telemetry")
        pulumi.export("id", topic.id)
        pulumi.export("nested", {"name": topic.name, "n": 3})

    run = harness.run_program("dev", program=program)
    assert run.outputs == {"id": "projects/my-iot-dev-project/topics/iot-x-telemetry",
                           "nested": {"name": "iot-x-telemetry", "n": 3}}


CONTRACT_OUTPUTS = {  # docs/outputs.md
    "project_id", "region", "registry_id", "mqtt_endpoint", "http_bridge_url", "mqtt_ca_cert", "telemetry_topic",
    "state_topic", "config_requests_topic", "dead_letter_topic", "device_logs_topic", "bigquery_dataset",
    "bigtable_instance", "bigtable_table", "dataflow_job_name", "config_push_function", "admin_api_url",
    "models_bucket", "dashboard_url", "monitoring_dashboard_url",
}


def test_whole_program_exports_every_contract_output() -> None:
    for stack in harness.STACKS:
        outputs = harness.stack_run(stack).outputs
        assert CONTRACT_OUTPUTS <= set(outputs)
        assert set(outputs) - CONTRACT_OUTPUTS == {"models_signer"}
        assert all(isinstance(v, str) and v for v in outputs.values()), outputs
        assert outputs["mqtt_endpoint"].endswith(":8883")
        assert outputs["http_bridge_url"].startswith("https://") and outputs["http_bridge_url"].endswith(":8443")
        assert outputs["registry_id"] == f"{harness.stack_config(stack)['gcp-iot-bridge:prefix']}-registry"


def test_runs_do_not_leak_into_each_other() -> None:
    a = harness.run_program("dev")
    b = harness.run_program("prod")
    assert {r.urn.split("::")[0] for r in b.resources} == {"urn:pulumi:prod"}
    assert len(a.resources) == len(harness.run_program("dev").resources)


def test_config_reaches_the_program_as_the_cli_passes_it() -> None:
    raw = harness.stack_config("prod", {"bigtableMaxNodes": 7, "labels": None})
    assert raw["gcp-iot-bridge:bigtableMaxNodes"] == "7"
    assert raw["gcp-iot-bridge:deletionProtection"] == "true"
    assert raw["gcp-iot-bridge:bigtableZones"] == '["europe-west1-b", "europe-west1-c"]'
    assert "gcp-iot-bridge:labels" not in raw
    assert raw["gcp-iot-bridge:bigqueryDataset"] == "iot"  # a Pulumi.yaml default, as the CLI fills it in


def test_other_data_sources_can_be_answered_and_unknown_ones_fail_loudly() -> None:
    def program() -> None:
        zones = gcp.compute.get_zones_output(region="us-central1")
        pulumi.export("zones", zones.names)

    token = "gcp:compute/getZones:getZones"
    run = harness.run_program("dev", program=program,
                              invokes={token: lambda args: {"names": [f"{args['region']}-a"], "id": "z"}})
    assert run.outputs["zones"] == ["us-central1-a"]
    with pytest.raises(harness.ProgramFailed, match="no mock for invoke gcp:compute/getZones"):
        harness.run_program("dev", program=program)


def test_program_imports_resolve_as_under_the_pulumi_language_host(tmp_path) -> None:
    # Pulumi puts only the program directory (infra/) on sys.path and runs from there; iotbridge must come from
    # the project's install, not from the repository root being on the path.
    import subprocess
    import sys

    root, infra = str(harness.ROOT), str(harness.ROOT / "infra")
    code = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {root!r})]; sys.path.insert(0, {infra!r}); "
            "import gcp_iot_bridge.infra.config, gcp_iot_bridge.infra.iot_bridge, iotbridge.spec; "
            "print(iotbridge.spec.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=harness.ROOT / "infra", capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("iotbridge/spec.py")

"""gcp_iot_bridge/infra/config.py: typed, validated stack config; bad values fail before any resource, in one line
naming the key."""

from __future__ import annotations

import pytest
import yaml

from gcp_iot_bridge.infra import config
from tests.infra import harness


def parse(stack: str, overrides: dict | None = None) -> config.StackConfig:
    return config.parse(harness.stack_config(stack, overrides), stack)


# ----------------------------------------------------------------------------------------- the stack files


def test_each_stack_file_is_valid_and_sets_its_teardown_switch() -> None:
    dev, prod, demo = parse("dev"), parse("prod"), parse("demo")
    assert (dev.deletion_protection, prod.deletion_protection, demo.deletion_protection) == (False, True, False)
    assert (dev.prefix, prod.prefix, demo.prefix) == ("iot-dev", "iot-prod", "iot-demo")
    assert demo.bigquery_table_expiration_days > 0, "demo data must expire on its own"
    assert dev.bigquery_table_expiration_days == 0 and prod.bigquery_table_expiration_days == 0
    assert len(prod.bigtable_zones) >= 2, "prod Bigtable replicates"
    assert prod.all_labels["env"] == "prod" and prod.all_labels["stack"] == "prod"


def test_pulumi_yaml_runs_the_program_in_infra_with_the_project_venv() -> None:
    project = yaml.safe_load((harness.ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == config.PROJECT
    assert project["runtime"] == {"name": "python", "options": {"virtualenv": ".venv"}}
    assert project["main"] == "infra/"


def test_pulumi_yaml_schema_matches_config_py() -> None:
    schema = yaml.safe_load((harness.ROOT / "Pulumi.yaml").read_text())["config"]
    project_keys = {k.key.split(":", 1)[1]: k for k in config.KEYS if k.key.startswith(f"{config.PROJECT}:")}
    assert set(schema) == set(project_keys), "Pulumi.yaml and config.KEYS list different keys"
    fields = config.StackConfig.model_fields
    for name, key in project_keys.items():
        entry = schema[name]
        assert entry["type"] == key.kind, name
        assert entry.get("description"), name
        if key.required or key.deprecated:
            # A schema default would hide a missing value, or set a deprecated key in every stack.
            assert "default" not in entry, f"{name} is required or deprecated: no schema default"
            continue
        default = fields[key.field].get_default(call_default_factory=True)
        if key.field == "labels":
            assert entry["default"] == [f"{k}={v}" for k, v in default.items()]
        else:
            assert entry["default"] == (list(default) if isinstance(default, tuple) else default), name


def test_stack_files_only_use_known_keys() -> None:
    for stack in harness.STACKS:
        data = yaml.safe_load((harness.ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
        unknown = [k for k in data if k not in config.KEY_BY_NAME]
        assert not unknown, f"Pulumi.{stack}.yaml: {unknown}"


# --------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("override", "key", "fragment"), [
    ({"bigtableMaxNodes": 0}, "gcp-iot-bridge:bigtableMaxNodes", "greater than or equal to 1"),
    ({"bigtableMinNodes": 2, "bigtableMaxNodes": 1}, "gcp-iot-bridge:bigtableMaxNodes", "less than bigtableMinNodes"),
    ({"bigtableMinNodes": 1, "bigtableMaxNodes": 11}, "gcp-iot-bridge:bigtableMaxNodes", "10 x bigtableMinNodes"),
    ({"gcp:region": "us-centrall"}, "gcp:region", "did you mean us-central1"),
    ({"gcp:region": "moon-base1"}, "gcp:region", "not a GCP region"),
    ({"bigtableCpuTarget": 90}, "gcp-iot-bridge:bigtableCpuTarget", "less than or equal to 80"),
    ({"pubsubMaxDeliveryAttempts": 4}, "gcp-iot-bridge:pubsubMaxDeliveryAttempts", "greater than or equal to 5"),
    ({"pubsubMessageRetentionSeconds": 60}, "gcp-iot-bridge:pubsubMessageRetentionSeconds",
     "greater than or equal to 600"),
    ({"bigtableStorageType": "ssd"}, "gcp-iot-bridge:bigtableStorageType", "'SSD' or 'HDD'"),
    ({"bigtableMaxNodes": "three"}, "gcp-iot-bridge:bigtableMaxNodes", "not an integer"),
    ({"deletionProtection": "yes"}, "gcp-iot-bridge:deletionProtection", "not a boolean"),
    ({"deletionProtection": None}, "gcp-iot-bridge:deletionProtection", "required"),
    ({"gcp:project": None}, "gcp:project", "required"),
    ({"prefix": "IoT_Dev"}, "gcp-iot-bridge:prefix", "not a valid name prefix"),
    ({"prefix": "a-prefix-that-is-too-long"}, "gcp-iot-bridge:prefix", "not a valid name prefix"),
    ({"bigtableZones": ["europe-west1-b"]}, "gcp-iot-bridge:bigtableZones", "not in gcp:region=us-central1"),
    ({"bigtableZones": []}, "gcp-iot-bridge:bigtableZones", "0 zones given"),
    ({"bigtableZones": ["us-central1-b", "us-central1-b"]}, "gcp-iot-bridge:bigtableZones", "repeat"),
    ({"bigqueryLocation": "Mars"}, "gcp-iot-bridge:bigqueryLocation", "not a BigQuery location"),
    ({"bigqueryDataset": "iot-data"}, "gcp-iot-bridge:bigqueryDataset", "not a BigQuery dataset id"),
    ({"labels": ["Env=dev"]}, "gcp-iot-bridge:labels", "not a valid GCP label key"),
    ({"labels": ["env"]}, "gcp-iot-bridge:labels", "is not key=value"),
    ({"bigtableMaxNode": 5}, "gcp-iot-bridge:bigtableMaxNode", "did you mean gcp-iot-bridge:bigtableMaxNodes"),
    ({"pipelinePayloadProfiles": '{"default": ["xml"]}'}, "gcp-iot-bridge:pipelinePayloadProfiles",
     "default[0]: profile 'xml' is not one of telemetry-v1, json, raw"),
    ({"pipelinePayloadProfiles": '{"subfolders": {"fleet": ["raw"]}}'}, "gcp-iot-bridge:pipelinePayloadProfiles",
     "subfolders: 'fleet' is not registry/subfolder"),
    ({"pipelinePayloadProfiles": "json"}, "gcp-iot-bridge:pipelinePayloadProfiles", "not JSON"),
])
def test_bad_value_fails_in_one_line_naming_the_key(override: dict, key: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse("dev", override)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config {key}"), message
    assert fragment in message, message
    assert "allowed:" in message, message


@pytest.mark.parametrize("override", [{"bigtableMaxNodes": 0}, {"gcp:region": "us-central"}])
def test_bad_config_fails_the_program_before_any_resource_is_declared(override: dict) -> None:
    with pytest.raises(harness.ProgramFailed) as err:
        harness.run_program("dev", override)
    assert isinstance(err.value.__cause__, config.ConfigError)
    assert err.value.resources == [], "resources were declared before config was validated"


def test_config_error_is_a_pulumi_run_error_so_pulumi_prints_one_line() -> None:
    import pulumi

    assert issubclass(config.ConfigError, pulumi.RunError)


def test_region_list_holds_real_regions_only() -> None:
    assert {"us-central1", "europe-west1", "asia-northeast1", "australia-southeast1"} <= config.GCP_REGIONS
    assert not {"us-central", "europe-west", "us-central1-a", "global", "US"} & config.GCP_REGIONS


def test_readme_documents_every_key() -> None:
    readme = (harness.ROOT / "README.md").read_text()
    for key in config.KEYS:
        short = key.key.removeprefix(f"{config.PROJECT}:")
        assert f"| `{short}` |" in readme, f"README config table lacks {short}"


def test_misspelt_key_fails_the_program_too() -> None:
    # Through pulumi.Config and the runtime's config, not only parse(): a typo must not fall back to a default.
    with pytest.raises(harness.ProgramFailed, match="unknown key .did you mean gcp-iot-bridge:bigtableMaxNodes"):
        harness.run_program("dev", {"bigtableMaxNode": 5})


# ------------------------------------------------------------------------------------------- broker hosts


def test_broker_hosts_are_bounded_by_the_autoscaler_and_gcps_group_limit() -> None:
    dev = parse("dev")
    assert (dev.broker_min_hosts, dev.broker_max_hosts) == (2, 10)
    wide = parse("prod", {"brokerMinHosts": 3, "brokerMaxHosts": 2000})
    assert (wide.broker_min_hosts, wide.broker_max_hosts) == (3, 2000)
    for overrides, fragment in (({"brokerMaxHosts": 2001}, "brokerMaxHosts=2001: Input should be less than or "
                                                            "equal to 2000"),
                                ({"brokerMinHosts": 0}, "brokerMinHosts=0: Input should be greater than or equal to 1"),
                                ({"brokerMinHosts": 5, "brokerMaxHosts": 4}, "less than brokerMinHosts=5"),
                                ({"brokerMachineType": "n9-mega-2"}, "unknown machine type 'n9-mega-2'")):
        with pytest.raises(config.ConfigError, match=fragment):
            parse("dev", overrides)


def test_who_authenticates_devices_is_front_unless_the_stack_picks_mosquitto() -> None:
    assert parse("dev").broker_device_auth == "front"
    assert parse("dev", {"brokerDeviceAuth": "mosquitto"}).broker_device_auth == "mosquitto"
    with pytest.raises(config.ConfigError, match=r"brokerDeviceAuth=plugin: Input should be 'front' or 'mosquitto'; "
                                                 r"allowed: front \(the TLS front"):
        parse("dev", {"brokerDeviceAuth": "plugin"})
    # The stack's choices are the broker host's (BridgeSettings.device_auth checks against the same list).
    from typing import get_args

    from iotbridge import spec

    assert get_args(config.StackConfig.model_fields["broker_device_auth"].annotation) == spec.DEVICE_AUTH_MODES


def test_the_deprecated_fixed_host_count_still_works_and_says_what_to_set() -> None:
    raw = harness.stack_config("dev", {"brokerHosts": 6})
    cfg = config.parse(raw, "dev")
    assert (cfg.broker_min_hosts, cfg.broker_max_hosts) == (6, 6)  # more than the old cap of 4
    assert config.deprecations(raw) == [
        "config gcp-iot-bridge:brokerHosts is deprecated: set brokerMinHosts and brokerMaxHosts instead "
        "(gcp-iot-bridge:brokerHosts=6 is read as both set to 6)"]
    assert config.deprecations(harness.stack_config("dev")) == []
    with pytest.raises(config.ConfigError, match="brokerHosts=6: deprecated, and gcp-iot-bridge:brokerMaxHosts is "
                                                 "set too"):
        # The schema's defaults fill brokerMinHosts and brokerMaxHosts in every stack; a value of its own counts.
        config.parse({**raw, "gcp-iot-bridge:brokerMaxHosts": "8"}, "dev")

"""The local stack starts the pipeline with the payload profiles it is given, as the cloud's stack key does."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dataflow_jobs.telemetry_pipeline import parse_args
from iotbridge import cli, spec
from iotbridge.local import provision
from iotbridge.local.stack import LocalStack, StackError, pipeline_flags

PROFILES = json.dumps({"registries": {"plant": [{"profile": "json", "time_field": "meta.at"}]},
                       "subfolders": {"fleet/blobs": ["raw"]}})


def test_the_local_pipeline_gets_the_profiles_as_its_flag():
    flags = pipeline_flags(provision.LocalNames(), "http://127.0.0.1:9050", PROFILES)
    settings, _ = parse_args(flags)
    assert settings.profiles == spec.parse_payload_profiles(PROFILES)
    assert settings.profiles.for_message("fleet", "blobs") == (spec.Profile("raw"),)
    # Without profiles the pipeline flag is left out: the pipeline's default (telemetry-v1, then json).
    default, _ = parse_args(pipeline_flags(provision.LocalNames(), "http://127.0.0.1:9050"))
    assert default.profiles == spec.PayloadProfiles()


def test_bad_profiles_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(StackError, match=r"payload profiles: default\[0\]: profile 'xml'"):
        LocalStack(tmp_path, payload_profiles='{"default": ["xml"]}')
    assert not (tmp_path / "state.json").exists()
    result = CliRunner().invoke(cli.app, ["local", "up", "--payload-profiles", '{"default": []}'],
                                env={"IOT_LOCAL_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert "payload profiles: default: must be a non-empty list" in result.output

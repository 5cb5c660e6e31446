"""iotbridge/cliutil.py: the output and failures every `iotctl` command shares, `iotctl models` included."""

from __future__ import annotations

import json
import os

import pytest
import typer
from typer.testing import CliRunner

from iotbridge import cliutil
from iotbridge.cli import app
from iotbridge.targets import TargetError


def command(body):  # noqa: ANN001
    """A one-command typer app running ``body(as_json)``."""
    one = typer.Typer()

    @one.command()
    def main(as_json: cliutil.JsonFlag = False) -> None:
        body(as_json)

    return one


def test_emit_prints_json_with_the_flag_and_the_human_line_without():
    data = {"id": "pump-1", "n": 2}
    assert json.loads(CliRunner().invoke(command(lambda j: cliutil.emit(data, j, "human")), ["--json"]).stdout) == data
    assert CliRunner().invoke(command(lambda j: cliutil.emit(data, j, "human")), []).stdout == "human\n"
    assert json.loads(CliRunner().invoke(command(lambda j: cliutil.emit(data, j)), []).stdout) == data


def test_fail_is_one_line_on_stderr_or_json_on_stdout_with_its_exit_code():
    def body(as_json: bool) -> None:
        cliutil.fail("first\n  second", as_json, code=3)

    plain = CliRunner().invoke(command(body), [])
    assert (plain.exit_code, plain.stdout, plain.stderr) == (3, "", "error: first second\n")
    as_json = CliRunner().invoke(command(body), ["--json"])
    assert (as_json.exit_code, as_json.stderr) == (3, "")
    assert json.loads(as_json.stdout) == {"error": "first second"}


def test_or_fail_returns_the_value_fails_on_the_listed_errors_and_lets_others_through():
    assert cliutil.or_fail(False, int, "7") == 7
    with pytest.raises(typer.Exit):
        cliutil.or_fail(False, int, "seven")
    with pytest.raises(ValueError):
        cliutil.or_fail(False, int, "seven", errors=(TypeError,))


def test_first_line_of_an_exception_or_its_type():
    assert cliutil.first_line(RuntimeError("broken\nmore detail")) == "broken"
    assert cliutil.first_line(RuntimeError()) == "RuntimeError"


def test_target_or_fail_applies_the_targets_environment(monkeypatch):
    from iotbridge.targets import Target

    t = Target(kind="local", name="local", project_id="p", region="us-central1", registry_id="r", mqtt_host=None,
               mqtt_port=None, mqtt_ca_cert=None, topics={}, bigquery_dataset="iot",
               env={"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"})
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(cliutil, "resolve", lambda stack: t)
    assert cliutil.target_or_fail(None, False) is t
    assert os.environ["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:1"


@pytest.mark.parametrize("args", [
    ["devices", "list"],
    ["models", "train", "--metrics", "temperature", "--model-version", "v1"],
    ["models", "deploy", "--uri", "file:///m.json", "--model-version", "v1", "--all"],
    ["models", "status"],
], ids=" ".join)
def test_no_target_is_one_error_line_for_iotctl_and_iotctl_models(monkeypatch, args):
    def no_target(stack):  # noqa: ANN001
        raise TargetError("no local stack is running")

    monkeypatch.setattr(cliutil, "resolve", no_target)
    plain = CliRunner().invoke(app, args)
    assert (plain.exit_code, plain.stdout, plain.stderr) == (1, "", "error: no local stack is running\n")
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert (as_json.exit_code, as_json.stdout) == (1, '{"error": "no local stack is running"}\n')

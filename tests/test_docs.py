"""docs/ says what the code does: every value a page lists that the code defines is checked against the code.

docs/cli.md is generated from the typer app: ``.venv/bin/python -m tests.test_docs`` rewrites it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from dataflow_jobs import telemetry
from iotbridge import spec, targets
from iotbridge.bridge import front, mqtt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FUNCTION = ROOT / "functions" / "config_push" / "main.py"
FANOUT = ROOT / "iotbridge" / "bridge" / "fanout.py"
SERVICE = ROOT / "iotbridge" / "bridge" / "service.py"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        out.append(line)
    return "\n".join(out)


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: its rows (header first, the separator left out) as lists of cells."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def table(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the one table whose first header cell is ``first_header``."""
    found = [t for t in tables(text) if t[0][0] == first_header]
    assert len(found) == 1, f"expected one table headed {first_header!r}, found {len(found)}"
    return found[0][1:]


def code(cell: str) -> list[str]:
    """The `code spans` of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def first_code(rows: list[list[str]], column: int = 0) -> list[str]:
    return [code(r[column])[0] for r in rows]


def literal(path: Path, name: str) -> Any:
    """The value of a module-level ``NAME = <literal>`` of ``path``, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            names, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            names, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in names):
            return ast.literal_eval(value)
    raise AssertionError(f"{path} defines no {name}")


def function_node(path: Path, name: str, cls: str | None = None) -> ast.FunctionDef:
    """The function ``name`` of ``path`` (a method of class ``cls`` when given)."""
    scope: ast.AST = ast.parse(path.read_text())
    if cls is not None:
        scope = next(n for n in ast.walk(scope) if isinstance(n, ast.ClassDef) and n.name == cls)
    for node in ast.walk(scope):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{path} defines no function {name}")


# ------------------------------------------------------------------------------------------ "Defined by" tables

_UNITS = {"KiB": 1024, "h": 3600, "min": 60, "s": 1}


def resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def documented_value(cell: str, actual: Any) -> Any:
    """The value a doc cell states, in the form of the code's ``actual`` value."""
    if isinstance(actual, re.Pattern):
        return re.compile(code(cell)[0])
    if isinstance(actual, (tuple, list)):
        return tuple(v.strip() for v in code(cell)[0].split(","))
    if isinstance(actual, dict):  # CONNACK codes: "4 (0x86): ..." -> {MQTT 3.1.1: 4, MQTT 5: 0x86}
        m = re.match(r"(\d+) \((0x[0-9a-f]+)\)", cell)
        assert m, f"{cell!r} is not 'N (0xNN)'"
        return {mqtt.MQTT_311: int(m[1]), mqtt.MQTT_5: int(m[2], 16)}
    m = re.fullmatch(r"([\d,]+)(?: (KiB|h|min|s))?", cell)
    assert m, f"{cell!r} is not a number with an optional unit"
    return int(m[1].replace(",", "")) * _UNITS.get(m[2] or "", 1)


def defined_by_rows(text: str) -> list[tuple[str, str]]:
    """(value cell, dotted name) of every table whose last column is "Defined by"."""
    rows = []
    for t in tables(text):
        if t[0][-1] == "Defined by":
            rows += [(r[-2], code(r[-1])[0]) for r in t[1:]]
    return rows


DEFINED_BY = [(name, row) for name in ("device-protocol.md", "messages.md") for row in defined_by_rows(page(name))]


def test_the_pages_have_defined_by_values():
    assert len(DEFINED_BY) >= 15


@pytest.mark.parametrize(("name", "row"), DEFINED_BY, ids=[r[1] for _, r in DEFINED_BY])
def test_each_value_a_page_lists_is_the_codes(name: str, row: tuple[str, str]):
    cell, dotted = row
    actual = resolve(dotted)
    stated = documented_value(cell, actual)
    if isinstance(actual, re.Pattern):
        assert stated.pattern == actual.pattern, f"docs/{name}: {dotted}"
    elif isinstance(actual, (tuple, list)):
        assert stated == tuple(actual), f"docs/{name}: {dotted}"
    else:
        assert stated == actual, f"docs/{name}: {dotted} is {actual!r}, the page says {cell!r}"


# ------------------------------------------------------------------------------------------ device protocol


def test_the_topics_a_device_may_use_are_the_fronts():
    rows = table(page("device-protocol.md"), "Direction")
    assert {r[0] for r in rows} == {"publish", "subscribe"}
    for direction, topic_cell, *_ in rows:
        topic = code(topic_cell)[0].format(device="pump-1", subfolder="logs")
        if direction == "publish":
            assert front.topic_kind(topic, "pump-1") is not None, topic
            assert front.topic_kind(topic.replace("pump-1", "pump-2", 1), "pump-1") is None, topic
        else:
            assert front.subscription_allowed(topic, "pump-1"), topic
            assert not front.subscription_allowed(topic.replace("pump-1", "pump-2", 1), "pump-1"), topic


# ------------------------------------------------------------------------------------------ Pub/Sub


def test_topics_and_subscriptions_are_the_specs():
    text = page("messages.md")
    assert first_code(table(text, "Topic key")) == list(spec.TOPICS)
    rows = table(text, "Subscription key")
    assert first_code(rows) == list(spec.SUBSCRIPTIONS)
    for key, topic, kind, dead_letter, deadline, _ in rows:
        s = spec.SUBSCRIPTIONS[code(key)[0]]
        assert (code(topic)[0], kind, dead_letter, deadline) == \
               (s.topic, s.kind, "yes" if s.dead_letter else "no", f"{s.ack_deadline_seconds} s"), s.key


def _forwarded_attributes() -> set[str]:
    """The attribute names the bridge service sets when it forwards a device message."""
    fn = function_node(SERVICE, "_forward")
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "deviceId" for k in node.keys):
            names |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and isinstance(node.slice, ast.Constant):
            names.add(node.slice.value)
    return names


def test_device_message_attributes_are_the_ones_the_bridge_sets():
    documented = first_code(table(section(page("messages.md"), "## Device messages: telemetry, state, device logs"),
                                  "Attribute"))
    assert tuple(documented) == spec.ATTRIBUTES
    assert set(documented) == _forwarded_attributes()


def test_telemetry_example_is_accepted_and_reject_reasons_are_the_pipelines():
    text = section(page("messages.md"), "## Telemetry payload")
    example = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert example
    reading = telemetry.parse(example[1].encode(), {"deviceId": "pump-1"}, "m-1", 0)
    assert reading.seq == 42 and set(reading.metrics) == {"temperature", "rpm"}
    assert first_code(table(text, "Reason")) == list(telemetry.REASONS)
    assert first_code(table(text, "Profile reason")) == list(telemetry.PROFILE_REASONS)
    assert first_code(table(text, "Pipeline reason")) == list(telemetry.PIPELINE_REASONS)


def test_config_request_fields_are_the_shared_descriptions():
    from iotbridge import spec

    text = section(page("messages.md"), "## Config request (topic `config-requests`)")
    assert set(first_code(table(text, "Field"))) == set(spec.CONFIG_REQUEST_FIELDS)
    aliases = set(re.findall(r"`(\w+)`", text.split("IoT Core's field names", 1)[1].split("are accepted", 1)[0]))
    assert aliases == set(spec.CONFIG_REQUEST_ALIASES)
    example = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert example and set(json.loads(example[1])) <= set(spec.CONFIG_REQUEST_FIELDS)


def test_fanout_attributes_are_the_shared_descriptions():
    from iotbridge import spec

    text = section(page("messages.md"), "## Fan-out message (topic `device-commands`)")
    documented = set(re.findall(r"attribute `(\w+)`", text))
    config = spec.FanoutMessage(spec.FANOUT_KIND_CONFIG, "dev-1", 3, registry_id="r", host_id="h").attributes()
    command = spec.FanoutMessage(spec.FANOUT_KIND_COMMAND, "dev-1", sub_folder="ops", registry_id="r",
                                 host_id="h").attributes()
    assert documented == set(config) | set(command)
    kinds = re.search(r"attribute `kind`: `(\w+)` or `(\w+)`", text)
    assert kinds and set(kinds.groups()) == {spec.FANOUT_KIND_CONFIG, spec.FANOUT_KIND_COMMAND}


def _permanent_reasons() -> set[str]:
    tree = ast.parse(FUNCTION.read_text())
    reasons = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PermanentError":
            first = node.args[0]  # a name: a value of _PERMANENT, below
            if isinstance(first, ast.Constant):
                reasons.add(first.value)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_PERMANENT" for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            reasons |= {v.value for v in node.value.values if isinstance(v, ast.Constant)}
    # The request's format is the shared description's: its parser's reasons are the function's too.
    spec_tree = ast.parse((ROOT / "iotbridge" / "spec.py").read_text())
    parser = next(n for n in ast.walk(spec_tree) if isinstance(n, ast.FunctionDef) and n.name == "parse_config_request")
    for node in ast.walk(parser):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MessageError":
            first = node.args[0]
            if isinstance(first, ast.Constant):
                reasons.add(first.value)
    return reasons


def test_dead_letter_attributes_and_reasons_are_the_functions():
    text = section(page("messages.md"), "## Dead letters (topic `dead-letter`)")
    send = function_node(FUNCTION, "send", cls="PubsubDeadLetter")
    attrs = {k.value for node in ast.walk(send) if isinstance(node, ast.Dict)
             for k in node.keys if isinstance(k, ast.Constant)}
    assert set(first_code(table(text, "Attribute"))) == attrs
    dropped = set(re.findall(r"the reason `(\w+)` and dropped", " ".join(text.split())))
    assert set(first_code(table(text, "Reason (`error`)"))) | dropped == _permanent_reasons()


# ------------------------------------------------------------------------------------------ storage


def test_tables_columns_and_layout_are_the_specs():
    text = page("storage.md")
    documented = re.findall(r"^### `(\w+)`$", text, re.M)
    assert documented == list(spec.TABLES)
    for name, t in spec.TABLES.items():
        part = section(text, f"### `{name}`")
        rows = table(part, "Column")
        assert [(code(c)[0], ty.split()[0], mode) for c, ty, mode, _ in rows] == \
               [(c.name, c.type, c.mode) for c in t.columns], name
        for (_, ty, *_), col in zip(rows, t.columns, strict=True):
            assert code(ty) == [f.name for f in col.fields], f"{name}.{col.name} fields"
        layout = re.search(r"^Partitioned by `(\w+)`(?:, clustered by (.*))?\.$", part, re.M)
        assert layout, name
        assert (layout[1], tuple(code(layout[2] or ""))) == (t.partition_field, t.clustering), name


def test_views_are_the_specs():
    assert first_code(table(page("storage.md"), "View")) == list(spec.VIEWS)


def test_bigtable_layout_and_row_key_are_the_pipelines():
    text = section(page("storage.md"), "## Bigtable")
    assert f"the table `{spec.BIGTABLE.table}`" in text
    rows = table(text, "Column family")
    assert tuple(first_code(rows)) == spec.BIGTABLE.column_families
    example = re.search(r"device `([^`]+)`, `ts`\s+`([^`]+)`, `seq` (\d+) has the row key `([^`]+)`", text)
    assert example, "the row key example is missing"
    device, ts, seq, key = example.groups()
    payload = json.dumps({"ts": ts, "metrics": {"x": 1.0}, "seq": int(seq)}).encode()
    attrs = {"deviceId": device, "deviceNumId": "7", "deviceRegistryId": "r", "subFolder": "f"}
    reading = telemetry.parse(payload, attrs, "m-1", 0)
    row_key, cells = telemetry.bigtable_cells(reading)
    assert row_key.decode() == key
    qualifiers = {f: {q.decode() for fam, q, _, _ in cells if fam == f} for f in spec.BIGTABLE.column_families}
    assert set(code(rows[1][1])) == qualifiers["a"]


# ------------------------------------------------------------------------------------------ outputs


def exported_outputs() -> list[str]:
    names = []
    for node in ast.walk(ast.parse((ROOT / "infra" / "__main__.py").read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pulumi.export":
            first = node.args[0]
            assert isinstance(first, ast.Constant), ast.unparse(node)
            names.append(first.value)
    return names


def test_outputs_are_what_the_program_exports():
    text = page("outputs.md")
    assert sorted(first_code(table(text, "Output"))) == sorted(exported_outputs())
    needed = text.split("targets.REQUIRED_OUTPUTS`):", 1)[1]
    assert tuple(code(needed)) == targets.REQUIRED_OUTPUTS


# ------------------------------------------------------------------------------------------ the CLI

CLI_PREAMBLE = """\
# `iotctl` reference

Generated from the typer app (`iotbridge/cli.py`) by `.venv/bin/python -m tests.test_docs`;
`tests/test_docs.py` fails when this page and `iotctl --help` part ways. Every command takes `--json` for
machine-readable output and exits non-zero with a one-line reason on failure. Commands that act on a deployment
take `--stack NAME` (that stack's outputs, [outputs.md](outputs.md)); without it they act on the running local
stack.
"""


def _commands() -> list[tuple[list[str], Any]]:
    """(["iotctl", "devices", "create"], its click command) for the app and every group and command in it."""
    out = []

    def walk(cmd: Any, path: list[str]) -> None:
        out.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    from iotbridge.cli import app

    walk(typer.main.get_command(app), ["iotctl"])
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_cli_reference() -> str:
    parts = [CLI_PREAMBLE]
    for path, cmd in _commands():
        ctx = typer.Context(cmd, info_name=" ".join(path))
        parts.append(f"## `{' '.join(path)}`\n")
        parts.append(f"```\nUsage: {' '.join(path)} {' '.join(cmd.collect_usage_pieces(ctx))}\n```\n")
        parts.append(inspect.cleandoc(cmd.help or "") + "\n")
        subcommands = getattr(cmd, "commands", {})
        if subcommands:
            parts.append("| Command | What it does |\n| --- | --- |")
            parts += [f"| `{' '.join([*path, n])}` | {_cell((c.help or '').split(chr(10))[0])} |"
                      for n, c in subcommands.items()]
            parts.append("")
        records = [rec for p in cmd.params if (rec := p.get_help_record(ctx))]
        if records:
            parts.append("| Argument or option | Help |\n| --- | --- |")
            parts += [f"| `{opts}` | {_cell(help_)} |" for opts, help_ in records]
            parts.append("")
    return "\n".join(parts)


def test_cli_reference_is_generated_from_the_app():
    assert (DOCS / "cli.md").read_text() == render_cli_reference(), \
        "docs/cli.md is stale: run `.venv/bin/python -m tests.test_docs` and commit docs/cli.md"


@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=lambda p: " ".join(p))
def test_cli_reference_names_what_help_shows(path: list[str]):
    from iotbridge.cli import app

    result = CliRunner().invoke(app, [*path[1:], "--help"], terminal_width=200, prog_name="iotctl")
    assert result.exit_code == 0, result.output
    reference = section((DOCS / "cli.md").read_text(), f"## `{' '.join(path)}`")
    shown = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", result.output)) - {"--help"}
    documented = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", reference))
    assert shown == documented, " ".join(path)
    assert f"Usage: {' '.join(path)}" in " ".join(result.output.split())


# ------------------------------------------------------------------------------------------ docs/ as a whole


def test_the_architecture_page_names_every_component():
    text = section(page("architecture.md"), "## The parts")
    documented = set(re.findall(r"^  - `(\w+\.py)`:", text, re.M))
    # The package's modules that are not one piece: the config, the whole (IotBridge) and its provider-facing form,
    # where deployed code is found and how it is packaged (a section of its own), and how a piece's image is built
    # and pushed (shared by the pipeline and the admin API).
    not_pieces = {"__init__.py", "config.py", "iot_bridge.py", "provider.py", "sources.py", "packaging.py", "images.py"}
    assert documented == {p.name for p in (ROOT / "gcp_iot_bridge" / "infra").glob("*.py")} - not_pieces


def test_the_index_links_every_page():
    index = page("README.md")
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    assert linked == {p.name for p in DOCS.glob("*.md")} - {"README.md"}


def test_every_relative_link_of_docs_resolves():
    for path in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links {target}"


# Files another change is rewriting; their citations go when it lands. Remove a file when it no longer cites.
STILL_CITING: set[str] = set()
# The pattern of the repository's check, written so that this file does not match it itself: an issue number of
# the project, or a reference into an outside tracker (owner/repo#N, some-repo #N, PR N, a .../issues/N address).
CITATION = re.compile(
    r"CONTRACT[S]|issue [0-9]|issue ?#"
    r"|[A-Za-z][\w.-]*[-/][\w.-]*[A-Za-z] ?#[0-9]+\b(?!-)"
    r"|\bPR ?#?[0-9]+\b"
    r"|/(?:issues|pull)/[0-9]+\b")
CHECKED_FOR_CITATIONS = ("*.py", "*.md", "*.yaml", "*.toml", "*Dockerfile", "*.sh")


def test_nothing_cites_an_outside_document_or_an_issue_number():
    listed = subprocess.run(["git", "ls-files", "--cached", "--", *CHECKED_FOR_CITATIONS], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    found = {f: CITATION.search((ROOT / f).read_text(errors="replace")) for f in listed}
    citing = {f: m.group(0) for f, m in found.items() if m}
    assert {f: c for f, c in citing.items() if f not in STILL_CITING} == {}, "cite docs/ or say why instead"
    assert STILL_CITING - citing.keys() == set(), "no longer cites: remove it from STILL_CITING"


def test_the_citation_pattern_knows_tracker_references_and_spares_what_is_no_citation():
    n = "1234"  # joined in, so that this file does not match the pattern itself
    cited = [f"hashicorp/terraform-provider-google#{n}", f"(terraform-provider-google #{n}, #25069)",
             f"pulumi/pulumi-gcp#{n}", f"DDL refuses it (pulumi-gcp#{n})", f"GoogleCloudPlatform/magic-modules#{n}",
             f"terraform-google-modules/terraform-google-pubsub #{n}", f"google-beta PR {n}", f"PR #{n}",
             f"github.com/pulumi/pulumi/issues/{n}", f"issue {n}"]
    assert [c for c in cited if not CITATION.search(c)] == []
    kept = ["[lists them](docs/messages.md#dead-letters-topic-dead-letter)", "[setup](docs/cli.md#2-steps)",
            '"color": "#1f77b4"', "https://www.googleapis.com/auth/cloud-platform", "# a comment, 2 lines",
            "https://lookerstudio.google.com/reporting/create?c.reportId=r&ds.ds0.connector=bigQuery",
            "row key `{device_id}#{event time ms}#{seq}`", "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:9050/bigquery/v2/projects/p/datasets", "metric #3 of the dashboard"]
    assert [k for k in kept if CITATION.search(k)] == []


def test_the_readme_lists_every_method_of_the_device_manager_api():
    from iotbridge.admin.app import discovery_document

    readme = (ROOT / "README.md").read_text()
    text = readme.split("## Moving from IoT Core", 1)[1].split("\n## ", 1)[0]
    listed = first_code(table(text, "Method"))

    def ids(resource: dict, prefix: str = "") -> set[str]:
        out = {prefix + m for m in resource.get("methods", {})}
        for name, sub in resource.get("resources", {}).items():
            out |= ids(sub, f"{prefix}{name}.")
        return out

    registries = discovery_document()["resources"]["projects"]["resources"]["locations"]["resources"]["registries"]
    assert sorted(listed) == sorted(ids(registries, "registries."))


if __name__ == "__main__":
    (DOCS / "cli.md").write_text(render_cli_reference())
    print(f"wrote {DOCS / 'cli.md'}", file=sys.stderr)

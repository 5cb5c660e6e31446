"""API schema conformance: every input of every stack held against the discovery document of the API the provider
calls with it (tests/infra/api_schema.py has the mapping, the documented limits and the types it leaves out).

Stacks: dev, prod and demo as their stack files say, and ``all-features``: prod with every optional feature on
(Workbench, edge-ML training, a customer-managed key, an alert email, threshold rules, table expiry, the admin API
with its invoker check off and warm instances). The number of inputs checked is printed at the end of the run
(tests/infra/conftest.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.infra import api_schema as schema
from tests.infra import harness

KEY = "projects/iot-keys-123/locations/europe-west1/keyRings/iot/cryptoKeys/data"
ALL_FEATURES: dict[str, Any] = {
    "workbenchEnabled": True, "workbenchZone": "europe-west1-b", "workbenchUsers": ["user:ops@example.com"],
    "edgeMlTrain": True, "edgeMlSigners": ["group:ml@example.com"], "alertEmail": "ops@example.com",
    "kmsKeyName": KEY, "bigqueryLocation": "europe-west1", "bigqueryTableExpirationDays": 30,
    "pipelineThresholdRules": json.dumps({"temperature": {"above": 80, "config": {"fan": "max"}}}),
    "adminApiPublicAccess": "invokerIamDisabled", "adminApiWriters": ["user:ops@example.com"],
    "adminApiMinInstances": 1,
}
# The agents a customer-managed key is granted to, which the provider looks up.
_AGENT = "service-123456789012@gs-project-accounts.iam.gserviceaccount.com"
INVOKES = {
    "gcp:bigquery/getDefaultServiceAccount:getDefaultServiceAccount": lambda _: {
        "email": "bq-123456789012@bigquery-encryption.iam.gserviceaccount.com", "id": "bq",
        "member": "serviceAccount:bq-123456789012@bigquery-encryption.iam.gserviceaccount.com"},
    "gcp:storage/getProjectServiceAccount:getProjectServiceAccount": lambda _: {
        "emailAddress": _AGENT, "member": f"serviceAccount:{_AGENT}", "id": "gcs"},
}
STACKS = (*harness.STACKS, "all-features")
# Fewer checked inputs than this means the mapping stopped matching what the stacks declare.
MIN_CHECKED = 850
# Filled by the tests, printed by conftest.pytest_terminal_summary.
CHECKED: dict[str, int] = {}


def stack_run(stack: str) -> harness.StackRun:
    if stack == "all-features":
        return harness.run_program("prod", ALL_FEATURES, invokes=INVOKES)
    return harness.stack_run(stack)


@pytest.fixture(scope="module", params=STACKS)
def run(request: pytest.FixtureRequest) -> tuple[str, harness.StackRun]:
    return request.param, stack_run(request.param)


def test_every_input_fits_the_api_schema(run: tuple[str, harness.StackRun], record_property) -> None:
    stack, result = run
    report = schema.Report()
    for r in result.resources:
        schema.check_resource(r.type, r.name, r.inputs, report)
    CHECKED[stack] = report.checked
    record_property("api_schema_inputs_checked", report.checked)
    assert report.violations == [], "\n".join(map(str, report.violations))
    assert report.checked >= MIN_CHECKED, f"{stack}: only {report.checked} inputs checked"


def test_every_declared_resource_type_is_mapped_or_listed_with_a_reason(run: tuple[str, harness.StackRun]) -> None:
    _, result = run
    types = {r.type for r in result.resources if not r.type.startswith("gcp-iot-bridge:index:")}
    unaccounted = sorted(types - set(schema.MAPPING) - set(schema.NOT_COVERED))
    assert unaccounted == [], f"add these types to api_schema.MAPPING (or NOT_COVERED, with the reason): {unaccounted}"
    assert not set(schema.MAPPING) & set(schema.NOT_COVERED)
    assert all(reason.strip() for reason in schema.NOT_COVERED.values())


def test_every_input_of_a_mapped_type_is_checked_or_said_to_need_no_check(run: tuple[str, harness.StackRun]) -> None:
    _, result = run
    found = {f"{r.type} {key}" for r in result.resources if r.type in schema.MAPPING
             for key in schema.unaccounted_inputs(r.type, r.inputs)}
    assert sorted(found) == [], "map these inputs in api_schema.MAPPING, or say why not in UNMAPPED_INPUTS"


def test_the_all_features_stack_turns_every_optional_part_on() -> None:
    result = stack_run("all-features")
    for rtype in ("gcp:workbench/instance:Instance", "gcp:bigquery/job:Job",
                  "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember",
                  "gcp:monitoring/notificationChannel:NotificationChannel"):
        assert result.of_type(rtype), rtype


@pytest.mark.parametrize("target", sorted({t for fields in schema.MAPPING.values() for t in fields.values()}))
def test_every_mapped_field_exists_in_the_discovery_document(target: schema.Target) -> None:
    prop = schema.resolve(target)  # KeyError when the API has no such field
    assert prop.get("type") or prop.get("$ref") or not target[2], target
    assert not prop.get("readOnly"), f"{target}: output-only, the provider cannot set it"


@pytest.mark.parametrize("target", sorted(schema.LIMITS), ids=lambda t: ".".join(t))
def test_every_limit_quotes_its_field_description_or_names_its_source(target: schema.Target) -> None:
    limit = schema.LIMITS[target]
    schema.resolve(target)
    assert limit.quote or limit.source, target
    if limit.quote:
        text = " ".join(schema.description(limit.quoted_from or target).split())
        assert limit.quote in text, f"{target}: the document no longer says {limit.quote!r}:\n{text}"


def test_the_flex_template_autoscaling_algorithm_is_held_to_the_launch_api_enum() -> None:
    # The value the pipeline used to send: the Dataflow launch API refuses it with HTTP 400.
    report = schema.Report()
    schema.check_resource("gcp:dataflow/flexTemplateJob:FlexTemplateJob", "job",
                          {"autoscalingAlgorithm": "THROUGHPUT_BASED"}, report)
    assert report.checked == 1
    assert [v.problem for v in report.violations or []] == [
        "'THROUGHPUT_BASED' is not one of "
        "['AUTOSCALING_ALGORITHM_UNKNOWN', 'AUTOSCALING_ALGORITHM_NONE', 'AUTOSCALING_ALGORITHM_BASIC']"]


@pytest.mark.parametrize(("rtype", "inputs", "problem"), [
    ("gcp:pubsub/subscription:Subscription", {"ackDeadlineSeconds": 5.0}, "5.0 below 10"),
    ("gcp:pubsub/subscription:Subscription", {"messageRetentionDuration": "3000000s"}, "'3000000s' above 2.6784e+06"),
    ("gcp:pubsub/subscription:Subscription", {"deadLetterPolicy": {"maxDeliveryAttempts": 101.0}}, "above 100"),
    ("gcp:pubsub/topic:Topic", {"name": "goog-telemetry"}, "does not match"),
    ("gcp:pubsub/topic:Topic", {"labels": {"Env": "dev"}}, "label key 'Env'"),
    ("gcp:compute/firewall:Firewall", {"name": "Broker_MQTT"}, "does not match"),
    ("gcp:compute/firewall:Firewall", {"direction": "IN"}, "is not one of"),
    ("gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig", {"period": "120s"}, "is not one of"),
    ("gcp:storage/bucket:Bucket", {"publicAccessPrevention": "on"}, "is not one of"),
    ("gcp:serviceaccount/account:Account", {"accountId": "iot"}, "below 6"),
    # A custom role id takes no hyphen: the prefix's hyphens become underscores.
    ("gcp:projects/iAMCustomRole:IAMCustomRole", {"roleId": "iot-dev_broker_host_subscriptions"}, "does not match"),
    ("gcp:projects/iAMCustomRole:IAMCustomRole", {"stage": "PREVIEW"}, "is not one of"),
    ("gcp:bigquery/table:Table", {"schema": json.dumps([{"name": "a", "type": "STRING", "mode": "REQUIRED",
                                                          "nullable": False}])}, "unknown field 'nullable'"),
    ("gcp:monitoring/dashboard:Dashboard", {"dashboardJson": json.dumps(
        {"mosaicLayout": {"tiles": [{"xPos": 0, "widget": {"xyChart": {"dataSets": [{"plotType": "CURVE"}]}}}]}})},
     "'CURVE' is not one of"),
])
def test_the_checker_refuses_what_the_api_refuses(rtype: str, inputs: dict, problem: str) -> None:
    report = schema.Report()
    schema.check_resource(rtype, "r", inputs, report)
    assert report.checked >= 1
    assert any(problem in str(v) for v in report.violations or []), [str(v) for v in report.violations or []]


def _dropped_by_the_api(node: Any, path: str = "") -> list[str]:
    """Where a dashboard document holds a value the Monitoring API does not return: proto3 JSON leaves out every
    field at its default (0, false, "", an empty list or object, an enum's *_UNSPECIFIED)."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if value in (0, "", [], {}) or (isinstance(value, str) and value.endswith("_UNSPECIFIED")):
                found.append(f"{here}={json.dumps(value)}")
            else:
                found += _dropped_by_the_api(value, here)
        return found
    if isinstance(node, list):
        return [p for i, item in enumerate(node) for p in _dropped_by_the_api(item, f"{path}[{i}]")]
    return []


def test_the_dashboard_carries_nothing_the_monitoring_api_drops(run: tuple[str, harness.StackRun]) -> None:
    # pulumi-gcp compares the dashboard it sent with the one it reads back, ignoring only the fields the API adds
    # to it: a field the API leaves out, such as a tile's xPos 0 or an
    # empty groupByFields, reads back as a change on every `pulumi up`.
    _, result = run
    (dashboard,) = result.of_type("gcp:monitoring/dashboard:Dashboard")
    doc = json.loads(dashboard.get("dashboardJson"))
    assert doc["mosaicLayout"]["tiles"], "no tiles: nothing was checked"
    assert _dropped_by_the_api(doc) == []


def test_the_dropped_field_check_finds_defaults() -> None:
    doc = {"mosaicLayout": {"tiles": [{"xPos": 0, "yPos": 4, "widget": {"xyChart": {"dataSets": [
        {"timeSeriesQuery": {"timeSeriesFilter": {"aggregation": {"groupByFields": []}}}}],
        "yAxis": {"scale": "SCALE_UNSPECIFIED"}}}}]}}
    assert _dropped_by_the_api(doc) == [
        "mosaicLayout.tiles[0].xPos=0",
        "mosaicLayout.tiles[0].widget.xyChart.dataSets[0].timeSeriesQuery.timeSeriesFilter.aggregation.groupByFields=[]",
        "mosaicLayout.tiles[0].widget.xyChart.yAxis.scale=\"SCALE_UNSPECIFIED\""]


def _longest(pattern: Any) -> int:
    return max(n for n in range(1, 200) if pattern.match("a" * n))


def _shortest(pattern: Any) -> int:
    return min(n for n in range(1, 200) if pattern.match("a" * n))


@pytest.mark.parametrize("extreme", ["longest", "shortest"])
def test_every_name_fits_the_api_at_the_longest_and_shortest_prefix_and_project(extreme: str) -> None:
    """Physical names are "{prefix}-{suffix}" (buckets "{project}-{prefix}-{suffix}"): the longest prefix and project
    id config.py accepts, and the shortest, must still give names every API accepts. The lengths come from
    config.py's own patterns, not from a hand-kept number."""
    from gcp_iot_bridge.infra import config

    pick = _longest if extreme == "longest" else _shortest
    prefix, project = "a" * pick(config._PREFIX_RE), "b" * pick(config._PROJECT_RE)
    result = harness.run_program("prod", {**ALL_FEATURES, "prefix": prefix, "gcp:project": project,
                                          "kmsKeyName": KEY.replace("iot-keys-123", project)}, invokes=INVOKES)
    report = schema.Report()
    for r in result.resources:
        schema.check_resource(r.type, r.name, r.inputs, report)
    assert report.violations == [], "\n".join(map(str, report.violations))
    assert report.checked >= MIN_CHECKED
    accounts = [a.get("accountId") for a in result.of_type("gcp:serviceaccount/account:Account")]
    assert accounts and all(a.startswith(f"{prefix}-") for a in accounts)


def test_a_new_input_is_reported_until_it_is_mapped_or_explained() -> None:
    inputs = {"name": "iot-dev-telemetry", "project": "p", "messageStoragePolicy": {"allowedPersistenceRegions": []}}
    assert schema.unaccounted_inputs("gcp:pubsub/topic:Topic", inputs) == ["messageStoragePolicy"]

"""Every policy over every resource the program declares, for dev, prod and demo, under Pulumi mocks.

The resources come from tests/infra/harness.py (the whole program, inputs as the provider receives them, secrets
still marked); the stack context from the same stack file the program read.
"""

from __future__ import annotations

import pytest
import yaml

import rules
from tests.infra import harness


def _resources(run: harness.StackRun) -> list[rules.Resource]:
    return [rules.Resource.from_inputs(r.type, r.name, r.inputs) for r in run.resources]


@pytest.fixture(scope="module", params=harness.STACKS)
def stack(request: pytest.FixtureRequest) -> tuple[harness.StackRun, rules.StackContext]:
    run = harness.stack_run(request.param)
    return run, rules.StackContext.from_config(run.config, run.stack)


def test_every_policy_passes(stack):
    run, ctx = stack
    found = rules.evaluate(_resources(run), ctx)
    failing = {name: msgs for name, msgs in found.items() if msgs}
    assert failing == {}, "\n".join(f"[{n}] {m}" for n, msgs in failing.items() for m in msgs)


def test_the_rules_saw_what_they_guard(stack):
    """The pass above means something only if the guarded resource types are there to be checked."""
    run, _ = stack
    types = {r.type for r in run.resources}
    for token in ("gcp:pubsub/subscription:Subscription", "gcp:pubsub/topic:Topic", "gcp:bigquery/table:Table",
                  "gcp:bigquery/dataset:Dataset", "gcp:bigtable/instance:Instance",
                  "gcp:serviceaccount/account:Account"):
        assert token in types, token
    labelable = [r for r in run.resources if r.type in rules.LABELABLE]
    assert len(labelable) >= 10


def test_stack_file_config_has_no_plain_credentials(stack):
    run, _ = stack
    raw = yaml.safe_load((harness.ROOT / f"Pulumi.{run.stack}.yaml").read_text())["config"]
    assert rules.secret_config_is_encrypted(raw) == []


def test_policies_catch_a_mutated_stack(stack):
    """The same resources, one knob flipped each: the stack rules must notice (guards against a vacuous pass)."""
    run, ctx = stack
    resources = _resources(run)
    sub = next(r for r in resources if r.type == "gcp:pubsub/subscription:Subscription"
               and "deadLetterPolicy" in r.props)
    read_by_dataflow, _ = rules.dataflow_subscriptions(resources)
    (pipeline_input,) = [r for r in resources if r.type == "gcp:pubsub/subscription:Subscription"
                         and r.props.get("name") in read_by_dataflow]
    table = next(r for r in resources if r.type == "gcp:bigquery/table:Table")
    topic = next(r for r in resources if r.type == "gcp:pubsub/topic:Topic")
    mutated = [
        ("pubsub-dead-letter", sub, {k: v for k, v in sub.props.items() if k != "deadLetterPolicy"}),
        ("pubsub-dead-letter", pipeline_input,
         {**pipeline_input.props, "deadLetterPolicy": sub.props["deadLetterPolicy"]}),
        ("deletion-protection-follows-stack", table,
         {**table.props, "deletionProtection": not ctx.protect}),
        ("labels-everywhere", topic, {k: v for k, v in topic.props.items() if k != "labels"}),
    ]
    for policy_name, original, props in mutated:
        changed = [rules.Resource(r.type, r.name, props) if r is original else r for r in resources]
        assert rules.evaluate(changed, ctx)[policy_name], policy_name


def test_flipping_the_teardown_switch_keeps_every_policy_green():
    """dev with deletionProtection=true: the program follows the switch, so the policies still pass."""
    run = harness.run_program("dev", {"deletionProtection": True})
    ctx = rules.StackContext.from_config(run.config, run.stack)
    assert ctx.protect is True
    found = rules.evaluate(_resources(run), ctx)
    assert {name: msgs for name, msgs in found.items() if msgs} == {}
    # ...and the unflipped resources judged as a protected stack would fail.
    dev = harness.stack_run("dev")
    assert rules.evaluate(_resources(dev), ctx)["deletion-protection-follows-stack"]


def test_the_admin_api_is_the_one_public_service_and_must_authenticate(stack):
    """The admin API passes only as declared: open to all because its container verifies callers. The same service
    without ADMIN_AUTH=google, or its public invoker pointed at another service, fails."""
    run, ctx = stack
    resources = _resources(run)
    (service,) = [r for r in resources if r.type == "gcp:cloudrunv2/service:Service"]
    (invoker,) = [r for r in resources if r.type == "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
                  and r.props.get("member") == "allUsers"]
    assert rules.authenticating_admin_api(service)
    template = dict(service.props["template"])
    template["containers"] = [{**c, "envs": [e for e in c["envs"] if e["name"] != "ADMIN_AUTH"]}
                              for c in template["containers"]]
    unauthenticated = rules.Resource(service.type, service.name, {**service.props, "template": template})
    elsewhere = rules.Resource(invoker.type, invoker.name, {**invoker.props, "name": "iot-x-config-push"})
    for original, changed, policy in ((service, unauthenticated, "function-internal-only"),
                                      (service, unauthenticated, "public-cloud-run-authenticates"),
                                      (invoker, elsewhere, "iam-nothing-public"),
                                      (invoker, elsewhere, "public-cloud-run-authenticates")):
        mutated = [changed if r is original else r for r in resources]
        assert rules.evaluate(mutated, ctx)[policy], policy


def test_with_the_invoker_check_off_instead_of_allusers_every_policy_still_passes():
    run = harness.run_program("dev", {"adminApiPublicAccess": "invokerIamDisabled"})
    ctx = rules.StackContext.from_config(run.config, run.stack)
    found = rules.evaluate(_resources(run), ctx)
    assert {name: msgs for name, msgs in found.items() if msgs} == {}


def test_prod_autoscales_its_broker_hosts_and_fails_without_the_autoscaler():
    run = harness.stack_run("prod")
    ctx = rules.StackContext.from_config(run.config, run.stack)
    resources = _resources(run)
    assert [r.name for r in resources if r.type in rules.AUTOSCALER_TYPES] == ["broker-autoscaler"]
    assert rules.groups_autoscaled_in_production(resources, ctx) == []
    without = [r for r in resources if r.type not in rules.AUTOSCALER_TYPES]
    assert rules.groups_autoscaled_in_production(without, ctx) == [
        "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager broker-mig: no autoscaler targets it; a "
        "production broker tier scales with its devices (RegionAutoscaler)"]

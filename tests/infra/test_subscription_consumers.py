"""Every subscription the stack creates is read by something the stack declares.

A subscription nobody reads grows a backlog until retention drops its messages, and keeps any backlog alert on
it firing. The table says who reads what, and how the stack shows it; a subscription that no row claims is
orphaned and fails the test. (The config-push function's trigger is not in the table: Eventarc creates and reads
its own subscription, which the stack does not declare. Nor are the broker hosts': each host's bridge creates,
reads and deletes its own at run time, and the stack declares none.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.infra import harness

SUB = "gcp:pubsub/subscription:Subscription"

Reads = Callable[[harness.StackRun, harness.Resource], bool]


def _path(run: harness.StackRun, sub: harness.Resource) -> str:
    return f"projects/{run.config['gcp:project']}/subscriptions/{sub.get('name')}"


def _names(text: str, name: str) -> bool:
    """``name`` appears in ``text`` as a whole name, not as the prefix of a longer one."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def dataflow_job(run: harness.StackRun, sub: harness.Resource) -> bool:
    return any(_path(run, sub) in (job.get("parameters") or {}).values()
               for job in run.of_type("gcp:dataflow/flexTemplateJob:FlexTemplateJob"))


def bigquery_writer(run: harness.StackRun, sub: harness.Resource) -> bool:
    table = (sub.get("bigqueryConfig") or {}).get("table", "")
    tables = {f"{t.get('project')}.{t.get('datasetId')}.{t.get('tableId')}" for t in run.of_type(
        "gcp:bigquery/table:Table")}
    return table in tables


def push_endpoint(run: harness.StackRun, sub: harness.Resource) -> bool:
    return bool((sub.get("pushConfig") or {}).get("pushEndpoint"))


def operators_paged_by_the_dead_letter_alert(run: harness.StackRun, sub: harness.Resource) -> bool:
    for alert in run.of_type("gcp:monitoring/alertPolicy:AlertPolicy"):
        if "dead_letter_message_count" in json.dumps(alert.get("conditions")):
            return _names((alert.get("documentation") or {}).get("content", ""), sub.get("name"))
    return False


@dataclass(frozen=True)
class Consumer:
    who: str
    how_the_stack_shows_it: str
    reads: Reads


CONSUMERS: tuple[Consumer, ...] = (
    Consumer("the streaming Dataflow job", "a template parameter is the subscription's path", dataflow_job),
    Consumer("Pub/Sub, writing into BigQuery", "bigqueryConfig.table is a table the stack declares", bigquery_writer),
    Consumer("a push endpoint", "pushConfig.pushEndpoint is set", push_endpoint),
    Consumer("operators, inspecting dead letters",
             "the dead-letter alert that pages them names it in its documentation",
             operators_paged_by_the_dead_letter_alert),
)


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def readers(run: harness.StackRun, sub: harness.Resource) -> list[str]:
    return [c.who for c in CONSUMERS if c.reads(run, sub)]


def test_every_subscription_has_a_consumer(run: harness.StackRun) -> None:
    subs = run.of_type(SUB)
    assert subs
    orphans = [s.get("name") for s in subs if not readers(run, s)]
    assert orphans == [], f"subscriptions nobody reads (create a consumer or drop them): {orphans}"


def test_each_kind_of_consumer_is_there_to_be_found(run: harness.StackRun) -> None:
    """The table is not vacuous: the stack has a subscription read by each kind it names (but push, which
    only the local stack uses)."""
    found = {who for s in run.of_type(SUB) for who in readers(run, s)}
    assert found == {c.who for c in CONSUMERS} - {"a push endpoint"}


def test_an_orphaned_subscription_is_caught() -> None:
    """A subscription on the state topic that nothing reads, added to the stack, fails the check."""
    import runpy

    import pulumi_gcp as gcp

    def program() -> None:
        runpy.run_path(str(harness.PROGRAM), run_name="__main__")
        gcp.pubsub.Subscription("orphan", project="p-123456", name="iot-dev-state-archive",
                                topic="projects/p-123456/topics/iot-dev-state")

    mutated = harness.run_program("dev", program=program)
    orphan = mutated.one(SUB, "orphan")
    assert readers(mutated, orphan) == []

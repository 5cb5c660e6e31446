"""The fresh-project ordering check: on a new project, GCP refuses some calls ("permission denied", "not found")
for a while after the grant, agent or descriptor they need was created, because it has not propagated yet. Each
such resource must wait, through a ``pulumiverse_time.Sleep`` that starts after what it needs, long enough for the
first ``pulumi up`` to converge in one run.

The table below is the list of those pairs, each with its evidence. Dependencies are read under mocks the way
``test_foundation.py`` checks API enablement (``harness.StackRun.depends_on``: explicit ``depends_on``, input
dependencies, and components through their children).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gcp_iot_bridge.infra.monitoring import CONNECTED_DEVICES_METRIC
from tests.infra import harness
from tests.infra.test_cmek import AGENTS, GRANT, STACK_KEYS, STORE_AGENTS, cmek_run

SLEEP = "time:index/sleep:Sleep"
PUBSUB_AGENT = f"serviceAccount:service-{harness.PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"

Match = Callable[[harness.Resource], bool]


def of_type(type_: str, **inputs: object) -> Match:
    return lambda r: r.type == type_ and all(r.get(k) == v for k, v in inputs.items())


def alert_on_metric(metric: str) -> Match:
    return lambda r: r.type == "gcp:monitoring/alertPolicy:AlertPolicy" and f'"{metric}"' in str(r.get("conditions"))


def bigquery_subscription(r: harness.Resource) -> bool:
    return r.type == "gcp:pubsub/subscription:Subscription" and bool(r.get("bigqueryConfig"))


FUNCTION = of_type("gcp:cloudfunctionsv2/function:Function")


def triggered_function(r: harness.Resource) -> bool:
    """A gen2 function with an Eventarc trigger (the config-push function; the host registrar is called over HTTP)."""
    return FUNCTION(r) and bool(r.get("eventTrigger"))


def built_by(account: str) -> Match:
    """The gen2 function whose build runs as the account whose email has ``account`` (``-cfgbuild@``)."""
    return lambda r: FUNCTION(r) and account in str((r.get("buildConfig") or {}).get("serviceAccount"))


def builder_grant(account: str) -> Match:
    grant = of_type("gcp:projects/iAMMember:IAMMember", role="roles/cloudbuild.builds.builder")
    return lambda r: grant(r) and account in str(r.get("member"))


@dataclass(frozen=True)
class Propagation:
    refused: str  # what GCP refuses until ...
    resource: Match
    needs: str  # ... this has propagated
    dependency: Match
    at_least_s: int  # how long GCP says it can take (the wait may be longer)
    source: str


FRESH_PROJECT: tuple[Propagation, ...] = (
    Propagation(
        "the gen2 function's Eventarc trigger", triggered_function,
        "the Eventarc service agent, created on first use",
        of_type("gcp:projects/serviceIdentity:ServiceIdentity", service="eventarc.googleapis.com"), 120,
        "the agent takes time to be created and the trigger's precondition check fails meanwhile; waiting 1 min "
        "after creating the agents and 1 min after granting them gets through"),
    Propagation(
        "the gen2 function's Eventarc trigger", triggered_function,
        "the Eventarc agent's roles/eventarc.serviceAgent",
        of_type("gcp:projects/iAMMember:IAMMember", role="roles/eventarc.serviceAgent"), 120,
        "the trigger is refused: 'Permission denied while using the Eventarc Service Agent. If you "
        "recently started to use Eventarc, it may take a few minutes before all necessary permissions are "
        "propagated'"),
    *(Propagation(
        f"the {what}'s build in Cloud Build", built_by(account),
        "its new build account's roles/cloudbuild.builds.builder", builder_grant(account), 120,
        "IAM: a policy change typically propagates in 2 minutes")
      for what, account in (("config-push function", "-cfgbuild@"), ("host registrar", "-regbuild@"))),
    Propagation(
        "an alert policy on the bridge's custom metric", alert_on_metric(CONNECTED_DEVICES_METRIC),
        "the metric descriptor, created asynchronously",
        of_type("gcp:monitoring/metricDescriptor:MetricDescriptor", type=CONNECTED_DEVICES_METRIC), 600,
        "Monitoring answers '404 Cannot find metric(s) that match type ... If a metric was created "
        "recently, it could take up to 10 minutes to become available'"),
    Propagation(
        "the device-logs BigQuery subscription", bigquery_subscription,
        "the Pub/Sub agent's dataEditor and metadataViewer on the dataset (it writes rows and reads the schema)",
        of_type("gcp:bigquery/datasetIamMember:DatasetIamMember", member=PUBSUB_AGENT), 120,
        "creating a BigQuery subscription fails '403 The caller does not have "
        "permission' (35% of runs) right after the grants"),
)

# With a customer-managed key (kmsKeyName), each store of data needs its Google agent's grant on the key.
WITH_KEY: tuple[Propagation, ...] = tuple(
    Propagation(
        f"a {store.split(':')[-1]} encrypted with the key", of_type(store),
        f"the {api.split('.')[0]} agent's Encrypter/Decrypter on the key", of_type(GRANT, member=AGENTS[api]), 120,
        "the create call fails: 'Cloud Pub/Sub did not have the necessary permissions configured ... "
        "verify that the service account ... was granted the Cloud KMS CryptoKey Encrypter/Decrypter role'; "
        "IAM propagates a grant in typically 2 minutes")
    for store, apis in STORE_AGENTS.items() for api in apis
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def seconds(duration: str) -> float:
    """A Go duration ("90s", "2m", "1m30s"), as the time provider's create_duration takes it."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Go duration: {duration!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def waits_between(run: harness.StackRun, resource: harness.Resource, dependency: harness.Resource) -> list[float]:
    """Create durations of the Sleeps that start after ``dependency`` and that ``resource`` waits for."""
    return [seconds(str(w.get("createDuration"))) for w in run.of_type(SLEEP)
            if run.depends_on(w, dependency) and run.depends_on(resource, w)]


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


@pytest.fixture(scope="module", params=sorted(STACK_KEYS))
def run_with_key(request: pytest.FixtureRequest) -> harness.StackRun:
    return cmek_run(request.param)


@pytest.mark.parametrize("row", FRESH_PROJECT, ids=lambda p: f"{p.refused} after {p.needs}")
def test_what_gcp_refuses_until_something_propagates_waits_for_it(run: harness.StackRun, row: Propagation) -> None:
    check_waits(run, row)


@pytest.mark.parametrize("row", WITH_KEY, ids=lambda p: f"{p.refused} after {p.needs}")
def test_with_a_key_each_store_waits_for_its_agents_grant_to_propagate(run_with_key: harness.StackRun,
                                                                       row: Propagation) -> None:
    check_waits(run_with_key, row)


def check_waits(run: harness.StackRun, row: Propagation) -> None:
    resources = [r for r in run.resources if row.resource(r)]
    dependencies = [r for r in run.resources if row.dependency(r)]
    assert resources, f"no resource is {row.refused}: fix the table"
    assert dependencies, f"nothing in the stack is {row.needs}: fix the table"
    for res in resources:
        for dep in dependencies:
            waits = waits_between(run, res, dep)
            assert waits, (f"{res.type} {res.name} ({row.refused}) does not wait for {row.needs} ({dep.name}) to "
                           f"propagate; source: {row.source}")
            assert max(waits) >= row.at_least_s, (f"{res.name} waits {max(waits):g}s after {dep.name}; "
                                                  f"GCP can take {row.at_least_s}s ({row.source})")


def test_every_wait_follows_something_and_holds_something_back(run: harness.StackRun) -> None:
    """A Sleep that depends on nothing waits from the start of the run; one nothing depends on delays nothing."""
    sleeps = run.of_type(SLEEP)
    assert len(sleeps) >= 4
    for w in sleeps:
        assert w.dependencies, f"{w.name} starts with the run, not after what it waits for"
        assert any(w.urn in r.dependencies for r in run.resources), f"{w.name} holds nothing back"
        assert seconds(str(w.get("createDuration"))) > 0
        assert w.get("triggers"), f"{w.name}: without triggers it would not wait again for a recreated dependency"


def test_durations_are_go_durations() -> None:
    assert seconds("180s") == 180 and seconds("10m") == 600 and seconds("1m30s") == 90
    with pytest.raises(ValueError):
        seconds("3 minutes")

"""Run the whole Pulumi program under mocks for one stack file and return what it declared.

    run = run_program("dev")                                   # reads Pulumi.yaml + Pulumi.dev.yaml
    run = run_program("dev", {"bigtableMaxNodes": 0})          # with config overrides (None removes a key)
    run.of_type("gcp:pubsub/topic:Topic")                      # [Resource(type, name, inputs, ...)]
    run.outputs["telemetry_topic"]                             # resolved, plain Python values

Config reaches the program the way the Pulumi CLI passes it: the stack file's values as strings (lists as JSON),
with ``Pulumi.yaml``'s schema defaults filled in for keys the stack does not set.

Nothing is asserted inside an ``apply``: the harness drives the program to completion, waits for every resource
registration and every pending output (``run_pulumi_func``), then awaits each stack output and returns plain
values. An exception raised anywhere in the program, including inside an ``apply``, fails the run with
``ProgramFailed`` — a mock test cannot pass while the program is broken.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "infra" / "__main__.py"
PROJECT_NAME = "gcp-iot-bridge"
PROJECT_NUMBER = "123456789012"

_MISSING = object()


@dataclass(frozen=True)
class Resource:
    type: str
    name: str  # logical name
    inputs: dict[str, Any]  # as the provider receives them: camelCase keys, ints as floats
    urn: str
    parent: str
    dependencies: frozenset[str]  # URNs: explicit depends_on plus every input's dependencies
    # Alias specs as the engine receives them, e.g. {"spec": {"noParent": True}}: where the resource was before.
    aliases: tuple[dict[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return self.inputs.get(key, default)


@dataclass
class StackRun:
    stack: str
    config: dict[str, str]
    resources: list[Resource]
    outputs: dict[str, Any]
    by_urn: dict[str, Resource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_urn = {r.urn: r for r in self.resources}

    def of_type(self, type_: str) -> list[Resource]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str, name: str) -> Resource:
        found = [r for r in self.resources if r.type == type_ and r.name == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} resources of type {type_} named {name}; "
                              f"names of that type: {[r.name for r in self.of_type(type_)]}")
        return found[0]

    def depends_on(self, resource: Resource, target: Resource) -> bool:
        """True when ``resource`` waits for ``target``: directly, or through anything it depends on.

        Component resources count through their children (Pulumi expands a dependency on a component to its
        children), so depending on a component that holds ``target`` counts too.
        """
        children: dict[str, list[str]] = {}
        for r in self.resources:
            children.setdefault(r.parent, []).append(r.urn)
        seen: set[str] = set()
        todo = list(resource.dependencies)
        while todo:
            urn = todo.pop()
            if urn in seen:
                continue
            seen.add(urn)
            if urn == target.urn:
                return True
            dep = self.by_urn.get(urn)
            if dep is not None:
                todo.extend(dep.dependencies)
            todo.extend(children.get(urn, []))
        return False


class ProgramFailed(Exception):
    """The program raised. ``resources``: what it had declared before failing; ``__cause__``: the error."""

    def __init__(self, message: str, resources: list[Resource]):
        super().__init__(message)
        self.resources = resources


# ------------------------------------------------------------------------------------------------ config


def _cli_text(value: Any) -> str:
    """A YAML value as the Pulumi CLI hands it to the program."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _full_key(key: str) -> str:
    return key if ":" in key else f"{PROJECT_NAME}:{key}"


def stack_config(stack: str, overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    path = ROOT / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no stack file {path.name}")
    values: dict[str, Any] = dict((yaml.safe_load(path.read_text()) or {}).get("config") or {})
    for key, schema in (project.get("config") or {}).items():
        full = _full_key(key)
        if isinstance(schema, dict) and "default" in schema and full not in values:
            values[full] = schema["default"]
    for key, value in (overrides or {}).items():
        if value is None:
            values.pop(_full_key(key), None)
        else:
            values[_full_key(key)] = value
    return {key: _cli_text(value) for key, value in values.items()}


# ------------------------------------------------------------------------------------------------- mocks


# Secret stand-ins the mocked providers return; tests look for them in outputs and plain config.
MOCK_CERT_PEM = "-----BEGIN CERTIFICATE-----\nMOCKCERT\n-----END CERTIFICATE-----\n"
MOCK_PRIVATE_KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMOCK-PRIVATE-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
MOCK_PASSWORD = "mock-password-7f3a9c"
MOCK_ACCESS_TOKEN = "mock-access-token-5e1d"


class _Mocks(pulumi.runtime.Mocks):
    """Provider stand-in: echoes inputs and fills in the computed outputs the program reads."""

    def __init__(self, project: str, invokes: Mapping[str, Callable[[dict], dict]] | None = None):
        self.project = project
        self.invokes = dict(invokes or {})

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict]:
        state = dict(args.inputs)
        project = state.get("project", self.project)
        t = args.typ
        rid = f"{args.name}-id"
        if t == "gcp:pubsub/topic:Topic":
            rid = f"projects/{project}/topics/{state['name']}"
        elif t == "gcp:pubsub/subscription:Subscription":
            rid = f"projects/{project}/subscriptions/{state['name']}"
        elif t == "gcp:serviceaccount/account:Account":
            email = f"{state['accountId']}@{project}.iam.gserviceaccount.com"
            state.update(email=email, member=f"serviceAccount:{email}",
                         name=f"projects/{project}/serviceAccounts/{email}")
            rid = state["name"]
        elif t == "gcp:projects/serviceIdentity:ServiceIdentity":
            short = str(state["service"]).split(".")[0]
            email = f"service-{PROJECT_NUMBER}@gcp-sa-{short}.iam.gserviceaccount.com"
            state.update(email=email, member=f"serviceAccount:{email}")
        elif t == "gcp:projects/iAMCustomRole:IAMCustomRole":
            # The provider's ``name`` (and id): what a binding names the role by.
            rid = state["name"] = f"projects/{project}/roles/{state['roleId']}"
        elif t == "gcp:bigquery/dataset:Dataset":
            rid = f"projects/{project}/datasets/{state['datasetId']}"
        elif t == "gcp:bigquery/table:Table":
            rid = f"projects/{project}/datasets/{state['datasetId']}/tables/{state['tableId']}"
        elif t == "gcp:bigtable/instance:Instance":
            rid = f"projects/{project}/instances/{state['name']}"
        elif t == "gcp:compute/network:Network":
            rid = f"projects/{project}/global/networks/{state['name']}"
        elif t == "gcp:compute/subnetwork:Subnetwork":
            rid = f"projects/{project}/regions/{state['region']}/subnetworks/{state['name']}"
            state["selfLink"] = f"https://www.googleapis.com/compute/v1/{rid}"
        elif t == "gcp:compute/address:Address":
            state["address"] = "203.0.113.7"
        elif t == "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager":
            state["instanceGroup"] = f"projects/{project}/regions/{state.get('region')}/instanceGroups/{state['name']}"
            rid = f"projects/{project}/regions/{state.get('region')}/instanceGroupManagers/{state['name']}"
        elif t == "gcp:compute/instanceTemplate:InstanceTemplate":
            name = state.get("name") or f"{state.get('namePrefix', 'template-')}1"
            state["selfLinkUnique"] = f"projects/{project}/global/instanceTemplates/{name}?uniqueId=1"
        elif t == "gcp:storage/bucket:Bucket":
            state["url"] = f"gs://{state['name']}"
        elif t == "gcp:storage/bucketObject:BucketObject":
            state["outputName"] = state["name"]
        elif t == "gcp:secretmanager/secret:Secret":
            rid = f"projects/{project}/secrets/{state['secretId']}"
        elif t == "gcp:artifactregistry/repository:Repository":
            state["name"] = state["repositoryId"]
        elif t == "docker-build:index:Image":
            digest = "sha256:" + hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
            state.update(digest=digest, ref=f"{state['tags'][0]}@{digest}")
        elif t == "gcp:dataflow/flexTemplateJob:FlexTemplateJob":
            state["jobId"] = "2026-11-27_00_00_00-123"
        elif t in ("tls:index/selfSignedCert:SelfSignedCert", "tls:index/locallySignedCert:LocallySignedCert"):
            state["cert_pem"] = MOCK_CERT_PEM
        elif t == "tls:index/privateKey:PrivateKey":
            # Stand-in key material: a test can then prove it never reaches an output in plain text.
            state.update(private_key_pem=MOCK_PRIVATE_KEY_PEM, private_key_pem_pkcs8=MOCK_PRIVATE_KEY_PEM,
                         private_key_openssh=MOCK_PRIVATE_KEY_PEM,
                         public_key_pem="-----BEGIN PUBLIC KEY-----\nMOCK\n-----END PUBLIC KEY-----\n")
        elif t == "tls:index/certRequest:CertRequest":
            state["cert_request_pem"] = "-----BEGIN CERTIFICATE REQUEST-----\nCSR\n-----END CERTIFICATE REQUEST-----\n"
        elif t == "gcp:monitoring/uptimeCheckConfig:UptimeCheckConfig":
            state["uptimeCheckId"] = f"{args.name}-check"
            rid = f"projects/{project}/uptimeCheckConfigs/{args.name}-check"
        elif t == "gcp:monitoring/dashboard:Dashboard":
            rid = f"projects/{PROJECT_NUMBER}/dashboards/{args.name}"
        elif t in ("gcp:monitoring/alertPolicy:AlertPolicy", "gcp:monitoring/notificationChannel:NotificationChannel"):
            kind = "alertPolicies" if t.endswith("AlertPolicy") else "notificationChannels"
            state["name"] = f"projects/{project}/{kind}/{args.name}"
        elif t == "gcp:cloudrunv2/service:Service":
            # Cloud Run's deterministic URL: https://{name}-{project number}.{region}.run.app
            state["uri"] = f"https://{state['name']}-{PROJECT_NUMBER}.{state['location']}.run.app"
            rid = f"projects/{project}/locations/{state['location']}/services/{state['name']}"
        elif t == "random:index/randomPassword:RandomPassword":
            state["result"] = MOCK_PASSWORD
        state.setdefault("project", project)
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list[tuple[str, str]] | None]:
        if args.token in self.invokes:
            return self.invokes[args.token](dict(args.args)), []
        if args.token == "gcp:organizations/getClientConfig:getClientConfig":
            return {"accessToken": MOCK_ACCESS_TOKEN, "project": self.project, "region": "", "zone": "",
                    "id": "client-config"}, []
        if args.token == "gcp:organizations/getProject:getProject":
            project = args.args.get("projectId") or self.project
            return {"projectId": project, "number": PROJECT_NUMBER, "name": project, "id": f"projects/{project}"}, []
        raise NotImplementedError(f"no mock for invoke {args.token}; pass run_program(..., invokes={{token: fn}})")


class _RecordingMonitor(pulumi_mocks.MockMonitor):
    """The stock mock monitor, also recording each registration's parent and dependencies."""

    def __init__(self, mocks: pulumi.runtime.Mocks):
        super().__init__(mocks)
        self.registrations: list[Resource] = []

    def RegisterResource(self, request):  # noqa: N802 - gRPC method name
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            deps = set(request.dependencies)
            for prop in request.propertyDependencies.values():
                deps.update(prop.urns)
            inputs = dict(pulumi_mocks.rpc.deserialize_properties(request.object))
            self.registrations.append(Resource(
                type=request.type, name=request.name, inputs=inputs, urn=response.urn,
                parent=request.parent, dependencies=frozenset(deps),
                aliases=tuple(json_format.MessageToDict(alias) for alias in request.aliases)))
        return response


# ------------------------------------------------------------------------------------------------ runner


def run_program(stack: str, overrides: Mapping[str, Any] | None = None,
                program: Callable[[], None] | None = None,
                invokes: Mapping[str, Callable[[dict], dict]] | None = None) -> StackRun:
    """Run ``infra/__main__.py`` (or ``program``) for ``stack`` under mocks, to completion.

    ``invokes`` answers data sources beyond ``gcp.organizations.get_project``: token -> function of the invoke's
    arguments (camelCase) returning its result.
    """
    raw = stack_config(stack, overrides)
    mocks = _Mocks(project=raw.get("gcp:project", "mock-project"), invokes=invokes)
    monitor = _RecordingMonitor(mocks)

    pulumi_settings.ROOT.set(None)  # a fresh root stack resource per run
    pulumi.runtime.set_all_config(raw)
    pulumi.runtime.set_mocks(mocks, project=PROJECT_NAME, stack=stack, preview=False, monitor=monitor)
    pulumi_settings.SETTINGS.outputs.clear()

    def body() -> None:
        if program is not None:
            program()
        else:
            runpy.run_path(str(PROGRAM), run_name="__main__")

    try:
        _sync_await(run_pulumi_func(body))
        outputs = _sync_await(_resolve_outputs())
    except Exception as exc:
        raise ProgramFailed(f"{type(exc).__name__}: {exc}", list(monitor.registrations)) from exc
    finally:
        # A failed program leaves futures whose exception nobody retrieved; asyncio logs them from __del__. Left
        # to a later garbage collection, that can run inside another test's ast.parse, which CPython 3.11 then
        # fails with "AST constructor recursion depth mismatch". Collect them here, where they belong.
        gc.collect()
    return StackRun(stack=stack, config=raw, resources=list(monitor.registrations), outputs=outputs)


async def _resolve_outputs() -> dict[str, Any]:
    root = pulumi_settings.get_root_resource()
    exported: dict[str, Any] = getattr(root, "outputs", {}) or {}
    resolved: dict[str, Any] = {}
    for name, value in exported.items():
        output = pulumi.Output.from_input(value)
        if not await output.is_known():
            raise AssertionError(f"stack output {name} is unknown after the program ran")
        resolved[name] = await output.future()
    return resolved


@functools.cache
def stack_run(stack: str) -> StackRun:
    """``run_program(stack)`` once per test session; the result is plain data, safe to share read-only."""
    return run_program(stack)


STACKS = ("dev", "prod", "demo")

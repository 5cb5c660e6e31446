"""The admin API's deployment (gcp_iot_bridge/infra/admin_api.py) under Pulumi mocks, in every stack.

The whole program runs for dev, prod and demo (tests/infra/harness.py): the Cloud Run service, its identity and
grants, the public invoker, the image, and the stack output ``admin_api_url``. The policy pack's view of the same
resources is in tests/policy/; the API schema check of the service's inputs in tests/infra/test_api_schema.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gcp_iot_bridge.infra import admin_api, config, packaging
from gcp_iot_bridge.infra.packaging import lock_pins
from iotbridge.admin import auth
from tests.infra import harness

SERVICE = "gcp:cloudrunv2/service:Service"
INVOKER = "gcp:cloudrunv2/serviceIamMember:ServiceIamMember"
IMAGE = "docker-build:index:Image"
WRITERS = ["user:alice@example.com", "serviceAccount:provisioner@my-project.iam.gserviceaccount.com"]
READERS = ["domain:example.com"]


@pytest.fixture(scope="module", params=harness.STACKS)
def run(request: pytest.FixtureRequest) -> harness.StackRun:
    return harness.stack_run(request.param)


def _env(service: harness.Resource) -> dict[str, str]:
    (container,) = service.get("template")["containers"]
    return {e["name"]: e["value"] for e in container["envs"]}


def _names(run: harness.StackRun) -> tuple[str, str, str]:
    prefix = run.config["gcp-iot-bridge:prefix"]
    project = run.config["gcp:project"]
    return prefix, project, f"{prefix}-adminapi@{project}.iam.gserviceaccount.com"


def test_every_stack_runs_the_service_as_its_own_identity_and_exports_its_url(run: harness.StackRun) -> None:
    prefix, project, account = _names(run)
    region = run.config["gcp:region"]
    service = run.one(SERVICE, "admin-api")
    assert service.get("name") == f"{prefix}-admin-api"
    assert service.get("location") == region
    assert service.get("template")["serviceAccount"] == account
    assert service.get("ingress") == "INGRESS_TRAFFIC_ALL"
    assert run.outputs["admin_api_url"] == f"https://{prefix}-admin-api-{harness.PROJECT_NUMBER}.{region}.run.app"
    env = _env(service)
    assert env["ADMIN_AUTH"] == "google"  # the app verifies every request
    assert env["REGISTRY_ID"] == run.outputs["registry_id"]
    assert env["PROJECT_ID"] == project
    assert env["TOPIC_PREFIX"] == prefix  # its topics, {prefix}-device-commands first, are found by name
    # An ID token minted for the service's own URL is accepted (auth.ENV_AUDIENCES).
    assert json.loads(env[auth.ENV_AUDIENCES]) == [run.outputs["admin_api_url"]]


def test_the_container_reads_the_authorization_the_stack_declares() -> None:
    run = harness.run_program("dev", {"adminApiReaders": READERS, "adminApiWriters": WRITERS})
    env = _env(run.one(SERVICE, "admin-api"))
    authorizer = auth.authorizer_from_env(env)  # the service's own reading of its environment
    assert isinstance(authorizer, auth.GoogleAuthorizer)
    assert authorizer.members == auth.Members.parse(READERS, WRITERS)
    assert authorizer.verifier.tokeninfo_url == auth.TOKENINFO_URL
    assert json.loads(env[auth.ENV_WRITERS]) == WRITERS


def test_its_grants_are_the_registry_database_and_the_commands_topic_only(run: harness.StackRun) -> None:
    prefix, project, account = _names(run)
    member = f"serviceAccount:{account}"
    held = [r for r in run.resources if r.get("member") == member]
    roles = sorted((r.type.split(":")[-1], r.get("role")) for r in held)
    assert roles == [("IAMMember", "roles/datastore.user"), ("IAMMember", "roles/logging.logWriter"),
                     ("IAMMember", "roles/monitoring.metricWriter"), ("TopicIAMMember", "roles/pubsub.publisher")]
    (firestore,) = [r for r in held if r.get("role") == "roles/datastore.user"]
    database = f"projects/{project}/databases/(default)"
    assert firestore.get("condition")["expression"] == (
        f'resource.name == "{database}" || resource.name.startsWith("{database}/")')
    (publisher,) = [r for r in held if r.get("role") == "roles/pubsub.publisher"]
    assert publisher.get("topic") == f"projects/{project}/topics/{prefix}-device-commands"


def test_the_first_revision_waits_for_its_grants_to_propagate(run: harness.StackRun) -> None:
    service = run.one(SERVICE, "admin-api")
    wait = run.one("time:index/sleep:Sleep", "admin-api-grants-wait")
    assert wait.get("createDuration") == admin_api.IAM_PROPAGATION_WAIT
    assert run.depends_on(service, wait)
    _, _, account = _names(run)
    grants = [r for r in run.resources if r.get("member") == f"serviceAccount:{account}"
              and r.parent == run.one("gcp-iot-bridge:index:AdminApi", "admin-api").urn]
    assert len(grants) == 2  # the registry database and the commands topic
    for grant in grants:
        assert run.depends_on(wait, grant), grant.name
    assert run.depends_on(service, run.one("gcp:firestore/database:Database", "registry-firestore"))
    assert run.depends_on(service, run.one("gcp:projects/service:Service", "foundation-run"))


def test_it_is_open_at_the_cloud_run_level_to_allusers_on_this_service_only(run: harness.StackRun) -> None:
    prefix, _, _ = _names(run)
    public = [r for r in run.of_type(INVOKER) if r.get("member") == "allUsers"]
    assert [(r.get("name"), r.get("role")) for r in public] == [(f"{prefix}-admin-api", "roles/run.invoker")]
    assert run.depends_on(public[0], run.one(SERVICE, "admin-api"))
    assert not run.one(SERVICE, "admin-api").get("invokerIamDisabled")


def test_where_allusers_is_refused_the_invoker_check_is_turned_off_instead() -> None:
    run = harness.run_program("dev", {"adminApiPublicAccess": "invokerIamDisabled"})
    assert run.one(SERVICE, "admin-api").get("invokerIamDisabled") is True
    assert [r for r in run.of_type(INVOKER) if r.get("member") == "allUsers"] == []


def test_teardown_follows_the_stacks_switch(run: harness.StackRun) -> None:
    protect = run.config["gcp-iot-bridge:deletionProtection"] == "true"
    # The provider protects a Cloud Run service by default: a destroyable stack must say false explicitly.
    assert run.one(SERVICE, "admin-api").get("deletionProtection") is protect


def test_instances_follow_config() -> None:
    run = harness.run_program("prod", {"adminApiMinInstances": 1, "adminApiMaxInstances": 7})
    scaling = run.one(SERVICE, "admin-api").get("template")["scaling"]
    assert (scaling["minInstanceCount"], scaling["maxInstanceCount"]) == (1, 7)


def test_the_image_is_built_from_the_lock_and_pinned_by_digest(run: harness.StackRun) -> None:
    prefix, project, _ = _names(run)
    region = run.config["gcp:region"]
    image = run.one(IMAGE, "admin-api-image")
    tag = f"{region}-docker.pkg.dev/{project}/{prefix}-admin-api/admin-api:{admin_api.image_tag()}"
    assert image.get("tags") == [tag]
    assert image.get("push") is True and image.get("buildOnPreview") is False
    (container,) = run.one(SERVICE, "admin-api").get("template")["containers"]
    assert re.fullmatch(rf"{re.escape(tag)}@sha256:[0-9a-f]{{64}}", container["image"])
    assert image.get("context")["location"] == os.path.relpath(admin_api.BUILD_DIR)
    assert image.get("dockerfile")["location"] == os.path.relpath(admin_api.DOCKERFILE)
    text = admin_api.DOCKERFILE.read_text()
    assert "pip install --no-cache-dir -r requirements.txt -c constraints.txt" in text
    assert 'ENTRYPOINT ["python", "-m", "iotbridge.admin"]' in text


def test_a_prebuilt_image_is_run_as_given() -> None:
    ref = "europe-docker.pkg.dev/acme/images/admin-api@sha256:" + "0" * 64
    run = harness.run_program("dev", {"adminApiImage": ref})
    assert "admin-api-image" not in [r.name for r in run.of_type(IMAGE)]
    assert "admin-api-images" not in [r.name for r in run.of_type("gcp:artifactregistry/repository:Repository")]
    (container,) = run.one(SERVICE, "admin-api").get("template")["containers"]
    assert container["image"] == ref


def test_the_build_context_is_the_packages_import_closure_with_lock_pinned_requirements() -> None:
    context = admin_api.build_context()
    assert {"iotbridge/admin/auth.py", "iotbridge/admin/errors.py", "iotbridge/__init__.py"} <= set(context)
    # Only what the API's modules import: not the CLI, the local stack or the pipeline.
    assert not [p for p in context if p.startswith(("iotbridge/local/", "iotbridge/cli", "dataflow_jobs/"))]
    pins = lock_pins()
    requirements = context["requirements.txt"].decode().split()
    assert requirements and all(line in pins.values() for line in requirements)
    names = {line.partition("==")[0].lower() for line in requirements}
    assert {"google-auth", "requests", "cachetools"} <= names  # what auth.py imports
    constraints = context["constraints.txt"].decode().split()
    assert set(requirements) <= set(constraints) and all(line in pins.values() for line in constraints)


def test_the_image_tag_follows_what_the_image_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    before = admin_api.image_tag()
    assert admin_api.image_tag() == before  # stable across previews
    context = admin_api.build_context()
    monkeypatch.setattr(admin_api, "build_context", lambda: {**context, "iotbridge/admin/auth.py": b"changed"})
    assert admin_api.image_tag() != before


@pytest.mark.parametrize(("overrides", "message"), [
    ({"adminApiWriters": ["group:ops@example.com"]}, "cannot resolve group membership"),
    ({"adminApiReaders": ["allUsers"]}, "is not user:EMAIL, serviceAccount:EMAIL or domain:DOMAIN"),
    ({"adminApiReaders": ["user:ops"]}, "is not user:EMAIL"),
    ({"adminApiMinInstances": 4, "adminApiMaxInstances": 2}, "less than adminApiMinInstances=4"),
    ({"adminApiMaxInstances": 0}, "adminApiMaxInstances"),
    ({"adminApiPublicAccess": "public"}, "adminApiPublicAccess"),
])
def test_bad_config_fails_before_any_resource_naming_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.parse(harness.stack_config("dev", overrides), "dev")


def test_the_config_and_the_service_agree_on_what_a_member_is() -> None:
    """What config accepts, the service's own parser accepts; what the service refuses, config refuses first."""
    for members in (WRITERS, READERS, ["user:Ops@Example.com"]):
        cfg = config.parse(harness.stack_config("dev", {"adminApiWriters": members}), "dev")
        auth.Members.parse([], cfg.admin_api_writers)
    for bad in (["group:ops@example.com"], ["allAuthenticatedUsers"], ["serviceAccount:robot"]):
        with pytest.raises(ValueError):
            auth.Members.parse([], bad)
        with pytest.raises(config.ConfigError):
            config.parse(harness.stack_config("dev", {"adminApiWriters": bad}), "dev")


def test_the_image_holds_every_module_the_api_imports(tmp_path: Path) -> None:
    """What the image holds is enough: each module of iotbridge/admin imports, in a fresh interpreter, from the
    build context's files alone (third-party packages come from the environment, as pip installs them in the
    image)."""
    app = packaging.stage(admin_api.build_context(), tmp_path / "app")  # the image's /app
    modules = sorted(f"iotbridge.admin.{p.stem}" for p in (app / "iotbridge" / "admin").glob("*.py")
                     if p.stem != "__init__")
    assert "iotbridge.admin.auth" in modules
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
            " if n == 'iotbridge' or n.startswith('iotbridge.')}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=app, env={**os.environ, "PYTHONPATH": str(app)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    outside = {n: f for n, f in loaded.items() if f is not None and not Path(f).is_relative_to(app)}
    assert outside == {}, "imported from outside the image's files"
    assert set(modules) <= set(loaded)

"""Broker under mocks, built directly over a registry database: TLS and secrets, MIG with auto-healing, network load
balancer, firewall, the bridge's least-privilege grants — and no private key or password in any output or in
any plain input (metadata, startup script)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pulumi
import pytest
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from gcp_iot_bridge.infra import broker as bc
from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.registry_database import RegistryDatabase, RegistryDatabaseArgs
from iotbridge.bridge.settings import BridgeSettings
from tests.infra import harness

PROJECT = "proj-test-123"
PREFIX = "iot-dev"
BRIDGE_EMAIL = f"{PREFIX}-bridge@{PROJECT}.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{BRIDGE_EMAIL}"
PUBSUB_AGENT = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
TOPIC = f"projects/{PROJECT}/topics/{PREFIX}-"
# The recognisable stand-ins the harness's mocked pulumi-tls and pulumi-random return, so that a leak of key
# material into an output or a plain input is visible to the assertions below.
FAKE_KEY = harness.MOCK_PRIVATE_KEY_PEM
FAKE_CERT = harness.MOCK_CERT_PEM
FAKE_PASSWORD = harness.MOCK_PASSWORD

T = {
    "db": "gcp:firestore/database:Database",
    "field": "gcp:firestore/field:Field",
    "secret": "gcp:secretmanager/secret:Secret",
    "version": "gcp:secretmanager/secretVersion:SecretVersion",
    "secret_iam": "gcp:secretmanager/secretIamMember:SecretIamMember",
    "template": "gcp:compute/instanceTemplate:InstanceTemplate",
    "mig": "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager",
    "hc": "gcp:compute/healthCheck:HealthCheck",
    "rhc": "gcp:compute/regionHealthCheck:RegionHealthCheck",
    "backend": "gcp:compute/regionBackendService:RegionBackendService",
    "rule": "gcp:compute/forwardingRule:ForwardingRule",
    "address": "gcp:compute/address:Address",
    "firewall": "gcp:compute/firewall:Firewall",
    "topic_iam": "gcp:pubsub/topicIAMMember:TopicIAMMember",
    "sub": "gcp:pubsub/subscription:Subscription",
    "sub_iam": "gcp:pubsub/subscriptionIAMMember:SubscriptionIAMMember",
    "project_iam": "gcp:projects/iAMMember:IAMMember",
    "role": "gcp:projects/iAMCustomRole:IAMCustomRole",
    "bucket_iam": "gcp:storage/bucketIAMMember:BucketIAMMember",
}



def build(**overrides) -> harness.StackRun:
    fields = dict(
        project=PROJECT, region="europe-west1", prefix=PREFIX, registry_id="fleet",
        service_account_email=BRIDGE_EMAIL, telemetry_topic=TOPIC + "telemetry", state_topic=TOPIC + "state",
        commands_topic=TOPIC + "device-commands", deletion_protection=False,
        routes={"logs": TOPIC + "device-logs"}, min_hosts=2, max_hosts=4,
        dead_letter_topic=TOPIC + "dead-letter", pubsub_agent=PUBSUB_AGENT, project_number="123456789",
    )
    fields.update(overrides)

    def program() -> None:
        registry = RegistryDatabase("registry", RegistryDatabaseArgs(
            project=PROJECT, location="europe-west1", deletion_protection=bool(fields["deletion_protection"])))
        b = bc.Broker("broker", bc.BrokerArgs(registry=registry, **fields))  # type: ignore[arg-type]
        pulumi.export("mqtt_endpoint", b.mqtt_endpoint)
        pulumi.export("http_bridge_url", b.http_bridge_url)
        pulumi.export("mqtt_ca_cert", b.mqtt_ca_cert)
        pulumi.export("registry_id", b.registry_id)

    # harness.run_program with these mocks (the harness takes no mocks argument).
    raw = harness.stack_config("dev")
    mocks = harness._Mocks(project=PROJECT)
    monitor = harness._RecordingMonitor(mocks)
    pulumi.runtime.settings.ROOT.set(None)
    pulumi.runtime.set_all_config(raw)
    pulumi.runtime.set_mocks(mocks, project=harness.PROJECT_NAME, stack="dev", preview=False, monitor=monitor)
    pulumi.runtime.settings.SETTINGS.outputs.clear()
    _sync_await(run_pulumi_func(program))
    outputs = _sync_await(harness._resolve_outputs())
    return harness.StackRun(stack="dev", config=raw, resources=list(monitor.registrations), outputs=outputs)


@pytest.fixture(scope="module")
def run() -> harness.StackRun:
    return build()


def the(run: harness.StackRun, key: str) -> harness.Resource:
    found = run.of_type(T[key])
    assert len(found) == 1, [r.name for r in found]
    return found[0]


def test_outputs_are_the_contract_ones_and_hold_no_secret(run):
    assert run.outputs["mqtt_endpoint"] == "203.0.113.7:8883"
    assert run.outputs["http_bridge_url"] == "https://203.0.113.7:8443"
    assert run.outputs["mqtt_ca_cert"] == FAKE_CERT
    assert run.outputs["registry_id"] == "fleet"
    text = repr(run.outputs)
    assert "PRIVATE KEY" not in text and FAKE_PASSWORD not in text


def test_no_private_key_or_password_in_any_plain_input(run):
    """Only the secret versions (Secret Manager) and pulumi-tls itself may carry key material."""
    allowed = {T["version"], "tls:index/selfSignedCert:SelfSignedCert", "tls:index/certRequest:CertRequest",
               "tls:index/locallySignedCert:LocallySignedCert"}
    versions = []
    for r in run.resources:
        text = repr(r.inputs)
        if r.type == T["version"]:
            versions.append(r)
        if r.type in allowed:
            continue
        assert "PRIVATE KEY" not in text and FAKE_PASSWORD not in text, r.name
    # The key and the passwords do reach Secret Manager (and only there).
    data = sorted(repr(v.get("secretData")) for v in versions)
    assert any(FAKE_KEY.strip() in d.replace("\\n", "\n") for d in data)
    assert any(FAKE_PASSWORD in d for d in data)
    script = the(run, "template").get("metadataStartupScript")
    assert "gcloud secrets versions access latest --secret=iot-dev-broker-tls-key" in script
    assert FAKE_CERT.strip() in script  # the public certificate is fine in metadata


def test_secrets_follow_the_deletion_switch():
    for protected in (False, True):
        secrets = build(deletion_protection=protected).of_type(T["secret"])
        assert len(secrets) == 2 and all(s.get("deletionProtection") is protected for s in secrets)


def test_mig_with_autohealing_on_the_front_health_check(run):
    mig, template, hc = the(run, "mig"), the(run, "template"), the(run, "hc")
    # The autoscaler owns the size: a target size here would fight it.
    assert mig.get("targetSize") is None and mig.get("region") == "europe-west1"
    assert mig.get("versions")[0]["instanceTemplate"].endswith("?uniqueId=1")
    policy = mig.get("autoHealingPolicies")
    assert policy["healthCheck"] == "broker-autoheal-id"  # the mocks' id of the global HTTP health check
    assert policy["initialDelaySec"] >= 300  # apt + pip at boot; shorter and auto-healing loops forever
    assert hc.get("httpHealthCheck") == {"port": 8080, "requestPath": "/healthz"}
    assert template.get("namePrefix") == f"{PREFIX}-broker-"
    assert template.get("serviceAccount")["email"] == BRIDGE_EMAIL
    assert template.get("networkInterfaces")[0].get("accessConfigs") in (None, [])  # no external IP
    assert template.get("shieldedInstanceConfig")["enableSecureBoot"] is True
    script = template.get("metadataStartupScript")
    assert "apt-get install -y -q mosquitto" in script and "User=iotbridge" in script


def test_passthrough_network_load_balancer_on_8883_and_8443_with_static_ip(run):
    address, backend, rhc = the(run, "address"), the(run, "backend"), the(run, "rhc")
    rules = {r.get("name"): r for r in run.of_type(T["rule"])}
    assert set(rules) == {f"{PREFIX}-mqtt", f"{PREFIX}-http"}
    rule, http = rules[f"{PREFIX}-mqtt"], rules[f"{PREFIX}-http"]
    # The HTTP device bridge: the same address and hosts, its own port.
    assert (http.get("ipAddress"), http.get("portRange"), http.get("backendService")) == (
        "203.0.113.7", "8443", rule.get("backendService"))
    assert (address.get("addressType"), address.get("region")) == ("EXTERNAL", "europe-west1")
    assert (backend.get("loadBalancingScheme"), backend.get("protocol")) == ("EXTERNAL", "TCP")
    assert backend.get("backends")[0]["group"].endswith(f"/instanceGroups/{PREFIX}-broker")
    assert backend.get("healthChecks")  # a regional health check (global ones are refused for this LB)
    assert rhc.get("httpHealthCheck") == {"port": 8080, "requestPath": "/healthz"}
    assert (rule.get("ipAddress"), rule.get("portRange"), rule.get("ipProtocol")) == ("203.0.113.7", "8883", "TCP")
    assert rule.get("loadBalancingScheme") == "EXTERNAL"


def test_firewall_opens_8883_and_the_health_port_to_probe_ranges_only(run):
    rules = {r.get("name"): r for r in run.of_type(T["firewall"])}
    assert set(rules) == {f"{PREFIX}-broker-mqtt", f"{PREFIX}-broker-health"}
    mqtt = rules[f"{PREFIX}-broker-mqtt"]
    assert mqtt.get("allows") == [{"protocol": "tcp", "ports": ["8883", "8443"]}]
    health = rules[f"{PREFIX}-broker-health"]
    assert health.get("allows") == [{"protocol": "tcp", "ports": ["8080"]}]
    assert sorted(health.get("sourceRanges")) == sorted(
        ["35.191.0.0/16", "130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22"])
    for r in rules.values():
        assert r.get("targetTags") == [f"{PREFIX}-broker"] and r.get("direction") == "INGRESS"


def test_bridge_identity_has_least_privilege(run):
    """The hosts' account publishes to its topics, uses the registry's database, reads its secrets and code, and
    may call the host registrar: no Pub/Sub project role, no attachSubscription. It pulls from its own subscription
    with the subscriber grant the registrar puts on that subscription alone (tests/functions/test_host_registrar.py)."""
    topic_grants = {(r.get("topic"), r.get("role")) for r in run.of_type(T["topic_iam"]) if r.get("member") == MEMBER}
    assert topic_grants == {
        *((TOPIC + t, "roles/pubsub.publisher") for t in ("telemetry", "state", "device-logs", "dead-letter"))}
    assert run.of_type(T["sub"]) == [] and run.of_type(T["sub_iam"]) == []  # made at run time, by the registrar
    project_roles = {r.get("role"): r for r in run.of_type(T["project_iam"]) if r.get("member") == MEMBER}
    assert set(project_roles) == {"roles/datastore.user"}
    assert project_roles["roles/datastore.user"].get("condition")["expression"] == (
        'resource.name.startsWith("projects/proj-test-123/databases/(default)")')
    (invoker,) = [r for r in run.resources if r.get("member") == MEMBER and r.get("role") == "roles/run.invoker"]
    assert (invoker.type, invoker.get("name")) == ("gcp:cloudrunv2/serviceIamMember:ServiceIamMember",
                                                   "iot-dev-host-registrar")
    secrets = {r.get("role") for r in run.of_type(T["secret_iam"])}
    assert secrets == {"roles/secretmanager.secretAccessor"} and len(run.of_type(T["secret_iam"])) == 2
    assert {r.get("role") for r in run.of_type(T["bucket_iam"])} == {"roles/storage.objectViewer"}
    for r in run.resources:
        assert r.get("role") not in {"roles/owner", "roles/editor", "roles/viewer", "roles/pubsub.editor"}


REGISTRAR_EMAIL = f"{PREFIX}-hostreg@{PROJECT}.iam.gserviceaccount.com"
REGISTRAR_URL = "https://iot-dev-host-registrar-123456789.europe-west1.run.app"


def test_the_registrar_may_make_grant_and_delete_subscriptions_and_nothing_more(run):
    """The registrar's own account holds exactly what iotbridge.bridge.registrar calls (create, get on a host's
    restart, setIamPolicy, delete at its clean stop) on the project, unconditioned (Pub/Sub resources take no
    condition), and attachSubscription on device-commands only. It cannot pull: no consume."""
    role = the(run, "role")
    assert (role.get("roleId"), role.get("stage"), role.get("project")) == ("iot_dev_host_registrar", "GA", PROJECT)
    assert sorted(role.get("permissions")) == [
        "pubsub.subscriptions.create", "pubsub.subscriptions.delete", "pubsub.subscriptions.get",
        "pubsub.subscriptions.setIamPolicy"]
    granted = [(r.type, r.get("role"), r.get("topic"), r.get("condition")) for r in run.resources
               if r.get("member") == f"serviceAccount:{REGISTRAR_EMAIL}"]
    assert sorted(granted, key=repr) == sorted([
        (T["project_iam"], f"projects/{PROJECT}/roles/iot_dev_host_registrar", None, None),
        (T["topic_iam"], "roles/pubsub.subscriber", TOPIC + "device-commands", None)], key=repr)


def test_the_registrar_is_an_internal_function_whose_url_the_hosts_are_given(run):
    """Its own runtime and build accounts, internal ingress (the hosts reach it through Private Google Access), the
    settings iotbridge.bridge.registrar reads, its code in the broker's bucket, built only after its grants have
    had time to propagate; the hosts' startup script names the same URL the function checks tokens against."""
    fn = run.one("gcp:cloudfunctionsv2/function:Function", "broker-registrar")
    service = fn.get("serviceConfig")
    assert service["ingressSettings"] == "ALLOW_INTERNAL_ONLY" and service["serviceAccountEmail"] == REGISTRAR_EMAIL
    assert service["environmentVariables"] == {
        "PROJECT_ID": PROJECT, "PREFIX": PREFIX, "REGISTRAR_URL": REGISTRAR_URL, "HOSTS_ACCOUNT": BRIDGE_EMAIL,
        "PUBSUB_AGENT": PUBSUB_AGENT}
    build = fn.get("buildConfig")
    assert build["entryPoint"] == "handle" and build["serviceAccount"].endswith(f"{PREFIX}-regbuild@{PROJECT}"
                                                                                ".iam.gserviceaccount.com")
    source = run.one("gcp:storage/bucketObject:BucketObject", "broker-registrar-code")
    assert source.get("name").startswith("registrar/") and source.get("bucket") == the(run, "bucket_iam").get(
        "bucket")
    wait = run.one("time:index/sleep:Sleep", "broker-registrar-grants-wait")
    assert run.depends_on(fn, wait) and run.depends_on(fn, source)
    for grant in [r for r in run.of_type(T["project_iam"]) if "registrar" in r.name]:
        assert run.depends_on(wait, grant), grant.name
    settings = json.loads(re.search(r"<<'JSON'\n(.*?)\nJSON", the(run, "template").get("metadataStartupScript"),
                                    re.S).group(1))
    assert settings["registrar_url"] == REGISTRAR_URL
    invoker = run.one("gcp:cloudrunv2/serviceIamMember:ServiceIamMember", "broker-registrar-invoker")
    assert run.depends_on(the(run, "mig"), fn) and run.depends_on(the(run, "mig"), invoker)


def test_the_registrar_function_ships_what_it_imports():
    from gcp_iot_bridge.infra.packaging import HOST_REGISTRAR

    package = HOST_REGISTRAR.package()
    assert {"main.py", "iotbridge/bridge/registrar.py", "iotbridge/bridge/fanout.py"} <= set(package.files)
    assert any(r.startswith("functions-framework==") for r in package.requirements)


def test_the_stack_gives_the_registrar_pubsubs_agent_and_boots_hosts_after_its_dead_letter_grant():
    """In the whole stack: the agent the registrar grants subscriber on each host's subscription (for what it
    dead-letters) is the one whose publisher grant on the dead-letter topic Messaging holds, and the hosts boot only
    once that grant exists (a host's first subscription dead-letters). The agent holds no project role for it."""
    stack = harness.stack_run("dev")
    publisher = stack.one(T["topic_iam"], "messaging-dead-letter-agent-publisher")
    fn = stack.one("gcp:cloudfunctionsv2/function:Function", "broker-registrar")
    agent = fn.get("serviceConfig")["environmentVariables"]["PUBSUB_AGENT"]
    assert agent == publisher.get("member") and "@gcp-sa-pubsub." in agent
    assert not [r for r in stack.of_type(T["project_iam"]) if r.get("member") == agent
                and r.get("role") == "roles/pubsub.subscriber"]
    (mig,) = stack.of_type(T["mig"])
    assert stack.depends_on(mig, publisher) and stack.depends_on(mig, fn)


def test_code_archive_is_named_by_content_and_pins_its_requirements():
    files = bc.code_files()
    assert "iotbridge/bridge/front.py" in files and "iotbridge/local/services.py" not in files
    reqs = files["requirements.txt"].splitlines()
    assert all("==" in line for line in reqs), reqs
    # The name depends on content and paths alone, not on the order the files were listed in.
    assert list(dict(reversed(files.items()))) != list(files)
    assert bc.content_hash(dict(reversed(files.items()))) == bc.content_hash(files)
    moved = {("x/" + k if k == "iotbridge/bridge/front.py" else k): v for k, v in files.items()}
    assert bc.content_hash(moved) != bc.content_hash(files)
    changed = {**files, "iotbridge/bridge/front.py": files["iotbridge/bridge/front.py"] + "#"}
    assert bc.content_hash(changed) != bc.content_hash(files)


def test_hosts_install_the_locked_closure():
    """Every package a host installs is pinned at the version the tests ran: the distributions the bridge imports
    by requirements.txt, the rest (grpcio, protobuf, google-auth, ...) by the archive's constraints.txt, which the
    script passes to pip."""
    from importlib import metadata

    lock = packaging.lock_pins()
    files = bc.code_files()
    requirements = files["requirements.txt"].splitlines()
    assert {packaging.canonical_name(r.partition("[")[0].partition("==")[0]) for r in requirements} == {
        "paho-mqtt", "google-cloud-pubsub", "google-cloud-firestore", "google-cloud-monitoring", "google-api-core",
        "pyjwt", "cryptography", "aiohttp", "requests", "google-auth"}  # the last two: the host registrar's client
    closure = packaging.installed_closure(r.partition("==")[0] for r in requirements)
    assert {n: metadata.version(n) for n in closure} == {n: lock[n].partition("==")[2] for n in closure}, (
        "this environment is not the lock's")
    assert files["constraints.txt"].splitlines() == [lock[n] for n in sorted(closure)]
    assert {"grpcio", "protobuf", "google-auth"} <= closure
    assert '-r "$OPT/app/requirements.txt" -c "$OPT/app/constraints.txt"' in _host_script()


def test_invalid_arguments_fail_before_anything_is_declared():
    with pytest.raises(Exception, match="at most 10"):
        build(routes={f"r{i}": TOPIC + "telemetry" for i in range(11)})
    for bad in ({"min_hosts": 0}, {"min_hosts": 5, "max_hosts": 4}, {"max_hosts": 2001}):
        with pytest.raises(Exception, match="hosts must be 1 <= min_hosts <= max_hosts <= 2000"):
            build(**bad)
    with pytest.raises(Exception, match="fanout_slots"):  # retired: hosts make their own subscription
        build(max_hosts=6, fanout_slots=4)
    with pytest.raises(Exception, match="unknown machine type 'n9-mega-2'"):
        build(machine_type="n9-mega-2")
    with pytest.raises(Exception, match=r"devices_per_host must be 1\.\.80645"):
        build(devices_per_host=90000)


def test_hosts_boot_only_after_everything_they_read_exists(run):
    """The startup script reads secrets, code and Firestore at once: grants and versions come first."""
    mig = the(run, "mig")
    needs = [*run.of_type(T["secret_iam"]), *run.of_type(T["version"]), *run.of_type(T["topic_iam"]),
             *run.of_type(T["project_iam"]), *run.of_type(T["bucket_iam"]),
             *run.of_type("gcp:compute/routerNat:RouterNat")]
    # Topic grants: telemetry, state, the route, dead-letter, the registrar's attach on device-commands; project:
    # datastore, the registrar's role and its build account's.
    assert len(needs) == 2 + 2 + 5 + 3 + 1 + 1
    for r in needs:
        assert run.depends_on(mig, r), r.name


def test_startup_script_settings_load_in_the_bridge(run, tmp_path):
    """The settings the script writes are what ``python -m iotbridge.bridge`` reads (catches drift)."""
    from iotbridge.bridge.settings import BridgeSettings

    script = the(run, "template").get("metadataStartupScript")
    text = script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0]
    path = tmp_path / "settings.json"
    # What the script's sed makes of it on a host (IOTBRIDGE_ROOT unset there).
    path.write_text(text.replace("__HOSTNAME__", "iot-dev-broker-abcd").replace("__ROOT__", ""))
    s = BridgeSettings.load(path)
    assert (s.tls_key, s.secrets_file, s.workdir) == (
        "/etc/iotbridge/server-key.pem", "/etc/iotbridge/secrets.json", "/var/lib/iotbridge")
    assert (s.project, s.registry_id, s.prefix, s.front_port, s.broker_host) == (
        PROJECT, "fleet", PREFIX, 8883, "127.0.0.1")
    assert [(r.sub_folder, r.topic) for r in s.routes] == [("logs", f"{PREFIX}-device-logs")]
    assert "fanout_subscriptions" not in text  # no pre-made slot: the bridge creates its own filtered subscription
    assert s.health_port == 8080 and s.host_id == "iot-dev-broker-abcd"
    assert s.http_port == 8443


def _host_script(device_auth: str = "front") -> str:
    return bc.startup_script(
        project=PROJECT, region="europe-west1", registry_id="fleet", prefix=PREFIX, code_url="gs://b/o.zip",
        tls_key_secret="k", passwords_secret="p", server_cert_pem="c", database="(default)", routes={},
        health_port=8080, device_auth=device_auth)


def test_a_host_runs_the_bridge_from_the_archive_alone(tmp_path):
    """The archive unpacked as a host unpacks it, run by an interpreter that sees nothing else of the project:
    every module imports and every import statement in it (those inside functions too) succeeds; ``python -m
    iotbridge.bridge --help`` offers exactly the commands the startup script runs, and ``mosquitto-config`` writes
    Mosquitto's files from the settings the script writes."""
    import subprocess

    from iotbridge.bridge.settings import new_secrets, write_secrets
    from tests.infra import archives

    files = bc.code_files()
    app = archives.unpack(files, tmp_path / "app")
    python = archives.isolated_python(tmp_path / "venv", app)
    assert archives.probe(python, files, tmp_path) == []
    host = [str(python), "-I", "-m", "iotbridge.bridge"]
    usage = subprocess.run([*host, "--help"], capture_output=True, text=True, cwd=app, timeout=60, check=True).stdout
    listed = re.search(r"\{([\w,-]+)\}", usage)
    assert listed, usage
    ran: set[str] = set()
    for mode in ("front", "mosquitto"):  # what the scripts of both modes run
        script = _host_script(mode)
        roles = re.search(r"for role in ([\w ]+); do", script)
        assert roles, script
        ran |= {c for c in re.findall(r"-m iotbridge\.bridge (\S+)", script) if not c.startswith("$")}
        ran |= set(roles.group(1).split())
    assert sorted(listed.group(1).split(",")) == sorted(ran) == [
        "authd", "build-plugin", "front", "mosquitto-config", "service"]
    script = _host_script()

    settings = json.loads(script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0])
    settings.update(host_id="host-a", secrets_file=str(tmp_path / "secrets.json"), workdir=str(tmp_path / "var"))
    write_secrets(tmp_path / "secrets.json", new_secrets())
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    out = tmp_path / "mosquitto"
    subprocess.run([*host, "mosquitto-config", "--settings", str(tmp_path / "settings.json"), "--out", str(out)],
                   cwd=app, timeout=60, check=True, capture_output=True)
    assert {p.name for p in out.iterdir()} >= {"mosquitto.conf", "passwd", "acl"}
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {bc.BROKER_PORT} 127.0.0.1" in conf
    # The front's device sessions: Mosquitto's Unix socket, which the front's user reaches through Mosquitto's group.
    assert settings["broker_socket"] == f"__ROOT__{bc.BROKER_SOCKET}"
    assert f"listener 0 {settings['broker_socket']}\n" in conf
    assert "usermod -a -G mosquitto iotbridge" in script


def test_autoscaler_on_connected_devices_per_host_and_cpu_within_the_bounds(run):
    (autoscaler,) = run.of_type("gcp:compute/regionAutoscaler:RegionAutoscaler")
    mig = the(run, "mig")
    assert autoscaler.get("target") == f"projects/{PROJECT}/regions/europe-west1/instanceGroupManagers/{PREFIX}-broker"
    assert run.depends_on(autoscaler, mig)
    policy = autoscaler.get("autoscalingPolicy")
    assert (policy["minReplicas"], policy["maxReplicas"], policy["mode"]) == (2, 4, "ON")
    # The gauge every host's bridge reports, per instance; its target what an e2-standard-2 carries x 0.7.
    assert policy["metrics"] == [{"name": "custom.googleapis.com/iot/connected_devices", "target": 56451,
                                  "type": "GAUGE"}]
    assert policy["cpuUtilization"] == {"target": 0.6}
    assert policy["cooldownPeriod"] == 600  # hosts boot (apt, pip) before their signals count
    assert policy["scaleInControl"] == {"maxScaledInReplicas": {"fixed": 1}, "timeWindowSec": 600}
    bigger = build(min_hosts=3, max_hosts=2000, machine_type="e2-standard-8", devices_per_host=20000)
    (scaled,) = bigger.of_type("gcp:compute/regionAutoscaler:RegionAutoscaler")
    assert (scaled.get("autoscalingPolicy")["minReplicas"], scaled.get("autoscalingPolicy")["maxReplicas"]) == (3, 2000)
    assert scaled.get("autoscalingPolicy")["metrics"][0]["target"] == 20000
    assert bigger.of_type(T["sub"]) == []  # no subscription per host the group may run: each host makes its own


def test_updates_roll_one_host_per_zone_without_going_below_the_group_size(run):
    policy = the(run, "mig").get("updatePolicy")
    assert policy == {"type": "PROACTIVE", "minimalAction": "REPLACE", "mostDisruptiveAllowedAction": "REPLACE",
                      "replacementMethod": "SUBSTITUTE", "instanceRedistributionType": "PROACTIVE",
                      "maxSurgeFixed": 3, "maxUnavailableFixed": 0}
    two_zones = build(zones=["europe-west1-b", "europe-west1-c"])
    # A regional group takes a fixed surge of 0 or at least its zones: one new host per zone.
    assert the(two_zones, "mig").get("updatePolicy")["maxSurgeFixed"] == 2


def test_a_stopping_host_drains_its_devices_before_the_bridge_service_and_mosquitto_stop(run):
    from gcp_iot_bridge.infra.broker import DRAIN_S, FRONT_STOP_TIMEOUT_S

    script = the(run, "template").get("metadataStartupScript")
    settings = json.loads(script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0])
    assert settings["drain_s"] == DRAIN_S == 30
    # systemd waits for the drain, and stops units in the reverse order of After=: the front, then the service.
    assert FRONT_STOP_TIMEOUT_S > DRAIN_S
    assert f'STOP_front={FRONT_STOP_TIMEOUT_S} STOP_service=90' in script
    # systemd.unit(5): "if a unit is configured with After= on another unit, the former is stopped before the
    # latter" — so the front is After= the service (and Mosquitto), never the service After= the front.
    assert ('AFTER_front=" iotbridge-mosquitto.service iotbridge-service.service" '
            'AFTER_service=" iotbridge-mosquitto.service"') in script
    unit = script.split("<<UNIT", 2)[1]
    assert "After=network-online.target${!after}" in unit
    assert "TimeoutStopSec=${!stop}" in unit


def test_units_and_kernel_are_sized_for_the_connections_of_the_machine_type(run):
    from iotbridge.planning import host_sizing

    script = the(run, "template").get("metadataStartupScript")
    size = host_sizing.sizing("e2-standard-2")
    # 8 GiB less 2 GiB kept back, at 42 KiB per device: 6,144 × 1,024 / 42 = 149,796. The front's one core, half of
    # it for idle devices at 6.2 % per 10,000: 500 × 10,000 / 62 = 80,645, the smaller (no port range bounds it:
    # the front reaches Mosquitto over a Unix socket). The autoscaler aims at 70 %: 56,451.
    assert (size.devices_by_memory, size.devices_by_cpu, size.devices) == (149796, 80645, 80645)
    assert size.autoscale_target == 56451
    units = script.split("<<UNIT")
    # The front: two descriptors per device, 2 × 80,645 + 4,096.
    assert "LimitNOFILE=${!nofile}" in units[1] and "NOFILE_front=165386 NOFILE_service=65536" in script
    assert "LimitNOFILE=84741" in units[2]  # Mosquitto: one per device, 80,645 + 4,096
    conf = script.split("<<'SYSCTL'\n", 1)[1].split("\nSYSCTL\n", 1)[0]
    assert conf.splitlines()[1:] == [
        "fs.file-max = 1048576", "net.core.somaxconn = 65535", "net.ipv4.tcp_max_syn_backlog = 65535",
        "net.ipv4.tcp_mem = 262144 393216 524288"]
    assert "systemctl restart systemd-sysctl" in script
    # e2-micro: it sustains a quarter of a core: half of that quarter is 125 permille, / 6.2 % per 10,000 = 20,161
    # devices; memory allows 1 GiB less 512 MiB: 512 × 1,024 / 42 = 12,483, the smaller; 70 %: 8,738;
    # 2 × 12,483 + 4,096.
    small = host_sizing.sizing("e2-micro")
    assert (small.devices_by_memory, small.devices_by_cpu) == (12483, 20161)
    assert (small.devices, small.autoscale_target, small.front_nofile) == (12483, 8738, 29062)
    # e2-small sustains half a core: 250 permille → 40,322, but its 2 GiB less 512 MiB hold 1,536 × 1,024 / 42 =
    # 37,449; e2-medium a whole core (80,645, as a standard type), but 4 GiB less 1 GiB hold 74,898.
    assert (host_sizing.sizing("e2-small").devices_by_cpu, host_sizing.sizing("e2-small").devices) == (40322, 37449)
    medium = host_sizing.sizing("e2-medium")
    assert medium.devices_by_cpu == host_sizing.sizing("e2-standard-2").devices_by_cpu == 80645
    assert medium.devices == 74898
    assert host_sizing.sizing("n2-custom-4-16384").memory_mib == 16384


def test_every_instance_name_the_group_gives_is_a_host_id_with_a_subscription_pubsub_accepts():
    """A host's id is its instance name (``hostname -s``): the group's base name, a hyphen and four characters.
    Any name Compute Engine allows (its own pattern, from the API's discovery document) is a valid host id, and
    at the longest prefix the host's subscription name and filter fit Pub/Sub's limits."""
    from iotbridge import spec
    from iotbridge.bridge import fanout
    from tests.infra import api_schema

    compute = json.loads((api_schema.DOCUMENTS / "compute.v1.json").read_text())["schemas"]
    instance_name = compute["Instance"]["properties"]["name"]["pattern"]
    longest_prefix = "p" + "x" * 14 + "1"  # config.py's longest prefix: 16 characters
    base = the(build(prefix=longest_prefix), "mig").get("baseInstanceName")
    assert base == f"{longest_prefix}-broker"
    for host in (f"{base}-a1z9", "a", "z" + "-9" * 31, f"{base}-" + "0" * (62 - len(base))):
        assert re.fullmatch(instance_name, host), host
        assert spec.HOST_ID_RE.fullmatch(host), host
        name = fanout.host_subscription(longest_prefix, host)
        assert re.fullmatch(api_schema.LIMITS[("pubsub.v1", "Subscription", "name")].regex or "", name), name
        assert len(spec.host_filter(host).encode()) <= spec.MAX_FILTER_BYTES


# ------------------------------------------------------------------------ device_auth mosquitto (no front)


@pytest.fixture(scope="module")
def mq_run() -> harness.StackRun:
    return build(device_auth="mosquitto")


def _script_settings(script: str, tmp_path: Path) -> BridgeSettings:
    text = script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0]
    path = tmp_path / "settings.json"
    path.write_text(text.replace("__HOSTNAME__", "iot-dev-broker-abcd").replace("__ROOT__", ""))
    return BridgeSettings.load(path)


def test_mosquitto_mode_opens_8883_only_and_declares_no_http_bridge(mq_run):
    rules = {r.get("name"): r for r in mq_run.of_type(T["firewall"])}
    assert rules[f"{PREFIX}-broker-mqtt"].get("allows") == [{"protocol": "tcp", "ports": ["8883"]}]
    assert rules[f"{PREFIX}-broker-health"].get("allows") == [{"protocol": "tcp", "ports": ["8080"]}]
    assert [r.get("name") for r in mq_run.of_type(T["rule"])] == [f"{PREFIX}-mqtt"]
    assert mq_run.outputs["http_bridge_url"] == "" and mq_run.outputs["mqtt_endpoint"] == "203.0.113.7:8883"
    # Auto-healing and the load balancer probe /healthz on the health port, which the auth daemon serves there.
    assert the(mq_run, "hc").get("httpHealthCheck") == {"port": 8080, "requestPath": "/healthz"}
    assert the(mq_run, "rhc").get("httpHealthCheck") == {"port": 8080, "requestPath": "/healthz"}


def test_mosquitto_mode_hosts_compile_the_plugin_and_run_the_auth_daemon_before_mosquitto(mq_run, tmp_path):
    from iotbridge.bridge import plugin

    script = the(mq_run, "template").get("metadataStartupScript")
    # The compiler and Mosquitto's plugin headers (what plugin.build asks for), nothing of OpenSSL.
    assert plugin.INSTALL == "apt-get install -y " + " ".join(bc.PLUGIN_BUILD_PACKAGES)
    assert "apt-get install -y -q mosquitto python3-venv unzip gcc libc6-dev mosquitto-dev libmosquitto-dev\n" in script
    assert "libssl-dev" not in script
    # Compiled (as root, into root's folder) before Mosquitto's config names it.
    build = script.index('-m iotbridge.bridge build-plugin --out "$PLUGIN"')
    mconf = script.index("-m iotbridge.bridge mosquitto-config")
    assert build < mconf and '--user mosquitto --plugin "$PLUGIN/iotbridge_auth.so"' in script[mconf:]
    assert f"PLUGIN=$ROOT{bc.PLUGIN_DIR}" in script
    # The auth daemon and the bridge service; no front. Mosquitto starts after the daemon and wants it.
    assert "for role in authd service; do" in script
    assert "systemctl enable --now iotbridge-authd iotbridge-mosquitto iotbridge-service\n" in script
    assert bc.host_units("mosquitto") == ("iotbridge-authd", "iotbridge-mosquitto", "iotbridge-service")
    mosquitto_unit = script.split('"$UNITS/iotbridge-mosquitto.service" <<UNIT\n', 1)[1].split("\nUNIT\n", 1)[0]
    assert "After=network-online.target iotbridge-authd.service\nWants=iotbridge-authd.service\n" in mosquitto_unit
    # The daemon's socket: its folder is the daemon's user's and Mosquitto's group's only; the daemon gives the socket
    # to that group; its unit may write there.
    assert 'install -d -m 0750 -o iotbridge -g mosquitto "$AUTHD"' in script
    assert 'ARGS_authd=" --group mosquitto"' in script and 'RW_authd="$VAR ${AUTHD:-}"' in script
    # Mosquitto terminates the devices' TLS: the key is in its own folder, not the iotbridge user's.
    assert 'install -d -m 0700 -o mosquitto -g mosquitto "$MQTLS"' in script
    assert '--project=proj-test-123 > "$MQTLS/server-key.pem"' in script
    assert 'chown mosquitto:mosquitto "$MQTLS"/*' in script
    s = _script_settings(script, tmp_path)
    assert (s.device_auth, s.auth_socket, s.http_port, s.client_ca) == ("mosquitto", bc.AUTH_SOCKET, 0, "")
    assert (s.tls_cert, s.tls_key) == (f"{bc.MOSQUITTO_TLS_DIR}/server.pem", f"{bc.MOSQUITTO_TLS_DIR}/server-key.pem")
    assert (s.front_host, s.front_port, s.health_port) == ("0.0.0.0", 8883, 8080)


def test_front_mode_script_installs_and_runs_what_it_did(run):
    script = the(run, "template").get("metadataStartupScript")
    assert "apt-get install -y -q mosquitto python3-venv unzip\n" in script
    assert "build-plugin" not in script and "--plugin" not in script and "gcc" not in script
    assert "for role in front service; do" in script
    assert "systemctl enable --now iotbridge-mosquitto iotbridge-service iotbridge-front\n" in script
    assert '--project=proj-test-123 > "$ETC/server-key.pem"' in script


def test_an_unknown_device_auth_fails_before_anything_is_declared():
    with pytest.raises(Exception, match="device_auth must be one of front, mosquitto, got 'plugin'"):
        build(device_auth="plugin")


def test_the_archive_ships_the_plugin_source_a_host_compiles():
    from iotbridge.bridge import plugin

    files = bc.code_files()
    assert files["iotbridge/bridge/mosquitto_plugin/iotbridge_auth.c"] == plugin.SOURCE.read_text()


def test_mosquitto_mode_hosts_and_autoscaler_are_sized_for_mosquitto_and_the_daemons_map(mq_run):
    # No front: Mosquitto holds 18 KiB per connection, the auth daemon 4 KiB per registry device, taken as what the
    # group of at most 4 hosts keeps: d = 6,291,456 KiB / (18 + 0.7 x 4 x 4 = 29.2) = 215,460; the registry
    # 4 x 0.7 x 215,460 = 603,288 devices, their map 2,413,152 KiB; (6,291,456 - 2,413,152) / 18 = 215,461 by memory,
    # under Mosquitto's CPU (500 x 10,000 / 22 = 227,272). The autoscaler keeps 0.7 x 215,461 = 150,822.
    (autoscaler,) = mq_run.of_type("gcp:compute/regionAutoscaler:RegionAutoscaler")
    policy = autoscaler.get("autoscalingPolicy")
    assert policy["metrics"][0]["target"] == 150_822
    script = the(mq_run, "template").get("metadataStartupScript")
    mosquitto_unit = script.split('"$UNITS/iotbridge-mosquitto.service" <<UNIT\n', 1)[1].split("\nUNIT\n", 1)[0]
    assert "LimitNOFILE=219557" in mosquitto_unit  # one per device: 215,461 + 4,096
    assert "# Kernel limits for 215461 device connections" in script
    # A devices_per_host over what a host carries with the map of 4 x it: 4 x 220,000 = 880,000 registry devices
    # (3,520,000 KiB) leave 2,771,456 / 18 = 153,969.
    with pytest.raises(ValueError, match=r"devices_per_host must be 1\.\.153969"):
        build(device_auth="mosquitto", devices_per_host=220_000)

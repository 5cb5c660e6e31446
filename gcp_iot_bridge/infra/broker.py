"""Broker: the MQTT broker hosts behind a network load balancer (docs/device-protocol.md), over the device
registry's Firestore database (``RegistryDatabase``, an input).

Each host (Debian 12 from a regional managed instance group) runs Mosquitto on a loopback-only listener and a Unix
socket (the front's device sessions; ``BROKER_SOCKET``), the TLS front on 8883 that authenticates devices the IoT
Core way, and the bridge service that forwards to Pub/Sub (``iotbridge/bridge``). Mosquitto starts as root and
drops to ``mosquitto``, which owns its files; the front and the service run as ``iotbridge``, a member of
Mosquitto's group for its socket (``startup_script``; tests/bridge/test_simulated_host.py boots a host from it).
What it declares, and the GCP pitfall behind each choice:

- TLS: a CA and a server certificate from pulumi-tls, the server certificate naming the load balancer's static
  IP (devices verify it with ``mqtt_ca_cert``). The server's private key exists only as a Pulumi secret and in
  Secret Manager; hosts read it at boot. The broker passwords (front/bridge/backend on the loopback listener)
  are ``random.RandomPassword`` results kept the same way. Neither appears in metadata or outputs.
- Instance template with ``name_prefix``: templates are immutable and a MIG keeps using its template, so a fixed
  name cannot be replaced (the provider creates the new template before deleting the old one). Shielded VM,
  OS Login, no external IP; a Cloud NAT gives the hosts their way out (apt, PyPI).
- Regional MIG over the region's zones with auto-healing on an HTTP health check of the front (``/healthz`` on
  ``health_port``: healthy only while Mosquitto and the bridge service are up) and ``initial_delay_sec`` long
  enough for the startup script (apt + pip), or auto-healing recreates hosts forever.
- Autoscaler between ``min_hosts`` and ``max_hosts`` (at most 2000, a regional group's limit) on connected devices
  per host and CPU; the group has no target size of its own. Updates replace one host per zone at a time, never
  below the group's size (a regional group takes a fixed surge of 0 or at least its zones). Each host's units and
  kernel are sized for what its machine type carries (``host_sizing``; docs/broker-scaling.md).
- External passthrough network load balancer, backend-service based: a regional static IP, a regional backend
  service (``EXTERNAL``, TCP, ``CONNECTION`` balancing) with a *regional* health check (a global one is refused
  for this load balancer type), a forwarding rule on 8883. Passthrough keeps the device's source address, so
  the firewall allows 8883 from the device ranges, and the health-check port from Google's probe ranges only.
- Configs and commands reach the host that holds the device: each host has its own subscription to the
  ``device-commands`` topic, ``{prefix}-device-commands-{instance name}``, filtered on its host id, expiring 24 h
  after its host is gone, dead-lettering what it cannot deliver after ten attempts (``iotbridge.bridge.fanout``).
  Nothing here declares one per host: the group may run up to 2000 hosts, and a host that goes leaves nothing
  declared behind. The host registrar makes and deletes it at the host's start and clean stop (``_registrar``).
- The host registrar (``functions/host_registrar``): a gen2 function with internal ingress, callable by the hosts'
  account only, that makes a host's subscription for the VM its instance identity token names and sets that
  subscription's IAM policy (the hosts' account and Pub/Sub's agent as subscribers). Pub/Sub takes no IAM
  condition on a subscription's name, and a host's subscription does not exist when the stack is deployed: the
  project permissions this needs (``REGISTRAR_PERMISSIONS``) are the registrar's account's, not the hosts'.
- The bridge's service account (Foundation's ``bridge`` workload: logging.logWriter, monitoring.metricWriter)
  gets, on the resources where Pub/Sub and Firestore allow it: pubsub.publisher on the telemetry, state and route
  topics and on the dead-letter topic (a device's message Pub/Sub can never accept goes there, with the reason);
  run.invoker on the registrar; datastore.user conditioned on this database (presence and liveness records);
  secretAccessor on its two secrets; objectViewer on the bucket holding the bridge's code. No Pub/Sub role on the
  project (docs/broker-scaling.md, "What a host may do").
- ``device_auth`` "mosquitto" (the stack's ``brokerDeviceAuth``): no front on the hosts. Mosquitto terminates the
  devices' TLS on 8883 with the device plugin, compiled at boot from the archive's source, and the auth daemon
  answers it and the health checks (``/healthz`` on ``health_port``, as the front did); no HTTP bridge, so neither
  its port in the firewall nor its forwarding rule (``http_bridge_url`` is empty). docs/broker-scaling.md,
  "Devices authenticated by Mosquitto".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp
import pulumi_random as random
import pulumi_tls as tls
import pulumiverse_time as time

from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.admin_api import service_url
from gcp_iot_bridge.infra.buckets import private_bucket
from gcp_iot_bridge.infra.config_push import IAM_PROPAGATION_WAIT, RUNTIME
from gcp_iot_bridge.infra.registry_database import RegistryDatabase
from iotbridge.planning.host_sizing import MAX_HOSTS, HostSizing, group_sizing
from iotbridge.spec import CLOUD_RECHECK_INTERVAL_S, CONNECTED_DEVICES_METRIC, DEVICE_AUTH_MODES

# A host stopping (scale-in, a rolling replacement) ends its device sessions over this many seconds, after the load
# balancer has stopped sending it new ones: its devices reconnect to the other hosts spread over the window.
DRAIN_S = 30
# The front's unit waits this long for the drain before systemd kills it. The bridge service stops after the front
# (it forwards what the draining devices still publish), Mosquitto after both: systemd stops a unit that is
# ordered After= another before that other, so the front's unit is After= the service's.
FRONT_STOP_TIMEOUT_S = DRAIN_S + 30

MQTT_PORT = 8883
# What the host registrar (iotbridge/bridge/registrar.py) does with a host's delivery subscription: create it, get
# it when it exists already (a host's restart: is its filter the host's?), set its IAM policy (the hosts' account and
# Pub/Sub's agent as subscribers), delete it at the host's clean stop. The other half of creating it,
# ``pubsub.topics.attachSubscription``, is granted on the device-commands topic only. The hosts pull with
# ``roles/pubsub.subscriber`` on their own subscriptions, which the registrar grants, and hold no Pub/Sub project role.
REGISTRAR_PERMISSIONS = ("pubsub.subscriptions.create", "pubsub.subscriptions.delete", "pubsub.subscriptions.get",
                         "pubsub.subscriptions.setIamPolicy")
# The APIs the registrar's deployment calls besides the broker's own (a gen2 function: its build and its service).
REGISTRAR_APIS = ("cloudfunctions.googleapis.com", "run.googleapis.com", "cloudbuild.googleapis.com",
                  "artifactregistry.googleapis.com")
HTTP_BRIDGE_PORT = 8443  # IoT Core's HTTP device bridge (iotbridge/bridge/http_bridge.py), TLS like MQTT
# device_auth mosquitto: the auth daemon's Unix socket, in a folder of the daemon's user and Mosquitto's group (0750):
# the daemon makes the socket 0660 with Mosquitto's group, so only the two of them reach it.
AUTH_SOCKET = "/var/lib/iotbridge-authd/auth.sock"
# Where the device plugin is compiled at boot (root's, read by Mosquitto), and the folder of Mosquitto's copy of the
# server's certificate and key (Mosquitto terminates devices' TLS in that mode).
PLUGIN_DIR = "/opt/iotbridge/plugin"
MOSQUITTO_TLS_DIR = "/etc/iotbridge-mosquitto"
# What a host compiles the plugin with (the plugin's source includes Mosquitto's plugin headers and nothing of OpenSSL).
PLUGIN_BUILD_PACKAGES = ("gcc", "libc6-dev", "mosquitto-dev", "libmosquitto-dev")
BROKER_PORT = 1883  # loopback only
# Mosquitto's Unix socket for the front's device sessions (no ephemeral port each); Mosquitto makes it 0770,
# owned by its user and group, and the iotbridge user is a member of that group.
BROKER_SOCKET = "/var/lib/iotbridge-mosquitto/broker.sock"
# Google's health-check probe ranges (network load balancers and managed instance group auto-healing).
HEALTH_CHECK_RANGES = ("35.191.0.0/16", "130.211.0.0/22", "209.85.152.0/22", "209.85.204.0/22")


def code_files() -> dict[str, str]:
    """Path in the archive -> text, as deployed: the closure of ``python -m iotbridge.bridge``'s imports, its
    lock-pinned requirements.txt and the constraints.txt of everything they pull in
    (gcp_iot_bridge/infra/packaging.py). The startup script installs both (``-r requirements.txt -c constraints.txt``).
    """
    package = packaging.BROKER.package()
    return {**{rel: data.decode() for rel, data in package.files.items()},
            "requirements.txt": package.requirements_txt, "constraints.txt": package.constraints_txt}


def content_hash(files: Mapping[str, str]) -> str:
    """Names the archive's object: new on any change to a shipped file or pin."""
    return packaging.content_hash({rel: text.encode() for rel, text in files.items()})


@dataclass(frozen=True)
class BrokerArgs:
    project: str
    region: str
    prefix: str
    registry_id: str
    service_account_email: pulumi.Input[str]  # Foundation's "bridge" workload
    telemetry_topic: pulumi.Input[str]  # topic ids: projects/{p}/topics/{name}
    state_topic: pulumi.Input[str]
    commands_topic: pulumi.Input[str]  # the device-commands topic; each host subscribes to it itself
    deletion_protection: bool
    registry: RegistryDatabase  # the registry's Firestore database the hosts read and write
    # "serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com": forwards what a host's subscription
    # could not deliver to the dead-letter topic. Its publisher grant on that topic is Messaging's
    # (``dead_letter_publisher``): put it in depends_on.
    pubsub_agent: pulumi.Input[str]
    project_number: pulumi.Input[str]  # the host registrar's deterministic URL, the audience of the hosts' tokens
    # Subfolder routes (IoT Core allowed at most 10): subfolder -> topic id.
    routes: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    network: pulumi.Input[str] = "default"
    subnetwork: pulumi.Input[str] | None = None
    machine_type: str = "e2-standard-2"  # a type host_sizing knows: the hosts' limits are sized from its memory
    # Bounds of the autoscaler (up to MAX_HOSTS, a regional managed instance group's limit).
    min_hosts: int = 2
    max_hosts: int = 10
    # Connected devices per host the autoscaler keeps; default: host_sizing's target for machine_type.
    devices_per_host: int | None = None
    cpu_target: float = 0.6  # the second signal: CPU utilisation, (0, 1]
    zones: Sequence[str] = ()  # default: three of the region's zones, chosen by GCP
    image: str = "debian-cloud/debian-12"
    device_source_ranges: Sequence[str] = ("0.0.0.0/0",)
    tls_dns_names: Sequence[str] = ()
    tls_validity_hours: int = 24 * 365
    health_port: int = 8080
    autoheal_initial_delay_s: int = 600
    # "front": the TLS front authenticates devices; "mosquitto": Mosquitto terminates TLS and its plugin asks the
    # auth daemon (docs/broker-scaling.md, "Devices authenticated by Mosquitto"): no HTTP bridge (8443 not opened).
    device_auth: str = "front"
    # The stack's dead-letter topic: a device's message Pub/Sub can never accept goes there (the bridge publishes).
    dead_letter_topic: pulumi.Input[str] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # APIs: compute, firestore, secretmanager, pubsub, storage, iam
    kms_key_name: str | None = None  # CMEK for the code bucket; depends_on must hold the Storage agent's grant


class Broker(pulumi.ComponentResource):
    """TLS material and secrets, the bridge's grants, broker hosts (MIG) and the network load balancer on 8883.

    Each part of the constructor is one private method, in the order the resources depend on each other: the
    address and TLS, the secrets, the bridge's grants, the code, egress and firewall,
    the hosts, the load balancer. The ones before the hosts return what a host reads at boot (``boot_needs``).
    """

    # What devices and the rest of the stack use.
    registry_id: pulumi.Output[str]
    mqtt_endpoint: pulumi.Output[str]  # "{load balancer address}:8883"
    http_bridge_url: pulumi.Output[str]  # "https://{load balancer address}:8443"; "" with device_auth mosquitto
    mqtt_ca_cert: pulumi.Output[str]  # PEM of the CA devices verify the broker with
    address: gcp.compute.Address  # the load balancer's static IP
    registry: RegistryDatabase  # the registry's database (an input: RegistryDatabase)
    # The host registrar: the function that makes a host's delivery subscription on its behalf, its URL (the hosts'
    # token audience), its service account and the project role that account holds.
    registrar: gcp.cloudfunctionsv2.Function
    registrar_url: pulumi.Output[str]
    registrar_account: gcp.serviceaccount.Account
    registrar_role: gcp.projects.IAMCustomRole
    # The resources themselves, for a program that adds to them.
    ca_cert: tls.SelfSignedCert
    server_cert: tls.LocallySignedCert
    tls_key_secret: gcp.secretmanager.Secret
    passwords_secret: gcp.secretmanager.Secret
    bucket: gcp.storage.Bucket  # the bridge's code
    code: gcp.storage.BucketObject
    template: gcp.compute.InstanceTemplate
    group: gcp.compute.RegionInstanceGroupManager
    autoscaler: gcp.compute.RegionAutoscaler
    sizing: HostSizing  # what one host carries, and its units' and kernel's limits
    backend: gcp.compute.RegionBackendService
    forwarding_rule: gcp.compute.ForwardingRule
    # The HTTP bridge's port on the same address and hosts; None with device_auth mosquitto (no HTTP bridge).
    http_forwarding_rule: gcp.compute.ForwardingRule | None = None
    firewall_devices: gcp.compute.Firewall
    firewall_health: gcp.compute.Firewall
    nat: gcp.compute.RouterNat

    def __init__(self, name: str, args: BrokerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Broker", name, None, opts)
        if len(args.routes) > 10:
            raise ValueError(f"at most 10 subfolder routes (IoT Core's limit), got {len(args.routes)}")
        if not 1 <= args.min_hosts <= args.max_hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1 <= min_hosts <= max_hosts <= {MAX_HOSTS} (a regional managed instance "
                             f"group's limit), got {args.min_hosts}..{args.max_hosts}")
        if not 0 < args.cpu_target <= 1:
            raise ValueError(f"cpu_target must be in (0, 1], got {args.cpu_target}")
        if args.device_auth not in DEVICE_AUTH_MODES:
            raise ValueError(f"device_auth must be one of {', '.join(DEVICE_AUTH_MODES)}, got {args.device_auth!r}")
        self.sizing = group_sizing(args.machine_type, args.device_auth, args.max_hosts, args.devices_per_host)
        self._devices_per_host = args.devices_per_host or self.sizing.autoscale_target
        if not 0 < self._devices_per_host <= self.sizing.devices:
            raise ValueError(f"devices_per_host must be 1..{self.sizing.devices} (what one {args.machine_type} "
                             f"carries), got {self._devices_per_host}")
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        self._labels = dict(args.labels)
        self._member = pulumi.Output.from_input(args.service_account_email).apply(lambda e: f"serviceAccount:{e}")
        self._tag = f"{args.prefix}-broker"
        self.registry = args.registry

        server_key = self._address_and_tls()
        # Everything a host reads at boot; the group waits for it, or the first hosts fail their startup script
        # and auto-healing recreates them until the grants have propagated.
        secrets, code = self._secrets(server_key), self._code()  # the registrar's code goes in the code's bucket
        boot_needs = [*secrets, *self._bridge_grants(), *code]
        self._egress_and_firewall()
        self._hosts(boot_needs)
        self._autoscaler()
        self._load_balancer()

        self.mqtt_endpoint = self.address.address.apply(lambda a: f"{a}:{MQTT_PORT}")
        # Empty when no host runs the HTTP bridge (device_auth mosquitto).
        self.http_bridge_url = self.address.address.apply(
            lambda a: f"https://{a}:{HTTP_BRIDGE_PORT}" if HTTP_BRIDGE_PORT in self._device_ports() else "")
        self.mqtt_ca_cert = self.ca_cert.cert_pem
        self.registry_id = pulumi.Output.from_input(args.registry_id)
        self.register_outputs({
            "mqtt_endpoint": self.mqtt_endpoint,
            "http_bridge_url": self.http_bridge_url,
            "mqtt_ca_cert": self.mqtt_ca_cert,
            "registry_id": self.registry_id,
            "firestore_database": self.registry.name,
            "broker_passwords_secret": self.passwords_secret.secret_id,
        })

    def _address_and_tls(self) -> tls.PrivateKey:
        """The load balancer's static IP, the CA devices verify, and the server certificate naming that IP.

        Returns the server's private key, which only its Secret Manager version receives."""
        name, args, p = self._name, self._args, self._args.prefix
        self.address = gcp.compute.Address(
            f"{name}-ip", project=args.project, region=args.region, name=f"{p}-mqtt",
            address_type="EXTERNAL", network_tier="PREMIUM", labels=self._labels, opts=self._child)

        ca_key = tls.PrivateKey(f"{name}-ca-key", algorithm="ECDSA", ecdsa_curve="P256",
                                opts=pulumi.ResourceOptions(parent=self))
        self.ca_cert = tls.SelfSignedCert(
            f"{name}-ca",
            private_key_pem=ca_key.private_key_pem,
            is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(common_name=f"{p} MQTT CA", organization="gcp-iot-bridge"),
            validity_period_hours=args.tls_validity_hours * 2,
            allowed_uses=["cert_signing", "crl_signing", "digital_signature"],
            opts=pulumi.ResourceOptions(parent=self),
        )
        server_key = tls.PrivateKey(f"{name}-server-key", algorithm="ECDSA", ecdsa_curve="P256",
                                    opts=pulumi.ResourceOptions(parent=self))
        csr = tls.CertRequest(
            f"{name}-server-csr",
            private_key_pem=server_key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=f"{p} MQTT broker", organization="gcp-iot-bridge"),
            ip_addresses=[self.address.address],
            dns_names=list(args.tls_dns_names),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.server_cert = tls.LocallySignedCert(
            f"{name}-server-cert",
            cert_request_pem=csr.cert_request_pem,
            ca_private_key_pem=ca_key.private_key_pem,
            ca_cert_pem=self.ca_cert.cert_pem,
            validity_period_hours=args.tls_validity_hours,
            early_renewal_hours=24 * 30,
            allowed_uses=["digital_signature", "key_encipherment", "server_auth"],
            opts=pulumi.ResourceOptions(parent=self),
        )
        return server_key

    def _secrets(self, server_key: tls.PrivateKey) -> list[pulumi.Resource]:
        """The server's TLS key and the loopback listener's passwords (front, bridge, backend) in Secret Manager,
        with the bridge's access to both. Returns the versions and grants a host needs at boot."""
        name, p = self._name, self._args.prefix
        passwords = {
            user: random.RandomPassword(f"{name}-password-{user}", length=32, special=False,
                                        opts=pulumi.ResourceOptions(parent=self))
            for user in ("front", "bridge", "backend")
        }
        secret_json = pulumi.Output.all(*(pw.result for pw in passwords.values())).apply(
            lambda values: json.dumps(dict(zip(passwords, values, strict=True))))
        self.tls_key_secret, tls_key_version = self._secret("tls-key", f"{p}-broker-tls-key",
                                                            server_key.private_key_pem)
        self.passwords_secret, passwords_version = self._secret("passwords", f"{p}-broker-passwords",
                                                                pulumi.Output.secret(secret_json))
        needs: list[pulumi.Resource] = [tls_key_version, passwords_version]
        for key, secret in (("tls-key", self.tls_key_secret), ("passwords", self.passwords_secret)):
            needs.append(gcp.secretmanager.SecretIamMember(
                f"{name}-{key}-accessor", project=self._args.project, secret_id=secret.id,
                role="roles/secretmanager.secretAccessor", member=self._member, opts=self._child))
        return needs

    def _secret(self, key: str, secret_id: str, data: pulumi.Input[str],
                ) -> tuple[gcp.secretmanager.Secret, gcp.secretmanager.SecretVersion]:
        """One Secret Manager secret (auto replication, deletion protection from the stack) and its version."""
        args = self._args
        secret = gcp.secretmanager.Secret(
            f"{self._name}-{key}", project=args.project, secret_id=secret_id,
            replication=gcp.secretmanager.SecretReplicationArgs(auto=gcp.secretmanager.SecretReplicationAutoArgs()),
            deletion_protection=args.deletion_protection, labels=dict(self._labels), opts=self._child)
        version = gcp.secretmanager.SecretVersion(
            f"{self._name}-{key}-v", secret=secret.id, secret_data=pulumi.Output.secret(data),
            opts=pulumi.ResourceOptions(parent=secret))
        return secret, version

    def _bridge_grants(self) -> list[pulumi.Resource]:
        """The bridge's least privilege: publisher on its topics, the host registrar that makes its delivery
        subscription and grants it subscriber there (``_registrar``), datastore.user conditioned on the registry's
        database. Returns the bridge's grants and the registrar."""
        name, args = self._name, self._args
        needs: list[pulumi.Resource] = []
        publish_topics: dict[str, pulumi.Input[str]] = {"telemetry": args.telemetry_topic, "state": args.state_topic}
        for sub_folder, topic in sorted(args.routes.items()):
            # Two routes to one topic get one grant: two resources owning one binding would fight on destroy.
            if not (isinstance(topic, str) and topic in publish_topics.values()):
                publish_topics[f"route-{sub_folder}"] = topic
        if args.dead_letter_topic is not None:
            # The bridge dead-letters a device's message Pub/Sub can never accept (iotbridge.bridge.service).
            publish_topics["dead-letter"] = args.dead_letter_topic
        for key, topic in publish_topics.items():
            needs.append(gcp.pubsub.TopicIAMMember(
                f"{name}-publish-{key}", project=args.project, topic=topic, role="roles/pubsub.publisher",
                member=self._member, opts=self._child))
        needs.extend(self._registrar())
        # Devices, presence records (the front) and the hosts' liveness records (registries/{id}/bridge_hosts/...).
        needs.append(self.registry.user_grant(
            f"{name}-datastore-user", self._member, self._child, title="registry database only",
            condition=lambda db: f'resource.name.startsWith("{db}")'))
        return needs

    def _registrar(self) -> list[pulumi.Resource]:
        """The host registrar (``functions/host_registrar``), a gen2 function with internal ingress that makes and
        deletes a host's subscription for the VM the host's instance identity token names: its own runtime and
        build accounts, ``REGISTRAR_PERMISSIONS`` in a project role, attachSubscription on device-commands only,
        and ``run.invoker`` for the hosts' account. Returns the function and that invoker grant."""
        name, args, p = self._name, self._args, self._args.prefix
        package = packaging.HOST_REGISTRAR.package()
        files = {**package.files, "requirements.txt": package.requirements_txt.encode()}
        self.registrar_account = gcp.serviceaccount.Account(
            f"{name}-registrar-sa", project=args.project, account_id=f"{p}-hostreg",
            display_name=f"Broker host registrar ({p})", opts=self._child)
        build_account = gcp.serviceaccount.Account(
            f"{name}-registrar-build-sa", project=args.project, account_id=f"{p}-regbuild",
            display_name=f"Broker host registrar builds ({p})", opts=self._child)
        self.registrar_role = gcp.projects.IAMCustomRole(
            f"{name}-registrar-role", project=args.project, role_id=f"{p.replace('-', '_')}_host_registrar",
            title=f"Broker host registrar ({p})", stage="GA", permissions=list(REGISTRAR_PERMISSIONS),
            description=f"Makes, grants and deletes the {p}-device-commands-HOST subscriptions", opts=self._child)
        runtime = self.registrar_account.member
        grants = [
            gcp.projects.IAMMember(f"{name}-registrar-build", project=args.project,
                                   role="roles/cloudbuild.builds.builder", member=build_account.member,
                                   opts=self._child),
            gcp.projects.IAMMember(f"{name}-registrar-subscriptions", project=args.project,
                                   role=self.registrar_role.name, member=runtime, opts=self._child),
            gcp.pubsub.TopicIAMMember(f"{name}-registrar-attach", project=args.project, topic=args.commands_topic,
                                      role="roles/pubsub.subscriber", member=runtime, opts=self._child)]
        source = gcp.storage.BucketObject(
            f"{name}-registrar-code", bucket=self.bucket.name,
            name=f"registrar/{packaging.content_hash(files)}.zip",
            source=pulumi.AssetArchive({k: pulumi.StringAsset(v.decode()) for k, v in sorted(files.items())}),
            opts=self._child)
        # A new build account's role and the runtime account's grants apply only once IAM has propagated them
        # (typically 2 minutes): before that Cloud Build refuses the build.
        wait = time.Sleep(f"{name}-registrar-grants-wait", create_duration=IAM_PROPAGATION_WAIT,
                          triggers={f"grant{i}": g.id for i, g in enumerate(grants)},
                          opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.depends_on, *grants]))
        function_name = f"{p}-host-registrar"
        self.registrar_url = pulumi.Output.from_input(args.project_number).apply(
            lambda number: service_url(function_name, number, args.region))
        self.registrar = gcp.cloudfunctionsv2.Function(
            f"{name}-registrar", project=args.project, location=args.region, name=function_name,
            description="Makes and deletes each broker host's own delivery subscription on its behalf.",
            labels=dict(self._labels),
            build_config=gcp.cloudfunctionsv2.FunctionBuildConfigArgs(
                runtime=RUNTIME, entry_point="handle", service_account=build_account.name,
                source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceArgs(
                    storage_source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceStorageSourceArgs(
                        bucket=self.bucket.name, object=source.name))),
            service_config=gcp.cloudfunctionsv2.FunctionServiceConfigArgs(
                service_account_email=self.registrar_account.email, available_memory="256M", timeout_seconds=60,
                min_instance_count=0, max_instance_count=3, ingress_settings="ALLOW_INTERNAL_ONLY",
                all_traffic_on_latest_revision=True,
                environment_variables={
                    "PROJECT_ID": args.project, "PREFIX": p, "REGISTRAR_URL": self.registrar_url,
                    "HOSTS_ACCOUNT": args.service_account_email, "PUBSUB_AGENT": args.pubsub_agent}),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.depends_on, wait, source]))
        # A gen2 function runs as the Cloud Run service of the same name: the hosts' account may call it, no other.
        invoker = gcp.cloudrunv2.ServiceIamMember(
            f"{name}-registrar-invoker", project=args.project, location=args.region, name=self.registrar.name,
            role="roles/run.invoker", member=self._member, opts=self._child)
        return [self.registrar, invoker]

    def _code(self) -> list[pulumi.Resource]:
        """The bridge's code (``code_files()``) as a zip named by its content in a private bucket, and the bridge's
        right to read it. Returns that grant."""
        name, args = self._name, self._args
        files = code_files()
        digest = content_hash(files)
        self.bucket = private_bucket(
            f"{name}-code", project=args.project, name=f"{args.project}-{args.prefix}-broker-code",
            location=args.region, deletion_protection=args.deletion_protection, labels=self._labels,
            kms_key_name=args.kms_key_name, opts=self._child)
        # Named by content: hosts created from a new template fetch the new code, running ones keep theirs.
        self.code = gcp.storage.BucketObject(
            f"{name}-code-zip", bucket=self.bucket.name, name=f"bridge/{digest}.zip",
            source=pulumi.AssetArchive({k: pulumi.StringAsset(v) for k, v in sorted(files.items())}), opts=self._child)
        return [gcp.storage.BucketIAMMember(
            f"{name}-code-reader", bucket=self.bucket.name, role="roles/storage.objectViewer", member=self._member,
            opts=self._child)]

    def _egress_and_firewall(self) -> None:
        """Cloud NAT (the hosts have no external IP; apt and PyPI at boot) and the two ingress rules: 8883 from the
        device ranges, the health port from Google's probe ranges."""
        name, args, p = self._name, self._args, self._args.prefix
        router = gcp.compute.Router(f"{name}-router", project=args.project, region=args.region,
                                    name=f"{p}-broker-router", network=args.network, opts=self._child)
        self.nat = gcp.compute.RouterNat(
            f"{name}-nat", project=args.project, region=args.region, name=f"{p}-broker-nat", router=router.name,
            nat_ip_allocate_option="AUTO_ONLY", source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES",
            opts=self._child)
        self.firewall_devices = gcp.compute.Firewall(
            f"{name}-fw-mqtt", project=args.project, name=f"{p}-broker-mqtt", network=args.network,
            direction="INGRESS", source_ranges=list(args.device_source_ranges), target_tags=[self._tag],
            allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(port) for port in self._device_ports()])],
            opts=self._child)
        self.firewall_health = gcp.compute.Firewall(
            f"{name}-fw-health", project=args.project, name=f"{p}-broker-health", network=args.network,
            direction="INGRESS", source_ranges=list(HEALTH_CHECK_RANGES), target_tags=[self._tag],
            allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(args.health_port)])], opts=self._child)

    def _device_ports(self) -> list[int]:
        """The ports devices reach: MQTT, and the HTTP bridge's unless Mosquitto authenticates devices (no front)."""
        return [MQTT_PORT] if self._args.device_auth == "mosquitto" else [MQTT_PORT, HTTP_BRIDGE_PORT]

    def _hosts(self, boot_needs: Sequence[pulumi.Resource]) -> None:
        """The instance template (its startup script: ``startup_script``), the health checks of auto-healing and of
        the load balancer, and the regional managed instance group, created once ``boot_needs`` exist."""
        name, args, p = self._name, self._args, self._args.prefix
        route_names = list(args.routes)
        startup = pulumi.Output.all(
            self.bucket.name, self.code.name, self.tls_key_secret.secret_id, self.passwords_secret.secret_id,
            self.server_cert.cert_pem, self.registry.name, *(args.routes[k] for k in route_names),
            self.registrar_url,
        ).apply(lambda v: startup_script(
            project=args.project, region=args.region, registry_id=args.registry_id, prefix=args.prefix,
            code_url=f"gs://{v[0]}/{v[1]}", tls_key_secret=v[2], passwords_secret=v[3], server_cert_pem=v[4],
            database=v[5], routes={k: _topic_id(t) for k, t in zip(route_names, v[6:-1], strict=True)},
            health_port=args.health_port, machine_type=args.machine_type, registrar_url=v[-1],
            device_auth=args.device_auth, max_hosts=args.max_hosts, devices_per_host=args.devices_per_host))
        self.template = gcp.compute.InstanceTemplate(
            f"{name}-template",
            project=args.project,
            region=args.region,
            name_prefix=f"{p}-broker-",
            machine_type=args.machine_type,
            disks=[gcp.compute.InstanceTemplateDiskArgs(source_image=args.image, boot=True, auto_delete=True,
                                                        disk_size_gb=20, disk_type="pd-balanced")],
            network_interfaces=[gcp.compute.InstanceTemplateNetworkInterfaceArgs(
                network=args.network, subnetwork=args.subnetwork)],
            service_account=gcp.compute.InstanceTemplateServiceAccountArgs(
                email=args.service_account_email, scopes=["https://www.googleapis.com/auth/cloud-platform"]),
            shielded_instance_config=gcp.compute.InstanceTemplateShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True),
            metadata={"enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE"},
            metadata_startup_script=startup,
            tags=[self._tag],
            labels=self._labels,
            opts=self._child,
        )
        autoheal_check = gcp.compute.HealthCheck(
            f"{name}-autoheal", project=args.project, name=f"{p}-broker-autoheal",
            check_interval_sec=10, timeout_sec=5, healthy_threshold=2, unhealthy_threshold=3,
            http_health_check=gcp.compute.HealthCheckHttpHealthCheckArgs(port=args.health_port,
                                                                         request_path="/healthz"),
            opts=self._child)
        self._lb_check = gcp.compute.RegionHealthCheck(
            f"{name}-lb-check", project=args.project, region=args.region, name=f"{p}-broker-lb",
            check_interval_sec=5, timeout_sec=5, healthy_threshold=2, unhealthy_threshold=2,
            http_health_check=gcp.compute.RegionHealthCheckHttpHealthCheckArgs(
                port=args.health_port, request_path="/healthz"), opts=self._child)
        self.group = gcp.compute.RegionInstanceGroupManager(
            f"{name}-mig",
            project=args.project,
            region=args.region,
            name=f"{p}-broker",
            base_instance_name=f"{p}-broker",
            versions=[gcp.compute.RegionInstanceGroupManagerVersionArgs(
                name="bridge", instance_template=self.template.self_link_unique)],
            # No target size: the autoscaler owns it (a size set here would fight it on every `up`).
            distribution_policy_zones=list(args.zones) or None,
            auto_healing_policies=gcp.compute.RegionInstanceGroupManagerAutoHealingPoliciesArgs(
                health_check=autoheal_check.id, initial_delay_sec=args.autoheal_initial_delay_s),
            update_policy=self._update_policy(),
            named_ports=[gcp.compute.RegionInstanceGroupManagerNamedPortArgs(name="mqtts", port=MQTT_PORT)],
            # Hosts hold device sessions: a plan that shrinks or replaces them must not wait for "stable".
            wait_for_instances=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self._args.depends_on, *boot_needs, self.nat]),
        )

    def _update_policy(self) -> gcp.compute.RegionInstanceGroupManagerUpdatePolicyArgs:
        """Roll new code or config out one host per zone at a time, never below the group's size.

        A regional group takes a fixed ``maxUnavailable`` or ``maxSurge`` only as 0 or at least its number of zones
        (three unless ``zones`` names others). So nothing is unavailable (0) and one new host per zone is created
        first (surge = zones): an old host is deleted only once its substitute passes the health check, and at
        most one host per zone drops its devices at a time; they reconnect through the load balancer."""
        zones = len(self._args.zones) or 3
        return gcp.compute.RegionInstanceGroupManagerUpdatePolicyArgs(
            type="PROACTIVE", minimal_action="REPLACE", most_disruptive_allowed_action="REPLACE",
            replacement_method="SUBSTITUTE", instance_redistribution_type="PROACTIVE",
            max_surge_fixed=zones, max_unavailable_fixed=0)

    def _autoscaler(self) -> None:
        """The group's autoscaler between ``min_hosts`` and ``max_hosts``: connected devices per host (the gauge
        each host's bridge reports) and CPU; GCP sizes the group for whichever signal asks for more hosts. Scale-in
        removes at most one host per ten minutes, so its devices reconnect to the others before the next goes."""
        name, args = self._name, self._args
        self.autoscaler = gcp.compute.RegionAutoscaler(
            f"{name}-autoscaler",
            project=args.project,
            region=args.region,
            name=f"{args.prefix}-broker",
            target=self.group.id,
            autoscaling_policy=gcp.compute.RegionAutoscalerAutoscalingPolicyArgs(
                min_replicas=args.min_hosts,
                max_replicas=args.max_hosts,
                mode="ON",
                # A host's signals count once it has booted (apt and pip at boot: auto-healing's delay).
                cooldown_period=args.autoheal_initial_delay_s,
                metrics=[gcp.compute.RegionAutoscalerAutoscalingPolicyMetricArgs(
                    name=CONNECTED_DEVICES_METRIC, target=self._devices_per_host, type="GAUGE")],
                cpu_utilization=gcp.compute.RegionAutoscalerAutoscalingPolicyCpuUtilizationArgs(
                    target=args.cpu_target),
                scale_in_control=gcp.compute.RegionAutoscalerAutoscalingPolicyScaleInControlArgs(
                    max_scaled_in_replicas=gcp.compute.RegionAutoscalerAutoscalingPolicyScaleInControlMaxScaledInReplicasArgs(
                        fixed=1),
                    time_window_sec=600),
            ),
            opts=self._child,
        )

    def _load_balancer(self) -> None:
        """The external passthrough network load balancer: a regional backend service over the group (TCP,
        CONNECTION balancing, a regional health check) and the forwarding rule on 8883 at the static IP."""
        name, args, p = self._name, self._args, self._args.prefix
        self.backend = gcp.compute.RegionBackendService(
            f"{name}-backend", project=args.project, region=args.region, name=f"{p}-broker",
            load_balancing_scheme="EXTERNAL", protocol="TCP", health_checks=self._lb_check.id,
            # Long-lived MQTT sessions: let devices finish on a draining host before it goes.
            connection_draining_timeout_sec=60,
            backends=[gcp.compute.RegionBackendServiceBackendArgs(group=self.group.instance_group,
                                                                  balancing_mode="CONNECTION")],
            opts=self._child)
        self.forwarding_rule = gcp.compute.ForwardingRule(
            f"{name}-mqtt", project=args.project, region=args.region, name=f"{p}-mqtt",
            ip_address=self.address.address, ip_protocol="TCP", port_range=str(MQTT_PORT),
            load_balancing_scheme="EXTERNAL", network_tier="PREMIUM", backend_service=self.backend.id,
            labels=self._labels, opts=self._child)
        if HTTP_BRIDGE_PORT not in self._device_ports():
            return
        # A second rule on the same address and hosts rather than a port list on the first: the MQTT rule, which
        # devices already use, is not replaced.
        self.http_forwarding_rule = gcp.compute.ForwardingRule(
            f"{name}-http", project=args.project, region=args.region, name=f"{p}-http",
            ip_address=self.address.address, ip_protocol="TCP", port_range=str(HTTP_BRIDGE_PORT),
            load_balancing_scheme="EXTERNAL", network_tier="PREMIUM", backend_service=self.backend.id,
            labels=self._labels, opts=self._child)


def _topic_id(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


def startup_script(*, project: str, region: str, registry_id: str, prefix: str, code_url: str,
                   tls_key_secret: str, passwords_secret: str, server_cert_pem: str, database: str,
                   routes: Mapping[str, str], health_port: int, machine_type: str = "e2-standard-2",
                   registrar_url: str = "", device_auth: str = "front", max_hosts: int = 10,
                   devices_per_host: int | None = None) -> str:
    """The host's boot script: Mosquitto from Debian, the bridge in a venv, secrets from Secret Manager, the
    kernel and the units' open-files limits sized for what a ``machine_type`` host carries
    (``host_sizing.group_sizing``: with ``device_auth`` "mosquitto", beside its auth daemon's map of ``max_hosts`` x
    ``devices_per_host`` devices).

    The host id is the instance's name (``hostname -s`` on GCE; a managed instance group names its VMs
    ``{base_instance_name}-xxxx``, which ``iotbridge.spec.HOST_ID_RE`` accepts). The bridge names its delivery
    subscription after it and the front writes it into each device's presence record.

    ``device_auth`` "mosquitto": no front; the compiler and Mosquitto's plugin headers are installed and the device
    plugin compiled from the archive's source (``build-plugin``); the server's certificate and key go to Mosquitto's
    own folder (it terminates the devices' TLS on 8883); the auth daemon's unit (``authd``, its socket reached by
    its user and Mosquitto's group only) starts before Mosquitto's, the bridge service after it. The daemon serves
    ``/healthz`` on ``health_port`` in the front's place."""
    if device_auth not in DEVICE_AUTH_MODES:
        raise ValueError(f"device_auth must be one of {', '.join(DEVICE_AUTH_MODES)}, got {device_auth!r}")
    size = group_sizing(machine_type, device_auth, max_hosts, devices_per_host)
    by_mosquitto = device_auth == "mosquitto"
    tls_dir = f"__ROOT__{MOSQUITTO_TLS_DIR}" if by_mosquitto else "__ROOT__/etc/iotbridge"
    settings = {
        "project": project, "region": region, "registry_id": registry_id, "prefix": prefix,
        "host_id": "__HOSTNAME__", "front_host": "0.0.0.0", "front_port": MQTT_PORT,
        "http_port": 0 if by_mosquitto else HTTP_BRIDGE_PORT, "registrar_url": registrar_url,
        "broker_host": "127.0.0.1", "broker_port": BROKER_PORT, "broker_socket": f"__ROOT__{BROKER_SOCKET}",
        "tls_cert": f"{tls_dir}/server.pem", "tls_key": f"{tls_dir}/server-key.pem",
        "secrets_file": "__ROOT__/etc/iotbridge/secrets.json",
        "routes": [{"sub_folder": k, "topic": v} for k, v in sorted(routes.items())],
        "recheck_interval_s": CLOUD_RECHECK_INTERVAL_S, "drain_s": DRAIN_S, "workdir": "__ROOT__/var/lib/iotbridge",
        "health_port": health_port,
        "firestore_database": database,
        "connected_devices_metric": "cloud",
        **({"device_auth": "mosquitto", "auth_socket": f"__ROOT__{AUTH_SOCKET}"} if by_mosquitto else {}),
    }
    packages = " ".join(("mosquitto", "python3-venv", "unzip", *(PLUGIN_BUILD_PACKAGES if by_mosquitto else ())))
    # The units this host runs, besides Mosquitto's: the device-facing one (the front, or the auth daemon that
    # answers Mosquitto's plugin) and the bridge service.
    roles = "authd service" if by_mosquitto else "front service"
    if by_mosquitto:
        tls_setup = f"""\
# device_auth mosquitto: Mosquitto terminates the devices' TLS; its copy of the certificate and key is its own.
MQTLS=$ROOT{MOSQUITTO_TLS_DIR} AUTHD=$ROOT{AUTH_SOCKET.rsplit("/", 1)[0]} PLUGIN=$ROOT{PLUGIN_DIR}
install -d -m 0700 -o mosquitto -g mosquitto "$MQTLS"
# The auth daemon's socket folder: the daemon's user writes it, Mosquitto's group enters it (nobody else).
install -d -m 0750 -o iotbridge -g mosquitto "$AUTHD"
"""
        key_file, cert_file = '"$MQTLS/server-key.pem"', '"$MQTLS/server.pem"'
        build_plugin = """\
# The device plugin, compiled from the archive's source against this host's Mosquitto headers (root's, 0755).
"$OPT/venv/bin/python" -m iotbridge.bridge build-plugin --out "$PLUGIN"
"""
        plugin_arg = ' --plugin "$PLUGIN/iotbridge_auth.so"'
        tls_owner = 'chown mosquitto:mosquitto "$MQTLS"/*\n'
        mosquitto_faces = "devices on TLS with the device plugin, the host's own on loopback"
        mosquitto_after = " iotbridge-authd.service"
        mosquitto_wants = "Wants=iotbridge-authd.service\n"
    else:
        tls_setup, key_file, cert_file, build_plugin, plugin_arg, tls_owner = (
            "", '"$ETC/server-key.pem"', '"$ETC/server.pem"', "", "", "")
        mosquitto_after, mosquitto_wants, mosquitto_faces = "", "", "the loopback listener"
    return f"""#!/bin/bash
# Broker host boot (generated by infra/components/broker.py). Secrets come from Secret Manager at boot,
# never from metadata. Re-running is safe: every step overwrites its own files.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# The production paths. IOTBRIDGE_ROOT (unset on a host) moves them under a throw-away folder: the simulated
# host test runs this very script on a test machine.
ROOT=${{IOTBRIDGE_ROOT:-}}
OPT=$ROOT/opt/iotbridge VAR=$ROOT/var/lib/iotbridge ETC=$ROOT/etc/iotbridge UNITS=$ROOT/etc/systemd/system
MQ=$ROOT/var/lib/iotbridge-mosquitto
apt-get update -q
apt-get install -y -q {packages}
systemctl disable --now mosquitto
# The front and the bridge service run unprivileged (8883 needs no root); Mosquitto drops to its own user.
id iotbridge >/dev/null 2>&1 || useradd --system --home-dir /var/lib/iotbridge --shell /usr/sbin/nologin iotbridge
# The front reaches Mosquitto's Unix socket (mode 0770, Mosquitto's group) in Mosquitto's folder (0750).
usermod -a -G mosquitto iotbridge
install -d -m 0755 "$OPT" "$UNITS"
install -d -m 0750 -o iotbridge -g iotbridge "$VAR"
install -d -m 0700 -o iotbridge -g iotbridge "$ETC"
# Mosquitto (Debian 12's 2.0) drops to its user before it opens its log, password and ACL files, and autosaves
# its retained messages and the bridge's queued QoS 1 session as that user: its folder is its own, not the bridge's.
install -d -m 0750 -o mosquitto -g mosquitto "$MQ"
{tls_setup}gcloud storage cp {code_url} "$OPT/bridge.zip"
rm -rf "$OPT/app" && unzip -q -o "$OPT/bridge.zip" -d "$OPT/app"
# Pulumi zips an archive with no Unix modes, which unzip turns into 0600: the services' user must read the code.
chmod -R u=rwX,go=rX "$OPT/app"
python3 -m venv "$OPT/venv"
# The versions the tests ran: the top-level pins, every other package of their closure held by the constraints.
"$OPT/venv/bin/pip" install -q -r "$OPT/app/requirements.txt" -c "$OPT/app/constraints.txt"
umask 077
gcloud secrets versions access latest --secret={tls_key_secret} --project={project} > {key_file}
gcloud secrets versions access latest --secret={passwords_secret} --project={project} > "$ETC/secrets.json"
umask 022
cat > {cert_file} <<'PEM'
{server_cert_pem.strip()}
PEM
cat > "$ETC/settings.json.in" <<'JSON'
{json.dumps(settings, indent=2)}
JSON
sed -e "s/__HOSTNAME__/$(hostname -s)/" -e "s|__ROOT__|$ROOT|g" "$ETC/settings.json.in" > "$ETC/settings.json"
cd "$OPT/app"
{build_plugin}"$OPT/venv/bin/python" -m iotbridge.bridge mosquitto-config --settings "$ETC/settings.json" \\
    --out "$MQ" --user mosquitto{plugin_arg}
chown -R mosquitto:mosquitto "$MQ"
chown iotbridge:iotbridge "$ETC"/*
{tls_owner}# Kernel limits for {size.devices} device connections (iotbridge/planning/host_sizing.py).
install -d -m 0755 "$ROOT/etc/sysctl.d"
cat > "$ROOT/etc/sysctl.d/60-iotbridge.conf" <<'SYSCTL'
{size.sysctl_conf().strip()}
SYSCTL
systemctl restart systemd-sysctl
# Open files: the front holds two per device, Mosquitto one, the bridge service and the auth daemon a fixed set.
NOFILE_front={size.front_nofile} NOFILE_service={size.service_nofile} NOFILE_authd={size.service_nofile}
# systemd stops a unit with After=X before X: the front (draining its devices) first, then the bridge service, then
# Mosquitto; the auth daemon (which Mosquitto's plugin asks) starts before Mosquitto and stops after it.
AFTER_front=" iotbridge-mosquitto.service iotbridge-service.service" AFTER_service=" iotbridge-mosquitto.service"
AFTER_authd=""
STOP_front={FRONT_STOP_TIMEOUT_S} STOP_service=90 STOP_authd=30
# The auth daemon gives its socket to Mosquitto's group and writes it in its own folder.
ARGS_front="" ARGS_service="" ARGS_authd=" --group mosquitto"
RW_front="$VAR" RW_service="$VAR" RW_authd="$VAR ${{AUTHD:-}}"
for role in {roles}; do
nofile=NOFILE_$role after=AFTER_$role stop=STOP_$role args=ARGS_$role rw=RW_$role
cat > "$UNITS/iotbridge-$role.service" <<UNIT
[Unit]
Description=gcp-iot-bridge $role
After=network-online.target${{!after}}
Wants=network-online.target
[Service]
User=iotbridge
WorkingDirectory=$OPT/app
ExecStart=$OPT/venv/bin/python -m iotbridge.bridge $role --settings $ETC/settings.json${{!args}}
LimitNOFILE=${{!nofile}}
TimeoutStopSec=${{!stop}}
NoNewPrivileges=true
ProtectSystem=strict
ReadWritePaths=${{!rw}}
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
done
cat > "$UNITS/iotbridge-mosquitto.service" <<UNIT
[Unit]
Description=Mosquitto of gcp-iot-bridge ({mosquitto_faces})
After=network-online.target{mosquitto_after}
{mosquitto_wants}[Service]
ExecStart=/usr/sbin/mosquitto -c $MQ/mosquitto.conf
Restart=always
RestartSec=2
LimitNOFILE={size.broker_nofile}
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now {" ".join(host_units(device_auth))}
"""


def host_units(device_auth: str = "front") -> tuple[str, ...]:
    """The systemd units a host runs, in the order its startup script enables (and starts) them."""
    if device_auth == "mosquitto":
        return ("iotbridge-authd", "iotbridge-mosquitto", "iotbridge-service")
    return ("iotbridge-mosquitto", "iotbridge-service", "iotbridge-front")

"""Config push: the Cloud Function (gen2) that versions device configs and pushes them to devices.

What it declares, and the GCP pitfall behind each choice:

- Source: ``main.py`` and the closure of its imports (``iotbridge/registry.py`` and its package), with a
  requirements.txt of the distributions they import at requirements/lock.txt's versions, all derived by
  gcp_iot_bridge/infra/packaging.py, zipped into a bucket object named by the content hash. Cloud Functions
  only rebuilds when the object name changes, so a fixed name would keep serving the old code after an edit
  (the function's inputs would be unchanged, so nothing would be redeployed).
- ``cloudfunctionsv2.Function``, runtime python312, its own runtime service account (Foundation's
  ``config-push`` workload), a build service account of its own: since 2024 builds default to the Compute
  Engine default account, which organisation policy often leaves without roles, and the deploy then fails in
  Cloud Build.
- Delivery ``mqtt`` (paho publish to a broker): the backend MQTT password as a Secret Manager secret
  environment variable; the runtime account gets ``secretAccessor`` on that one secret before the function is
  created, or the first revision fails to start. Delivery ``fanout``: publisher on the bridge's
  device-commands topic instead, each version addressed to the broker host that holds the device (its presence
  record in the registry's database, which the function's datastore.user grant covers); no secret, no VPC.
- Egress (``mqtt``) through the VPC (Direct VPC egress, or a Serverless VPC Access connector) for private ranges
  only, so
  the broker hosts are reached on their internal address while Google APIs keep their direct path. Ingress is
  internal only: Eventarc's Pub/Sub push counts as internal traffic in the same project.
- Eventarc trigger on the config-requests topic with ``RETRY_POLICY_RETRY`` and a trigger identity of its own
  with ``run.invoker`` on the function's Cloud Run service (``cloudfunctions.invoker`` does not cover gen2).
  Service agents: Eventarc's keeps ``eventarc.serviceAgent`` (granted at first use, but lost if someone cleans
  the project's IAM); Pub/Sub's gets ``iam.serviceAccountTokenCreator`` on the trigger identity, needed to mint
  the push OIDC token in projects whose agent predates 2021-04-08.
- Dead letters: the subscription Eventarc creates for the trigger is managed by Eventarc; neither the Eventarc
  API nor pulumi-gcp can give it a dead-letter policy (neither the trigger nor the function has a field for it),
  and a Python dynamic provider patching it afterwards does not load outside ``__main__``. So the
  function dead-letters itself: permanent refusals at once, transient failures once the request is 23 h old
  (before Eventarc's 24 h retention drops it). The runtime account publishes to the dead-letter topic.
- Waits on a fresh project: the function is created only after two ``pulumiverse_time.Sleep`` resources, because
  GCP answers before what it was asked has propagated. The Eventarc trigger is refused with "Permission denied
  while using the Eventarc Service Agent" for minutes after the agent is created and granted;
  the build fails while the new build account's role, and the
  revision while the runtime account's grants, have not propagated (IAM: typically 2 minutes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulumi
import pulumi_gcp as gcp
import pulumiverse_time as time

from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.buckets import private_bucket
from gcp_iot_bridge.infra.registry_database import RegistryDatabase

# The APIs this component's resources call; pass ``foundation.needs(*APIS)`` as ``depends_on``.
APIS: tuple[str, ...] = (
    "cloudfunctions.googleapis.com", "run.googleapis.com", "eventarc.googleapis.com", "cloudbuild.googleapis.com",
    "artifactregistry.googleapis.com", "storage.googleapis.com", "secretmanager.googleapis.com",
    "pubsub.googleapis.com", "iam.googleapis.com", "cloudresourcemanager.googleapis.com",
    "firestore.googleapis.com",
)
RUNTIME = "python312"
# How long the first `up` waits for GCP to propagate what the function needs (see "Waits" above).
EVENTARC_AGENT_WAIT = "180s"
IAM_PROPAGATION_WAIT = "120s"
ENTRY_POINT = "handle"
PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"


def archive_contents() -> dict[str, bytes]:
    """Path inside the zip -> bytes: exactly what is deployed (and what the local tests serve). The requirements
    pin the distributions the code imports; the rest of their closure resolves at build time, because the runtime
    (Python 3.12) is not the one the lock is made for."""
    package = packaging.CONFIG_PUSH.package()
    return {**package.files, "requirements.txt": package.requirements_txt.encode()}


content_hash = packaging.content_hash
stage = packaging.stage


@dataclass(frozen=True)
class ConfigPushArgs:
    project: str
    region: str
    prefix: str
    registry_id: str
    service_account_email: pulumi.Input[str]  # the function's runtime identity (Foundation "config-push")
    requests_topic: pulumi.Input[str]  # projects/{p}/topics/{prefix}-config-requests
    dead_letter_topic: pulumi.Input[str]  # projects/{p}/topics/{prefix}-dead-letter
    pubsub_agent: pulumi.Input[str]  # "serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    eventarc_agent: pulumi.Input[str]  # "serviceAccount:service-{number}@gcp-sa-eventarc.iam.gserviceaccount.com"
    deletion_protection: bool
    registry: RegistryDatabase  # the registry's Firestore database; the function reads and writes it only
    # "mqtt": paho publish to one broker, which needs mqtt_host, mqtt_password_secret and VPC egress.
    # "fanout": the bridge's device-commands topic, addressed to the device's host; needs fanout_topic only.
    delivery: Literal["mqtt", "fanout"] = "mqtt"
    fanout_topic: pulumi.Input[str] | None = None  # projects/{p}/topics/{prefix}-device-commands
    mqtt_host: pulumi.Input[str] | None = None  # the broker's internal address (or DNS name in its certificate)
    mqtt_password_secret: pulumi.Input[str] | None = None  # Secret Manager secret id (not the full name)
    # Egress (mqtt): Direct VPC (network + subnetwork) or a Serverless VPC Access connector; exactly one.
    network: pulumi.Input[str] | None = None
    subnetwork: pulumi.Input[str] | None = None
    vpc_connector: pulumi.Input[str] | None = None
    mqtt_port: int = 8883
    mqtt_username: str = "backend"
    mqtt_tls: bool = True
    mqtt_ca_cert: pulumi.Input[str] = ""  # PEM of the broker's CA (public)
    # Secret env vars are read when an instance starts; "latest" lets a rotated password reach new instances.
    mqtt_password_version: str = "latest"
    max_instances: int = 10  # also bounds the broker connections the function opens
    timeout_seconds: int = 60
    memory: str = "256Mi"
    min_update_interval_s: float = 1.0
    depends_on: Sequence[pulumi.Resource] = ()  # foundation.needs(*APIS)
    labels: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, bytes] | None = None  # default: archive_contents()
    kms_key_name: str | None = None  # CMEK for the source bucket; depends_on must hold the Storage agent's grant


class ConfigPush(pulumi.ComponentResource):
    """The config-push function with its source archive, identities, grants and Eventarc trigger.

    Each part of the constructor is one private method: the source archive, the build and trigger identities, the
    runtime identity's grants, the service agents' roles, the waits for IAM to propagate, the function and who may
    invoke it.
    """

    function: gcp.cloudfunctionsv2.Function  # its name is the stack output config_push_function
    source_hash: str  # content hash of the deployed archive (archive_contents())
    bucket: gcp.storage.Bucket
    source_object: gcp.storage.BucketObject
    build_account: gcp.serviceaccount.Account
    trigger_account: gcp.serviceaccount.Account
    invoker: gcp.cloudrunv2.ServiceIamMember
    eventarc_wait: time.Sleep
    grants_wait: time.Sleep

    def __init__(self, name: str, args: ConfigPushArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:ConfigPush", name, None, opts)
        _check(args)
        self._name = name
        self._args = args
        self._mqtt = args.delivery == "mqtt"
        self._direct_vpc = args.network is not None or args.subnetwork is not None
        # The registry's database first: the function's first revision reads it.
        self._deps: list[pulumi.Resource] = [*args.depends_on, args.registry]
        self._child = pulumi.ResourceOptions(parent=self, depends_on=self._deps)
        self._runtime_member = pulumi.Output.from_input(args.service_account_email).apply(
            lambda e: f"serviceAccount:{e}")

        self._source()
        build_grant = self._identities()
        grants = self._runtime_grants()
        agents = self._service_agents()
        self._waits(build_grant, grants, agents)
        self._function([build_grant, *grants, *agents, self.eventarc_wait, self.grants_wait])

        self.register_outputs({
            "config_push_function": self.function.name,
            "source_object": self.source_object.name,
            "trigger_service_account": self.trigger_account.email,
        })

    def _source(self) -> None:
        """The function's archive (``archive_contents()`` or ``args.sources``) in a private bucket, named by its
        content hash: Cloud Functions rebuilds only when the object's name changes."""
        name, args = self._name, self._args
        contents = dict(args.sources) if args.sources is not None else archive_contents()
        self.source_hash = content_hash(contents)
        self.bucket = private_bucket(
            f"{name}-source", project=args.project, name=f"{args.project}-{args.prefix}-fn-source",
            location=args.region, deletion_protection=args.deletion_protection, labels=args.labels,
            kms_key_name=args.kms_key_name, opts=self._child)
        self.source_object = gcp.storage.BucketObject(
            f"{name}-archive",
            bucket=self.bucket.name,
            name=f"config-push/{self.source_hash}.zip",
            source=pulumi.AssetArchive({k: pulumi.StringAsset(v.decode()) for k, v in sorted(contents.items())}),
            opts=self._child,
        )

    def _identities(self) -> gcp.projects.IAMMember:
        """The build account (with its Cloud Build role) and the Eventarc trigger's account. Returns the build
        account's grant, which the build waits for."""
        name, args = self._name, self._args
        self.build_account = gcp.serviceaccount.Account(
            f"{name}-build-sa",
            project=args.project,
            account_id=f"{args.prefix}-cfgbuild",
            display_name=f"Config-push function builds ({args.prefix})",
            opts=self._child,
        )
        build_grant = gcp.projects.IAMMember(
            f"{name}-build-sa-builder",
            project=args.project,
            role="roles/cloudbuild.builds.builder",
            member=self.build_account.member,
            opts=self._child,
        )
        self.trigger_account = gcp.serviceaccount.Account(
            f"{name}-trigger-sa",
            project=args.project,
            account_id=f"{args.prefix}-cfgtrig",
            display_name=f"Config-push Eventarc trigger ({args.prefix})",
            opts=self._child,
        )
        return build_grant

    def _runtime_grants(self) -> list[pulumi.CustomResource]:
        """What the function reads and writes: the MQTT password secret (``mqtt``) or the fan-out topic
        (``fanout``), the registry's database only, and the dead-letter topic."""
        name, args = self._name, self._args
        grants: list[pulumi.CustomResource] = []
        if self._mqtt:
            grants.append(gcp.secretmanager.SecretIamMember(
                f"{name}-mqtt-password-accessor",
                project=args.project,
                secret_id=args.mqtt_password_secret or "",
                role="roles/secretmanager.secretAccessor",
                member=self._runtime_member,
                opts=self._child,
            ))
        else:
            grants.append(gcp.pubsub.TopicIAMMember(
                f"{name}-fanout-publisher",
                project=args.project,
                topic=args.fanout_topic or "",
                role="roles/pubsub.publisher",
                member=self._runtime_member,
                opts=self._child,
            ))
        # The registry database only, not every database of the project.
        grants.append(args.registry.user_grant(
            f"{name}-firestore-user", self._runtime_member, self._child, title="registry-database-only",
            condition=lambda db: f'resource.name == "{db}" || resource.name.startsWith("{db}/")'))
        grants.append(gcp.pubsub.TopicIAMMember(
            f"{name}-dead-letter-publisher",
            project=args.project,
            topic=args.dead_letter_topic,
            role="roles/pubsub.publisher",
            member=self._runtime_member,
            opts=self._child,
        ))
        return grants

    def _service_agents(self) -> list[pulumi.CustomResource]:
        """Eventarc's agent keeps ``eventarc.serviceAgent``; Pub/Sub's may mint the push token as the trigger's
        account. Returns both grants."""
        name, args = self._name, self._args
        eventarc_agent = gcp.projects.IAMMember(
            f"{name}-eventarc-agent",
            project=args.project,
            role="roles/eventarc.serviceAgent",
            member=args.eventarc_agent,
            opts=self._child,
        )
        token_creator = gcp.serviceaccount.IAMMember(
            f"{name}-pubsub-agent-token-creator",
            service_account_id=self.trigger_account.name,
            role="roles/iam.serviceAccountTokenCreator",
            member=args.pubsub_agent,
            opts=self._child,
        )
        return [eventarc_agent, token_creator]

    def _waits(self, build_grant: pulumi.CustomResource, grants: Sequence[pulumi.CustomResource],
               agents: Sequence[pulumi.CustomResource]) -> None:
        """The two waits for propagation (see the module docstring): the Eventarc agent's role with Pub/Sub's
        token creator, and the build and runtime grants."""
        name, deps = self._name, self._deps
        eventarc_agent, token_creator = agents
        # The Eventarc agent is created lazily and its role propagates for minutes: until then creating the
        # function's trigger fails with "Permission denied while using the Eventarc Service Agent. If you recently
        # started to use Eventarc, it may take a few minutes ..." (waiting 2-3 minutes after the grant is
        # enough). Pub/Sub's token creator on the trigger identity goes with it.
        self.eventarc_wait = time.Sleep(
            f"{name}-eventarc-agent-wait",
            create_duration=EVENTARC_AGENT_WAIT,
            triggers={"eventarc_agent": eventarc_agent.id, "token_creator": token_creator.id},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, eventarc_agent, token_creator]),
        )
        # A role granted to the new build account, and the runtime account's grants, take effect only once IAM has
        # propagated them (typically 2 minutes): before that
        # Cloud Build refuses the build and the first revision cannot read its secret or the registry.
        delivery, firestore_user, dead_letter_publisher = grants
        self.grants_wait = time.Sleep(
            f"{name}-grants-wait",
            create_duration=IAM_PROPAGATION_WAIT,
            triggers={"build": build_grant.id, "firestore": firestore_user.id,
                      "dead_letter": dead_letter_publisher.id, "grant0": delivery.id},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, build_grant, *grants]),
        )

    def _function(self, needs: Sequence[pulumi.Resource]) -> None:
        """The gen2 function (build, service and Eventarc trigger), created once ``needs`` exist, and the trigger
        account's ``run.invoker`` on the function's Cloud Run service."""
        name, args, mqtt, direct_vpc = self._name, self._args, self._mqtt, self._direct_vpc
        self.function = gcp.cloudfunctionsv2.Function(
            name,
            project=args.project,
            location=args.region,
            name=f"{args.prefix}-config-push",
            description="Versions device configs in the registry and publishes them over MQTT.",
            labels=dict(args.labels),
            build_config=gcp.cloudfunctionsv2.FunctionBuildConfigArgs(
                runtime=RUNTIME,
                entry_point=ENTRY_POINT,
                service_account=self.build_account.name,
                source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceArgs(
                    storage_source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceStorageSourceArgs(
                        bucket=self.bucket.name,
                        object=self.source_object.name,
                    ),
                ),
            ),
            service_config=gcp.cloudfunctionsv2.FunctionServiceConfigArgs(
                service_account_email=args.service_account_email,
                available_memory=args.memory,
                timeout_seconds=args.timeout_seconds,
                min_instance_count=0,
                max_instance_count=args.max_instances,
                max_instance_request_concurrency=1,
                ingress_settings="ALLOW_INTERNAL_ONLY",
                all_traffic_on_latest_revision=True,
                environment_variables=self._environment(),
                secret_environment_variables=[
                    gcp.cloudfunctionsv2.FunctionServiceConfigSecretEnvironmentVariableArgs(
                        key="MQTT_PASSWORD",
                        project_id=args.project,
                        secret=args.mqtt_password_secret or "",
                        version=args.mqtt_password_version,
                    ),
                ] if mqtt else None,
                direct_vpc_network_interfaces=[
                    gcp.cloudfunctionsv2.FunctionServiceConfigDirectVpcNetworkInterfaceArgs(
                        network=args.network, subnetwork=args.subnetwork),
                ] if mqtt and direct_vpc else None,
                direct_vpc_egress="VPC_EGRESS_PRIVATE_RANGES_ONLY" if mqtt and direct_vpc else None,
                vpc_connector=args.vpc_connector if mqtt else None,
                vpc_connector_egress_settings="PRIVATE_RANGES_ONLY" if mqtt and not direct_vpc else None,
            ),
            event_trigger=gcp.cloudfunctionsv2.FunctionEventTriggerArgs(
                trigger_region=args.region,
                event_type=PUBSUB_EVENT,
                pubsub_topic=args.requests_topic,
                retry_policy="RETRY_POLICY_RETRY",
                service_account_email=self.trigger_account.email,
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self._deps, *needs]),
        )
        self.invoker = gcp.cloudrunv2.ServiceIamMember(
            f"{name}-trigger-invoker",
            project=args.project,
            location=args.region,
            name=self.function.name,  # a gen2 function runs as the Cloud Run service of the same name
            role="roles/run.invoker",
            member=self.trigger_account.member,
            opts=self._child,
        )

    def _environment(self) -> dict[str, pulumi.Input[str]]:
        """The function's environment: the registry, the dead-letter topic and the delivery's own settings."""
        args = self._args
        env: dict[str, pulumi.Input[str]] = {
            "PROJECT_ID": args.project,
            "REGION": args.region,
            "REGISTRY_ID": args.registry_id,
            "FIRESTORE_DATABASE": args.registry.name,
            "DEAD_LETTER_TOPIC": args.dead_letter_topic,
            "CONFIG_MIN_INTERVAL_S": f"{args.min_update_interval_s:g}",
            "CONFIG_DELIVERY": args.delivery,
            "LOG_EXECUTION_ID": "true",
        }
        if self._mqtt:
            env.update({
                "MQTT_HOST": args.mqtt_host or "",
                "MQTT_PORT": str(args.mqtt_port),
                "MQTT_TLS": "true" if args.mqtt_tls else "false",
                "MQTT_USERNAME": args.mqtt_username,
                "MQTT_CA_CERT": args.mqtt_ca_cert,
            })
        else:
            env["FANOUT_TOPIC"] = args.fanout_topic or ""
        return env


def _check(args: ConfigPushArgs) -> None:
    """Refuse a delivery mode without what it needs, before anything is declared."""
    direct_vpc = args.network is not None or args.subnetwork is not None
    if args.delivery not in ("mqtt", "fanout"):
        raise ValueError(f"config push delivery must be mqtt or fanout, got {args.delivery!r}")
    if args.delivery == "mqtt":
        if args.mqtt_host is None or args.mqtt_password_secret is None:
            raise ValueError("config push delivery mqtt needs mqtt_host and mqtt_password_secret")
        if direct_vpc == (args.vpc_connector is not None):
            raise ValueError("config push egress: give network+subnetwork (Direct VPC) or vpc_connector, "
                             "exactly one")
        if direct_vpc and (args.network is None or args.subnetwork is None):
            raise ValueError("config push egress: Direct VPC needs both network and subnetwork")
    elif args.fanout_topic is None:
        raise ValueError("config push delivery fanout needs fanout_topic")
    if not 1 <= args.timeout_seconds <= 540:
        raise ValueError(f"timeout_seconds must be 1..540 for an event-driven function, got {args.timeout_seconds}")

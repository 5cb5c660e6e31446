"""AdminApi: IoT Core's device manager API (``cloudiot.googleapis.com/v1``) as a Cloud Run service over the registry.

The service runs ``python -m iotbridge.admin`` from an image of ``iotbridge/admin/Dockerfile``, built and pushed by
pulumi-docker-build (or a prebuilt image named in stack config), installed with ``requirements/lock.txt`` as
constraints. What it declares, and the reason behind each choice (docs/admin-api-auth.md has the operator's view):

- **Who may call it.** Google's client libraries send an OAuth2 *access token*; Cloud Run's invoker check accepts
  only an ID token minted for the service's URL, so it would refuse every unmodified client. The service therefore
  takes all traffic (``ingress`` ``INGRESS_TRAFFIC_ALL``) and is open at the Cloud Run level (``roles/run.invoker``
  for ``allUsers``, or, where an organization policy such as domain-restricted sharing refuses ``allUsers``, the
  service's ``invoker_iam_disabled``), while the app verifies every request's token and checks the caller against
  the stack's ``adminApiReaders`` / ``adminApiWriters`` (``iotbridge/admin/auth.py``, ``ADMIN_AUTH=google``).
  The policy pack allows exactly this: a Cloud Run service open to all only when it is this service and its
  container verifies tokens itself.
- **Its identity** (Foundation's ``admin-api`` workload: log and metric writer) gets, on the resources only:
  ``datastore.user`` conditioned on the registry's database, ``pubsub.publisher`` on the topics it publishes to
  (the device-commands fan-out that carries configs and commands to every broker host). Nothing project-wide
  beyond Foundation's two roles.
- **Propagation.** A grant takes effect only once IAM has propagated it (typically 2 minutes); the service waits
  for ``IAM_PROPAGATION_WAIT`` after its grants, so its first revision does not start without access and fail the
  create (a Cloud Run service whose first revision failed is left half-created and the next ``pulumi up`` meets
  it as "already exists").
- **Teardown.** The provider's ``deletion_protection`` defaults to true for Cloud Run services and makes
  ``pulumi destroy`` fail; it follows the stack's one teardown switch here, so dev and demo destroy in one command.
- **Scaling.** ``min_instances``/``max_instances`` from config (0 scales to zero: the first call after idling
  waits for a cold start).

Outputs: ``url`` (the stack output ``admin_api_url``: the service's https URL; clients set it as their
``api_endpoint``), ``service_name``, ``service_account`` (its identity's email), ``image`` (the image it runs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp
import pulumiverse_time as time

from gcp_iot_bridge.infra.images import ImageArgs, files_hash, prebuilt_or_pushed
from gcp_iot_bridge.infra.registry_access import registry_database_user
from gcp_iot_bridge.infra.sources import SOURCE_ROOT

ADMIN_DIR = SOURCE_ROOT / "iotbridge" / "admin"
DOCKERFILE = ADMIN_DIR / "Dockerfile"
IMAGE_NAME = "admin-api"
SERVICE_SUFFIX = "admin-api"  # the service is "{prefix}-admin-api"; the policy pack recognizes it by this suffix
CONTAINER_PORT = 8080
# What the container reads (python -m iotbridge.admin; iotbridge/admin/auth.py for the ADMIN_* names).
AUTH_MODE = "google"
IAM_PROPAGATION_WAIT = "120s"
APIS = ("run.googleapis.com", "artifactregistry.googleapis.com", "firestore.googleapis.com", "pubsub.googleapis.com",
        "iam.googleapis.com", "cloudresourcemanager.googleapis.com")
PublicAccess = Literal["allUsers", "invokerIamDisabled"]


def build_inputs() -> list[Path]:
    """Every file the image is built from: the Dockerfile, its ignore file and what its COPY lines take (folders
    expanded to their files)."""
    files = [DOCKERFILE, DOCKERFILE.with_name("Dockerfile.dockerignore")]
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        for source in (SOURCE_ROOT / w for w in words[1:-1]):
            files += sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
                if source.is_dir() else [source]
    return list(dict.fromkeys(files))


def image_tag() -> str:
    """Content hash of the build inputs: stable across previews, new on any change to what the image holds."""
    return files_hash(build_inputs())


@dataclass(frozen=True)
class AdminApiArgs:
    project: str
    region: str
    prefix: str
    registry_id: str  # the stack's registry (the API serves every registry in the database; this one is the default)
    service_account_email: pulumi.Input[str]  # Foundation's "admin-api" workload
    project_number: pulumi.Input[str]  # for the service's deterministic URL, the audience of ID tokens
    deletion_protection: bool
    # The stack's topic prefix: the container finds its topics by name ({prefix}-device-commands, ...).
    topic_prefix: str = ""  # default: prefix
    # Topic ids the API publishes to, granted pubsub.publisher: the device-commands fan-out topic every broker
    # host reads, which carries configs and commands.
    publish_topics: Sequence[pulumi.Input[str]] = ()
    readers: Sequence[str] = ()  # IAM members: user:EMAIL, serviceAccount:EMAIL, domain:DOMAIN
    writers: Sequence[str] = ()
    public_access: PublicAccess = "allUsers"
    firestore_database: str = "(default)"
    min_instances: int = 0
    max_instances: int = 3
    concurrency: int = 80  # requests one instance serves at once
    cpu: str = "1"
    memory: str = "512Mi"
    timeout_seconds: int = 60
    prebuilt_image: str | None = None  # an image reference to run instead of building one
    labels: Mapping[str, str] = field(default_factory=dict)
    # foundation.needs(*APIS) and the registry's Firestore database.
    depends_on: Sequence[pulumi.Resource] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(f"need 0 <= min_instances <= max_instances, max >= 1; got "
                             f"{self.min_instances}..{self.max_instances}")
        if self.public_access not in ("allUsers", "invokerIamDisabled"):
            raise ValueError(f"public_access must be allUsers or invokerIamDisabled, got {self.public_access!r}")
        if not 1 <= self.timeout_seconds <= 3600:
            raise ValueError(f"timeout_seconds must be 1..3600 (Cloud Run's request timeout), "
                             f"got {self.timeout_seconds}")
        for member in (*self.readers, *self.writers):
            kind = member.partition(":")[0]
            if kind not in ("user", "serviceAccount", "domain"):
                raise ValueError(f"admin API member {member!r}: user:, serviceAccount: or domain: only "
                                 "(group membership cannot be resolved by the service)")


def service_url(name: str, project_number: str, region: str) -> str:
    """The deterministic URL Cloud Run gives a service (``https://{name}-{project number}.{region}.run.app``)."""
    return f"https://{name}-{project_number}.{region}.run.app"


class AdminApi(pulumi.ComponentResource):
    """The admin API's image, Cloud Run service, identity grants and public invoker."""

    repository: gcp.artifactregistry.Repository | None
    image: docker_build.Image | None
    image_ref: pulumi.Output[str]
    service: gcp.cloudrunv2.Service
    service_name: str
    url: pulumi.Output[str]
    grants: dict[str, pulumi.CustomResource]
    grants_wait: time.Sleep
    invoker: gcp.cloudrunv2.ServiceIamMember | None  # None with public_access=invokerIamDisabled

    def __init__(self, name: str, args: AdminApiArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:AdminApi", name, None, opts)
        deps = list(args.depends_on)
        child = pulumi.ResourceOptions(parent=self, depends_on=deps)
        labels = dict(args.labels)
        member = pulumi.Output.from_input(args.service_account_email).apply(lambda e: f"serviceAccount:{e}")
        self.service_name = f"{args.prefix}-{SERVICE_SUFFIX}"

        # ------------------------------------------------------------------------------------- image
        # tag@sha256:digest: each revision runs the exact bytes that were pushed.
        self.repository, self.image, self.image_ref = prebuilt_or_pushed(name, args.prebuilt_image, ImageArgs(
            project=args.project, region=args.region, repository_id=f"{args.prefix}-admin-api",
            description="Images of the admin API (IoT Core device manager).", image_name=IMAGE_NAME,
            dockerfile=DOCKERFILE, tag=image_tag(), labels=labels, depends_on=deps), parent=self)

        # ------------------------------------------------------------------------- data grants
        self.grants = {"datastore.user": registry_database_user(
            f"{name}-firestore-user", args.project, args.firestore_database, member, child)}
        for i, topic in enumerate(args.publish_topics):
            self.grants[f"pubsub.publisher:{i}"] = gcp.pubsub.TopicIAMMember(
                f"{name}-publisher-{i}",
                project=args.project,
                topic=topic,
                role="roles/pubsub.publisher",
                member=member,
                opts=child,
            )
        grants = list(self.grants.values())
        self.grants_wait = time.Sleep(
            f"{name}-grants-wait",
            create_duration=IAM_PROPAGATION_WAIT,
            triggers={key: grant.id for key, grant in self.grants.items()},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, *grants]),
        )

        # --------------------------------------------------------------------------- the service
        audience = pulumi.Output.from_input(args.project_number).apply(
            lambda number: json.dumps([service_url(self.service_name, number, args.region)]))
        env: dict[str, pulumi.Input[str]] = {
            "PROJECT_ID": args.project,
            "REGION": args.region,
            "REGISTRY_ID": args.registry_id,
            "FIRESTORE_DATABASE": args.firestore_database,
            "TOPIC_PREFIX": args.topic_prefix or args.prefix,
            # iotbridge/admin/auth.py: ADMIN_AUTH=google verifies every request (the policy pack looks for it).
            "ADMIN_AUTH": AUTH_MODE,
            "ADMIN_READERS": json.dumps(list(args.readers)),
            "ADMIN_WRITERS": json.dumps(list(args.writers)),
            "ADMIN_AUDIENCES": audience,
        }
        self.service = gcp.cloudrunv2.Service(
            name,
            project=args.project,
            location=args.region,
            name=self.service_name,
            description="IoT Core's device manager API (cloudiot v1) over the device registry.",
            labels=labels,
            ingress="INGRESS_TRAFFIC_ALL",
            invoker_iam_disabled=True if args.public_access == "invokerIamDisabled" else None,
            deletion_protection=args.deletion_protection,
            template=gcp.cloudrunv2.ServiceTemplateArgs(
                service_account=args.service_account_email,
                labels=labels,
                timeout=f"{args.timeout_seconds}s",
                max_instance_request_concurrency=args.concurrency,
                scaling=gcp.cloudrunv2.ServiceTemplateScalingArgs(
                    min_instance_count=args.min_instances, max_instance_count=args.max_instances),
                containers=[gcp.cloudrunv2.ServiceTemplateContainerArgs(
                    image=self.image_ref,
                    ports=gcp.cloudrunv2.ServiceTemplateContainerPortsArgs(container_port=CONTAINER_PORT),
                    envs=[gcp.cloudrunv2.ServiceTemplateContainerEnvArgs(name=k, value=v)
                          for k, v in env.items()],
                    resources=gcp.cloudrunv2.ServiceTemplateContainerResourcesArgs(
                        limits={"cpu": args.cpu, "memory": args.memory},
                        cpu_idle=True,  # CPU only while serving a request: billed per request
                        startup_cpu_boost=True,
                    ),
                )],
            ),
            traffics=[gcp.cloudrunv2.ServiceTrafficArgs(type="TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", percent=100)],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, *grants, self.grants_wait]),
        )
        self.url = self.service.uri

        # --------------------------------------------------------------- open at the Cloud Run level
        # The app authenticates every request itself (module docstring). The service's name is given as text, not
        # as the service's output, so that a preview (and the policy pack) sees which service is opened.
        self.invoker = None
        if args.public_access == "allUsers":
            self.invoker = gcp.cloudrunv2.ServiceIamMember(
                f"{name}-public-invoker",
                project=args.project,
                location=args.region,
                name=self.service_name,
                role="roles/run.invoker",
                member="allUsers",
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.service]),
            )

        self.register_outputs({
            "admin_api_url": self.url,
            "service_name": self.service_name,
            "service_account": args.service_account_email,
            "image": self.image_ref,
        })

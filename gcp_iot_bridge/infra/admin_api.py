"""AdminApi: IoT Core's device manager API (``cloudiot.googleapis.com/v1``) as a Cloud Run service over the registry.

The service runs ``python -m iotbridge.admin`` from an image of ``iotbridge/admin/Dockerfile``, built and pushed by
pulumi-docker-build (or a prebuilt image named in stack config) over a staged build context: the closure of the
``iotbridge.admin`` package's imports with its requirements pinned from ``requirements/lock.txt`` (``packaging.py``).
What it declares, and the reason behind each choice (docs/admin-api-auth.md has the operator's view):

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
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp
import pulumiverse_time as time

from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.images import ImageArgs, prebuilt_or_pushed
from gcp_iot_bridge.infra.registry_database import RegistryDatabase
from gcp_iot_bridge.infra.sources import SOURCE_ROOT

ADMIN_DIR = SOURCE_ROOT / "iotbridge" / "admin"
DOCKERFILE = ADMIN_DIR / "Dockerfile"
# Where the build context is staged: inside the source root, so its path relative to where pulumi runs is the same
# in every checkout (.gitignore'd).
BUILD_DIR = SOURCE_ROOT / ".build" / "admin-api-image"
IMAGE_NAME = "admin-api"
SERVICE_SUFFIX = "admin-api"  # the service is "{prefix}-admin-api"; the policy pack recognizes it by this suffix
CONTAINER_PORT = 8080
# What the container reads (python -m iotbridge.admin; iotbridge/admin/auth.py for the ADMIN_* names).
AUTH_MODE = "google"
IAM_PROPAGATION_WAIT = "120s"
APIS = ("run.googleapis.com", "artifactregistry.googleapis.com", "firestore.googleapis.com", "pubsub.googleapis.com",
        "iam.googleapis.com", "cloudresourcemanager.googleapis.com")
PublicAccess = Literal["allUsers", "invokerIamDisabled"]


def deployable() -> packaging.Deployable:
    """The image's code (gcp_iot_bridge/infra/packaging.py): every module of ``iotbridge.admin`` and the closure of
    their imports. Every module, not only ``__main__`` (what ``python -m iotbridge.admin`` runs): the server loads
    ``auth`` by name when the deployment authenticates callers, an import no closure can see."""
    modules = tuple(sorted(f"iotbridge.admin.{p.stem}" for p in ADMIN_DIR.glob("*.py") if p.stem != "__init__"))
    return packaging.Deployable("the admin API image", modules)


def build_context() -> dict[str, bytes]:
    """Path -> bytes of the image's build context: the code, the package's data files (IoT Core's discovery
    document, which the API serves) and the lock-pinned requirements.txt and constraints.txt the Dockerfile
    installs."""
    package = deployable().package()
    data = {p.relative_to(SOURCE_ROOT).as_posix(): p.read_bytes() for p in sorted(ADMIN_DIR.glob("*.json"))}
    return {**package.files, **data, "requirements.txt": package.requirements_txt.encode(),
            "constraints.txt": package.constraints_txt.encode()}


def image_tag() -> str:
    """Of the build context and the Dockerfile: stable across previews, new on any change to either."""
    return packaging.content_hash({**build_context(), "Dockerfile": DOCKERFILE.read_bytes()})[:16]


def staged_context() -> Path:
    """The build context written out afresh (``BUILD_DIR``): the folder pulumi-docker-build sends, nothing else."""
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    return packaging.stage(build_context(), BUILD_DIR)


@dataclass(frozen=True)
class AdminApiArgs:
    project: str
    region: str
    prefix: str
    registry_id: str  # the stack's registry (the API serves every registry in the database; this one is the default)
    service_account_email: pulumi.Input[str]  # Foundation's "admin-api" workload
    registry: RegistryDatabase  # the registry's Firestore database; the API reads and writes it only
    project_number: pulumi.Input[str]  # for the service's deterministic URL, the audience of ID tokens
    deletion_protection: bool
    # The stack's topic prefix: the container finds its topics by name ({prefix}-device-commands, ...).
    topic_prefix: str = ""  # default: prefix
    # Topic ids the API publishes to, granted pubsub.publisher: the device-commands topic, which carries configs
    # and commands to the broker host that holds the device (its presence record: the datastore.user grant).
    publish_topics: Sequence[pulumi.Input[str]] = ()
    readers: Sequence[str] = ()  # IAM members: user:EMAIL, serviceAccount:EMAIL, domain:DOMAIN
    writers: Sequence[str] = ()
    public_access: PublicAccess = "allUsers"
    min_instances: int = 0
    max_instances: int = 3
    concurrency: int = 80  # requests one instance serves at once
    cpu: str = "1"
    memory: str = "512Mi"
    timeout_seconds: int = 60
    prebuilt_image: str | None = None  # an image reference to run instead of building one
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # foundation.needs(*APIS)

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
        deps = [*args.depends_on, args.registry]
        child = pulumi.ResourceOptions(parent=self, depends_on=deps)
        labels = dict(args.labels)
        member = pulumi.Output.from_input(args.service_account_email).apply(lambda e: f"serviceAccount:{e}")
        self.service_name = f"{args.prefix}-{SERVICE_SUFFIX}"

        # ------------------------------------------------------------------------------------- image
        # tag@sha256:digest: each revision runs the exact bytes that were pushed.
        self.repository, self.image, self.image_ref = prebuilt_or_pushed(name, args.prebuilt_image, ImageArgs(
            project=args.project, region=args.region, repository_id=f"{args.prefix}-admin-api",
            description="Images of the admin API (IoT Core device manager).", image_name=IMAGE_NAME,
            dockerfile=DOCKERFILE, context=staged_context, tag=image_tag, labels=labels, depends_on=deps),
            parent=self)

        # ------------------------------------------------------------------------- data grants
        # The registry database only, not every database of the project.
        self.grants = {"datastore.user": args.registry.user_grant(
            f"{name}-firestore-user", member, child, title="registry-database-only",
            condition=lambda db: f'resource.name == "{db}" || resource.name.startsWith("{db}/")')}
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
            "FIRESTORE_DATABASE": args.registry.name,
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

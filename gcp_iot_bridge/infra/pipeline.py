"""Pipeline: the streaming telemetry job as a Dataflow Flex Template, built and launched by ``pulumi up``.

- An Artifact Registry repository; the image of ``dataflow_jobs/Dockerfile`` built and pushed by
  pulumi-docker-build (or a prebuilt image named in stack config). The same image is the launcher and the workers'
  SDK container.
- The template spec JSON (image + ``dataflow_jobs/metadata.json``) in a private bucket that also holds the job's
  temp and staging files. Its object name carries the image digest, so a new build is a new spec path.
- ``gcp.dataflow.FlexTemplateJob``: worker service account, private IPs only, Streaming Engine, max workers,
  labels. A new spec path or new parameters make the provider *update* the running streaming job (a launch with
  ``update=true``; Dataflow checks compatibility and moves the state over) instead of leaving the old job
  running or cancelling it. The
  ``create_or_update_job`` experiment makes any fresh launch under the same job name an update of a job still
  running or draining under it.
- Autoscaling: a streaming job on Streaming Engine has horizontal autoscaling on by default, up to
  ``max_workers``, so ``autoscaling_algorithm`` is left
  unset. The pipeline option's name ``THROUGHPUT_BASED`` is not a value of the launch API's enum
  (``FlexTemplateRuntimeEnvironment.autoscalingAlgorithm``: ``AUTOSCALING_ALGORITHM_UNKNOWN|NONE|BASIC``), and
  sending it fails the launch with HTTP 400; ``NONE`` would
  pin the job at ``num_workers``.
- Teardown follows ``deletion_protection``: drain (finish in-flight data) when true, cancel when false, and in
  both cases the provider waits until the job has stopped (``skip_wait_on_job_termination=False``). Pulumi deletes
  the job before what it depends on (subnetwork, firewall, bucket, subscription, tables), so nothing the workers
  still use is removed under them, and the job's name is free again when ``destroy`` returns: Dataflow refuses a
  launch under the name of a job that is still active ("There is already an active job named ...", 409), and a
  cancelling job is active but neither running nor draining, so ``create_or_update_job`` cannot turn that launch
  into an update. A cancel takes minutes; a drain of a streaming job can keep the provider waiting for hours,
  and only protected stacks drain.
- IAM: the worker service account (from Foundation, which holds its project roles ``dataflow.worker``, log and
  metric writer) gets data roles on exactly the resources the job touches: subscriber + viewer on its
  subscription, publisher on the config-requests topic, dataEditor on the three tables it writes, bigtable.user
  on the telemetry table, objectAdmin on its bucket, reader on the image repository.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp

from gcp_iot_bridge.infra import packaging
from gcp_iot_bridge.infra.buckets import private_bucket
from gcp_iot_bridge.infra.images import ImageArgs, prebuilt_or_pushed
from gcp_iot_bridge.infra.sources import SOURCE_ROOT
from iotbridge.spec import ProfileError, RuleError, parse_payload_profiles, parse_threshold_rules

JOBS_DIR = SOURCE_ROOT / "dataflow_jobs"
DOCKERFILE = JOBS_DIR / "Dockerfile"
METADATA_FILE = JOBS_DIR / "metadata.json"
# Where the build context is staged: inside the source root, so its path relative to where pulumi runs is the same
# in every checkout (.gitignore'd).
BUILD_DIR = SOURCE_ROOT / ".build" / "pipeline-image"
PIPELINE_DISTRIBUTION = "iot-telemetry-pipeline"
IMAGE_NAME = "telemetry-pipeline"
# The tables the pipeline writes (iotbridge.spec names); it reads none.
WRITTEN_TABLES = ("telemetry_raw", "telemetry_1m", "telemetry_errors")
# Dataflow workers talk to each other on these ports; a custom VPC without this rule stalls the job.
WORKER_PORTS = "12345-12346"
WORKER_TAG = "dataflow"  # Dataflow puts this network tag on every worker VM
_JOB_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def metadata() -> dict:
    return json.loads(METADATA_FILE.read_text())


def build_context() -> dict[str, bytes]:
    """Path -> bytes of the image's build context (gcp_iot_bridge/infra/packaging.py): the closure of the
    pipeline's imports, its lock-pinned requirements.txt and constraints.txt, and the pyproject.toml that makes the
    code the installable package ``iot-telemetry-pipeline``, which the Dockerfile installs."""
    package = packaging.PIPELINE.package()
    return {**package.files, "requirements.txt": package.requirements_txt.encode(),
            "constraints.txt": package.constraints_txt.encode(),
            "pyproject.toml": packaging.pyproject(PIPELINE_DISTRIBUTION, package).encode()}


def source_hash() -> str:
    """The image tag: of the build context and the Dockerfile, stable across previews, new on any change to either."""
    return packaging.content_hash({**build_context(), "Dockerfile": DOCKERFILE.read_bytes()})[:16]


def staged_context() -> Path:
    """The build context written out afresh (``BUILD_DIR``): the folder pulumi-docker-build sends, nothing else."""
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    return packaging.stage(build_context(), BUILD_DIR)


def check_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """The template's own regexes, applied at deploy time: a bad value fails `pulumi up` with the flag's name
    instead of a launcher VM failing minutes later."""
    specs = {p["name"]: p for p in metadata()["parameters"]}
    unknown = set(params) - set(specs)
    if unknown:
        raise ValueError(f"parameters not in dataflow_jobs/metadata.json: {sorted(unknown)}")
    missing = [n for n, p in specs.items() if not p.get("isOptional") and n not in params]
    if missing:
        raise ValueError(f"required template parameters missing: {missing}")
    for name, value in params.items():
        for regex in specs[name].get("regexes", []):
            if not re.match(regex, value, re.DOTALL):
                raise ValueError(f"template parameter {name}={value[:80]!r} does not match {regex}")
    return dict(params)


@dataclass(frozen=True)
class PipelineArgs:
    project: str
    region: str
    prefix: str
    worker_service_account: gcp.serviceaccount.Account  # Foundation's "dataflow" workload
    subnetwork: gcp.compute.Subnetwork  # in `region`, with Private Google Access (workers have no external IP)
    input_subscription: gcp.pubsub.Subscription  # the telemetry subscription (spec key telemetry-pipeline)
    config_requests_topic: gcp.pubsub.Topic
    dataset_id: pulumi.Input[str]
    tables: Mapping[str, gcp.bigquery.Table]  # spec name -> table; WRITTEN_TABLES at least
    bigtable_instance: pulumi.Input[str]  # instance name
    bigtable_table: pulumi.Input[str]  # table name
    deletion_protection: bool
    threshold_rules: str = "{}"  # JSON, see dataflow_jobs/rules.py
    payload_profiles: str = ""  # JSON, see iotbridge.spec.parse_payload_profiles; empty: the default profiles
    rule_min_interval_seconds: int = 300
    allowed_lateness_seconds: int = 900
    dedupe_seconds: int = 600
    max_workers: int = 3
    num_workers: int = 1
    machine_type: str = "n2-standard-2"
    prebuilt_image: str | None = None  # an image ref to launch instead of building one
    launcher_tag: str = "latest"  # tag of Google's python311 launcher base image
    transform_name_mapping: Mapping[str, str] = field(default_factory=dict)  # renamed transforms, for updates
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # dataflow, artifactregistry, storage, compute APIs
    # CMEK for the bucket and the job (its state and the workers' disks); depends_on must hold the key grants of the
    # Cloud Storage, Dataflow and Compute Engine agents.
    kms_key_name: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_workers <= self.max_workers <= 1000:
            raise ValueError(
                f"need 1 <= num_workers <= max_workers <= 1000, got {self.num_workers}..{self.max_workers}")
        missing = [t for t in WRITTEN_TABLES if t not in self.tables]
        if missing:
            raise ValueError(f"tables missing for the pipeline: {missing}")
        try:
            parse_threshold_rules(self.threshold_rules)
        except RuleError as exc:
            raise ValueError(f"threshold_rules: {exc}") from None
        try:
            parse_payload_profiles(self.payload_profiles)
        except ProfileError as exc:
            raise ValueError(f"payload_profiles: {exc}") from None


class Pipeline(pulumi.ComponentResource):
    """Image, template spec and the streaming Dataflow job, with the worker's data grants.

    Each part of the constructor is one private method: the image, the bucket and template spec, the worker's
    data grants, the workers' firewall, the job (which waits for the grants and the firewall).
    """

    repository: gcp.artifactregistry.Repository | None
    image: docker_build.Image | None
    image_ref: pulumi.Output[str]
    bucket: gcp.storage.Bucket
    template: gcp.storage.BucketObject
    template_path: pulumi.Output[str]
    firewall: gcp.compute.Firewall
    job: gcp.dataflow.FlexTemplateJob
    grants: dict[str, pulumi.Resource]

    def __init__(self, name: str, args: PipelineArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Pipeline", name, None, opts)
        job_name = f"{args.prefix}-telemetry"
        if not _JOB_NAME_RE.match(job_name):
            raise ValueError(f"Dataflow job name {job_name!r} must match {_JOB_NAME_RE.pattern}")
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        self._member = args.worker_service_account.member
        self.grants = {}

        self._image()
        self._bucket_and_template()
        self._data_grants()
        checked_subnet = self._network()
        self._job(job_name, checked_subnet)

        self.register_outputs({
            "dataflow_job_name": self.job.name,
            "dataflow_job_id": self.job.job_id,
            "template_path": self.template_path,
            "image": self.image_ref,
        })

    def _image(self) -> None:
        """The Flex Template image: ``prebuilt_image`` as given, or an Artifact Registry repository and the image of
        ``dataflow_jobs/Dockerfile`` built and pushed there, with the workers' right to pull it."""
        name, args = self._name, self._args
        # tag@sha256:digest: the spec and the workers pin the exact bytes that were pushed.
        self.repository, self.image, self.image_ref = prebuilt_or_pushed(name, args.prebuilt_image, ImageArgs(
            project=args.project, region=args.region, repository_id=f"{args.prefix}-dataflow",
            description="Flex Template images of the telemetry pipeline.", image_name=IMAGE_NAME,
            dockerfile=DOCKERFILE, context=staged_context, tag=source_hash,
            build_args={"LAUNCHER_TAG": args.launcher_tag}, labels=args.labels, depends_on=args.depends_on),
            parent=self)
        if self.repository is None:
            return
        self.grants["artifactregistry.reader"] = gcp.artifactregistry.RepositoryIamMember(
            f"{name}-worker-images-reader",
            project=args.project,
            location=args.region,
            repository=self.repository.name,
            role="roles/artifactregistry.reader",
            member=self._member,
            opts=self._child,
        )

    def _bucket_and_template(self) -> None:
        """The private bucket of the template spec and the job's temp and staging files, the workers' access to it,
        and the spec itself, at a path named by the image it launches."""
        name, args = self._name, self._args
        self.bucket = private_bucket(
            f"{name}-bucket", project=args.project, name=f"{args.project}-{args.prefix}-dataflow",
            location=args.region, deletion_protection=args.deletion_protection, labels=args.labels,
            kms_key_name=args.kms_key_name, opts=self._child,
            # Temp and staging files are only useful while a launch or update runs.
            lifecycle_rules=[gcp.storage.BucketLifecycleRuleArgs(
                action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                condition=gcp.storage.BucketLifecycleRuleConditionArgs(
                    age=7, matches_prefixes=["tmp/", "staging/"]),
            )])
        self.grants["storage.objectAdmin"] = gcp.storage.BucketIAMMember(
            f"{name}-worker-bucket",
            bucket=self.bucket.name,
            role="roles/storage.objectAdmin",  # temp/staging files; the launcher reads the spec
            member=self._member,
            opts=self._child,
        )

        spec = pulumi.Output.all(self.image_ref).apply(lambda v: json.dumps(
            {"image": v[0], "sdkInfo": {"language": "PYTHON"}, "metadata": metadata()}, indent=2, sort_keys=True))
        self.template = gcp.storage.BucketObject(
            f"{name}-template",
            bucket=self.bucket.name,
            # Content-addressed: a new image is a new path, which the job resource sees as a change to update.
            name=self.image_ref.apply(
                lambda ref: f"templates/{IMAGE_NAME}-{hashlib.sha256(ref.encode()).hexdigest()[:16]}.json"),
            content=spec,
            content_type="application/json",
            opts=self._child,
        )
        self.template_path = pulumi.Output.concat("gs://", self.bucket.name, "/", self.template.output_name)

    def _data_grants(self) -> None:
        """The worker's roles on exactly what the job touches: its subscription, the config-requests topic, the
        tables it writes and the Bigtable table."""
        name, args, member, child = self._name, self._args, self._member, self._child
        self.grants["pubsub.subscriber"] = gcp.pubsub.SubscriptionIAMMember(
            f"{name}-worker-subscriber",
            project=args.project,
            subscription=args.input_subscription.name,
            role="roles/pubsub.subscriber",
            member=member,
            opts=child,
        )
        # Dataflow's Pub/Sub source reads the subscription's configuration (subscriptions.get) at launch.
        self.grants["pubsub.viewer"] = gcp.pubsub.SubscriptionIAMMember(
            f"{name}-worker-subscription-viewer",
            project=args.project,
            subscription=args.input_subscription.name,
            role="roles/pubsub.viewer",
            member=member,
            opts=child,
        )
        self.grants["pubsub.publisher"] = gcp.pubsub.TopicIAMMember(
            f"{name}-worker-config-requests",
            project=args.project,
            topic=args.config_requests_topic.name,
            role="roles/pubsub.publisher",
            member=member,
            opts=child,
        )
        for table in WRITTEN_TABLES:
            self.grants[f"bigquery.dataEditor:{table}"] = gcp.bigquery.IamMember(
                f"{name}-worker-{table}",
                project=args.project,
                dataset_id=args.tables[table].dataset_id,
                table_id=args.tables[table].table_id,
                role="roles/bigquery.dataEditor",  # tabledata.insertAll
                member=member,
                opts=child,
            )
        self.grants["bigtable.user"] = gcp.bigtable.TableIamMember(
            f"{name}-worker-bigtable",
            project=args.project,
            instance_name=args.bigtable_instance,
            table=args.bigtable_table,
            role="roles/bigtable.user",
            member=member,
            opts=child,
        )

    def _network(self) -> pulumi.Output[str]:
        """The firewall rule that lets workers talk to each other. Returns the subnetwork's self link, checked to be
        in the job's region with Private Google Access (the workers have private IPs only)."""
        args = self._args
        subnet = args.subnetwork
        checked_subnet = pulumi.Output.all(subnet.self_link, subnet.region, subnet.private_ip_google_access).apply(
            lambda v: _check_subnet(v[0], v[1], v[2], args.region))
        self.firewall = gcp.compute.Firewall(
            f"{self._name}-workers",
            project=args.project,
            name=f"{args.prefix}-dataflow-workers",
            network=subnet.network,
            description="Dataflow workers of the telemetry pipeline talk to each other.",
            direction="INGRESS",
            allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[WORKER_PORTS])],
            source_tags=[WORKER_TAG],
            target_tags=[WORKER_TAG],
            opts=self._child,
        )
        return checked_subnet

    def _job(self, job_name: str, subnetwork: pulumi.Output[str]) -> None:
        """The streaming Flex Template job, its parameters checked against the template's own regexes."""
        args = self._args
        params = pulumi.Output.all(
            sub=args.input_subscription.id,
            dataset=args.dataset_id,
            instance=args.bigtable_instance,
            table=args.bigtable_table,
            topic=args.config_requests_topic.id,
        ).apply(lambda v: check_parameters({
            "input_subscription": v["sub"],
            "bigquery_dataset": f"{args.project}.{v['dataset']}",
            "bigtable_instance": f"projects/{args.project}/instances/{v['instance']}",
            "bigtable_table": v["table"],
            "config_requests_topic": v["topic"],
            "threshold_rules": json.dumps(json.loads(args.threshold_rules), separators=(",", ":"), sort_keys=True),
            "rule_min_interval_seconds": str(args.rule_min_interval_seconds),
            "allowed_lateness_seconds": str(args.allowed_lateness_seconds),
            "dedupe_seconds": str(args.dedupe_seconds),
            # Canonical text: the same profiles give the same job parameter, whatever the config's spacing.
            "payload_profiles": parse_payload_profiles(args.payload_profiles).to_json(),
        }))
        self.job = gcp.dataflow.FlexTemplateJob(
            f"{self._name}-job",
            project=args.project,
            region=args.region,
            name=job_name,
            container_spec_gcs_path=self.template_path,
            sdk_container_image=self.image_ref,
            parameters=params,
            service_account_email=args.worker_service_account.email,
            subnetwork=subnetwork,
            ip_configuration="WORKER_IP_PRIVATE",
            enable_streaming_engine=True,
            num_workers=args.num_workers,
            max_workers=args.max_workers,
            machine_type=args.machine_type,
            temp_location=self.bucket.url.apply(lambda u: f"{u}/tmp"),
            staging_location=self.bucket.url.apply(lambda u: f"{u}/staging"),
            additional_experiments=["create_or_update_job"],
            kms_key_name=args.kms_key_name,
            transform_name_mapping=dict(args.transform_name_mapping) or None,
            labels=dict(args.labels),
            on_delete="drain" if args.deletion_protection else "cancel",
            # Wait for the job to stop: see the module docstring (teardown).
            skip_wait_on_job_termination=False,
            opts=pulumi.ResourceOptions(
                parent=self,
                # The workers need their grants and the firewall the moment they start.
                depends_on=[*args.depends_on, *self.grants.values(), self.firewall],
                # Immutable fields (region, max_workers, ...) force a replacement: stop the old job first, or
                # the new launch under the same name meets it.
                delete_before_replace=True,
            ),
        )


def _check_subnet(self_link: str, region: str, private_google_access: bool | None, job_region: str) -> str:
    if region and region != job_region:
        raise ValueError(f"subnetwork {self_link} is in {region}; the Dataflow job runs in {job_region}")
    if not private_google_access:
        raise ValueError(
            f"subnetwork {self_link} has no Private Google Access: Dataflow workers with private IPs could not reach "
            "Pub/Sub, BigQuery or Bigtable; set private_ip_google_access=True on it")
    return self_link

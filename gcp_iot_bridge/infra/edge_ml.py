"""Edge ML: the models bucket, the BigQuery ML anomaly model trained on the telemetry, its exports, and who may
read them.

The model is a BigQuery ML ``KMEANS`` detector over the per-message metrics of ``telemetry_raw`` (why: see
``iotbridge/edge_model.py``). Three BigQuery jobs, in order:

1. ``train`` — ``CREATE OR REPLACE MODEL`` (:func:`iotbridge.ml.sql.create_model`).
2. ``export`` — ``EXPORT DATA`` of the edge artifact (centroids from ``ML.CENTROIDS``, statistics from
   ``ML.FEATURE_INFO``, the threshold from the training rows) as one JSON object to
   ``gs://{bucket}/edge/{version}/model-000000000000.json`` — the file devices load, a few hundred bytes.
3. ``savedmodel`` — an extract job of the model itself as a TensorFlow SavedModel next to it, for audit and for
   serving it elsewhere; devices never load it.

Rolling a model out is then ``iotctl models deploy --uri gs://… --signer <models_signer>``: the CLI reads the
artifact, computes its SHA-256, and pushes configs carrying a V4 signed URL minted by the signer service account.

GCP pitfalls handled here:

- A query job with a DDL statement (and EXPORT DATA) fails with "Cannot set create/write disposition" unless both
  dispositions are set to the empty string (pulumi/pulumi-gcp#632). The REST API defaults ``useLegacySql`` to true
  for jobs: set false explicitly.
- Jobs are immutable and their ids are unique in a project forever, also after the job resource is gone. Job ids
  here are deterministic — the stack prefix, the version and a hash of the job's own statement — so a change in
  the SQL or the version is a new job and an unchanged program is no change. They also carry the bucket's
  creation time, so a dev stack destroyed and brought up again (a new bucket) does not collide with the jobs of
  its previous life.
- BigQuery writes exports only to a bucket co-located with the dataset: the bucket takes the dataset's location.
- KMEANS refuses to train on fewer rows than clusters, and a fresh stack has no telemetry: training is off
  (``train=False``) until the stack has collected data; the bucket and IAM exist either way.
- A version names one artifact: the export does not overwrite (``overwrite = false``), so re-running a changed
  query under an old version fails instead of silently replacing what devices verified. The bucket is versioned
  as well.
- No public access: uniform bucket-level access and public access prevention enforced; devices get time-limited
  signed URLs, never bucket IAM. Members are checked: ``allUsers`` / ``allAuthenticatedUsers`` are refused.
- Teardown: ``deletion_protection`` drives the bucket's ``force_destroy``. The model lives in the warehouse
  dataset, deleted with it.

The jobs run as the identity running ``pulumi up`` (it needs BigQuery Job User on the project and write access on
this bucket — project owners and editors have both).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp

from gcp_iot_bridge.infra.buckets import private_bucket
from iotbridge.ml import sql

_MEMBER_RE = re.compile(r"^(user|group|serviceAccount|domain):\S+$")
_LABEL_RE = re.compile(r"[^a-z0-9_-]")


@dataclass(frozen=True)
class EdgeMlArgs:
    project: str
    prefix: str
    location: str  # the warehouse dataset's location: exports require a co-located bucket
    dataset_id: str
    deletion_protection: bool
    metrics: tuple[str, ...] = ("temperature", "rpm")
    model_version: str = "v1"
    train: bool = False  # off until telemetry_raw has data: KMEANS fails on an empty table
    num_clusters: int = 4
    training_days: int = 7
    contamination: float = 0.01
    signer_members: Sequence[str] = ()  # may mint signed URLs as the signer (operators, the config-push SA)
    readers: Sequence[str] = ()  # may read the models bucket directly (e.g. a serving service account)
    noncurrent_retention_days: int = 90
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # APIs, and the warehouse's telemetry_raw table
    kms_key_name: str | None = None  # CMEK for the models bucket; depends_on must hold the Storage agent's grant

    def __post_init__(self) -> None:
        self.model_spec()  # validates metrics, clusters, window, contamination
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", self.model_version):
            raise ValueError(f"model_version {self.model_version!r}: letters, digits, '.', '_', '-' (≤ 63)")
        for member in (*self.signer_members, *self.readers):
            if not _MEMBER_RE.match(member):
                raise ValueError(f"{member!r} is not an IAM member (user:, group:, serviceAccount:, domain:); "
                                 "the models bucket is never public")
        if self.noncurrent_retention_days < 1:
            raise ValueError("noncurrent_retention_days must be >= 1")

    def model_spec(self) -> sql.ModelSpec:
        return sql.ModelSpec(self.project, self.dataset_id, tuple(self.metrics), num_clusters=self.num_clusters,
                             training_days=self.training_days, contamination=self.contamination)


def job_id(prefix: str, kind: str, version: str, statement: str, incarnation: str = "") -> str:
    """Deterministic, unique per statement (BigQuery job ids: letters, digits, '_' and '-', ≤ 1024)."""
    digest = hashlib.sha256(statement.encode()).hexdigest()[:16]
    safe_version = re.sub(r"[^A-Za-z0-9_-]", "_", version)
    suffix = f"_{incarnation}" if incarnation else ""
    return f"{prefix}_edge_ml_{kind}_{safe_version}_{digest}{suffix}"


class EdgeMl(pulumi.ComponentResource):
    """Models bucket (private, versioned), signer identity, and the BigQuery ML train/export jobs."""

    bucket: gcp.storage.Bucket
    signer: gcp.serviceaccount.Account
    jobs: dict[str, gcp.bigquery.Job]
    artifact_uri: str | None
    savedmodel_uri: str | None

    def __init__(self, name: str, args: EdgeMlArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:EdgeMl", name, None, opts)
        deps = list(args.depends_on)
        child = pulumi.ResourceOptions(parent=self, depends_on=deps)
        labels = {k: _LABEL_RE.sub("_", v.lower())[:63] for k, v in args.labels.items()}

        self.bucket = private_bucket(
            f"{name}-models", project=args.project, name=f"{args.project}-{args.prefix}-models",
            location=args.location, deletion_protection=args.deletion_protection, labels=labels,
            kms_key_name=args.kms_key_name, opts=child, versioned=True,
            lifecycle_rules=[gcp.storage.BucketLifecycleRuleArgs(
                action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                condition=gcp.storage.BucketLifecycleRuleConditionArgs(
                    days_since_noncurrent_time=args.noncurrent_retention_days, with_state="ARCHIVED"),
            )])

        # The identity behind every signed URL: it can read models and nothing else. Operators sign as it through
        # IAM signBlob (Service Account Token Creator on this account only), so no key file exists.
        self.signer = gcp.serviceaccount.Account(
            f"{name}-signer",
            project=args.project,
            account_id=f"{args.prefix}-models-signer"[:30],
            display_name="Signs time-limited model download URLs for devices",
            opts=child,
        )
        readers = {"signer": self.signer.member, **{f"reader-{_key(m)}": m for m in args.readers}}
        self.reader_grants = {
            key: gcp.storage.BucketIAMMember(
                f"{name}-{key}-viewer", bucket=self.bucket.name, role="roles/storage.objectViewer", member=member,
                opts=pulumi.ResourceOptions(parent=self))
            for key, member in readers.items()
        }
        self.signer_grants = {
            _key(m): gcp.serviceaccount.IAMMember(
                f"{name}-signer-user-{_key(m)}", service_account_id=self.signer.name,
                role="roles/iam.serviceAccountTokenCreator", member=m, opts=pulumi.ResourceOptions(parent=self))
            for m in args.signer_members
        }

        self.jobs = {}
        self.artifact_uri = self.savedmodel_uri = None
        if args.train:
            self._declare_jobs(name, args, labels, deps)

        self.register_outputs({
            "models_bucket": self.bucket.name,
            "models_signer": self.signer.email,
            "edge_model_version": args.model_version,
            "edge_model_artifact_uri": self.artifact_uri,
        })

    def _declare_jobs(self, name: str, args: EdgeMlArgs, labels: dict[str, str],
                      deps: list[pulumi.Resource]) -> None:
        spec = args.model_spec()
        bucket = f"{args.project}-{args.prefix}-models"
        prefix = sql.artifact_prefix(args.model_version)
        self.artifact_uri = f"gs://{bucket}/{prefix}{sql.ARTIFACT_OBJECT}"
        self.savedmodel_uri = f"gs://{bucket}/{prefix}savedmodel"
        # Changes when the bucket is created anew (see module docstring); unknown in a preview of a new stack.
        incarnation = self.bucket.time_created.apply(lambda t: re.sub(r"\D", "", t or "")[:14])
        job_labels = {**labels, "component": "edge-ml", "model-version": _LABEL_RE.sub("_", args.model_version.lower())}

        def query_job(kind: str, statement: str, identity: str, after: list[pulumi.Resource],
                      timeout_ms: int) -> gcp.bigquery.Job:
            return gcp.bigquery.Job(
                f"{name}-{kind}",
                project=args.project,
                location=args.location,
                job_id=incarnation.apply(lambda inc: job_id(args.prefix, kind, args.model_version, identity, inc)),
                job_timeout_ms=str(timeout_ms),
                labels={**job_labels, "step": kind},
                query=gcp.bigquery.JobQueryArgs(
                    query=statement,
                    use_legacy_sql=False,
                    create_disposition="",  # DDL / EXPORT DATA refuse any disposition (pulumi-gcp#632)
                    write_disposition="",
                ),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, *after]),
            )

        create = sql.create_model(spec)
        export = sql.export_artifact(spec, args.model_version, bucket)
        train = query_job("train", create, create, [], 60 * 60 * 1000)
        self.jobs["train"] = train
        # A retrained model is a new export (and a new SavedModel), even when only the training options changed.
        self.jobs["export"] = query_job("export", export, create + export, [train, self.bucket], 30 * 60 * 1000)
        extract_id = f"savedmodel:{spec.model_ref}:{self.savedmodel_uri}:{create}"
        self.jobs["savedmodel"] = gcp.bigquery.Job(
            f"{name}-savedmodel",
            project=args.project,
            location=args.location,
            job_id=incarnation.apply(lambda inc: job_id(args.prefix, "savedmodel", args.model_version, extract_id,
                                                        inc)),
            job_timeout_ms=str(30 * 60 * 1000),
            labels={**job_labels, "step": "savedmodel"},
            extract=gcp.bigquery.JobExtractArgs(
                destination_uris=[self.savedmodel_uri],
                destination_format="ML_TF_SAVED_MODEL",
                source_model=gcp.bigquery.JobExtractSourceModelArgs(
                    project_id=args.project, dataset_id=args.dataset_id, model_id=spec.model),
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*deps, train, self.bucket]),
        )


def _key(member: str) -> str:
    """A stable logical-name fragment for an IAM member (members are keyed by value, not list position)."""
    kind, _, who = member.partition(":")
    return f"{kind[:2]}-{hashlib.sha256(who.encode()).hexdigest()[:10]}"

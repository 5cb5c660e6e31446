"""Foundation: the project's APIs, one service account per workload, and the Google service agents.

Every other component takes the ``projects.Service`` resources it needs from ``Foundation.apis`` and puts them
in the ``depends_on`` of each resource it declares. Without that, a first ``pulumi up`` on a fresh project races
API enablement and fails with "API has not been used in project ... before or it is disabled"
(``pulumi preview`` does not notice a disabled API); data sources race it too, unless they wait for it.

With a customer-managed key (``kms_key_name``), Foundation also grants Cloud KMS CryptoKey Encrypter/Decrypter on
that key to each Google service agent that encrypts the stack's data with it. The grants live here, once per agent,
because one agent serves several components (the Cloud Storage agent encrypts every bucket); each component passes
``key_grants(api)`` into its ``depends_on``, since creating a CMEK resource before its agent may use the key fails.
A grant is not effective the moment it is made (IAM propagates it in typically 2 minutes), so ``key_grants`` also
returns a wait that starts after every key grant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp
import pulumiverse_time as time

# Every API the stack uses, including those of components that arrive later, so that one `pulumi up` on an
# empty project enables them in the first wave instead of failing half-way.
APIS: tuple[str, ...] = (
    "serviceusage.googleapis.com",
    "cloudresourcemanager.googleapis.com",  # projects.IAMMember calls setIamPolicy through it
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "pubsub.googleapis.com",
    "bigquery.googleapis.com",
    "bigtableadmin.googleapis.com",
    "bigtable.googleapis.com",  # the data API: the pipeline's writes (bigtableadmin only creates instances, tables)
    "dataflow.googleapis.com",
    "cloudfunctions.googleapis.com",
    "run.googleapis.com",
    "eventarc.googleapis.com",
    "cloudbuild.googleapis.com",
    "artifactregistry.googleapis.com",
    "firestore.googleapis.com",
    "secretmanager.googleapis.com",
    "compute.googleapis.com",
    "monitoring.googleapis.com",
    "logging.googleapis.com",
    "storage.googleapis.com",
    "aiplatform.googleapis.com",
    "notebooks.googleapis.com",
)


@dataclass(frozen=True)
class Workload:
    account_suffix: str  # service account id = "{prefix}-{suffix}", 6..30 characters
    display_name: str
    project_roles: tuple[str, ...]  # narrow project-level roles; resource-level grants live with the resource


# Project-level roles are limited to what a workload cannot be granted on a single resource: writing its logs and
# metrics, and (Dataflow) being a worker. Publishing, subscribing and table access are granted on the topic,
# subscription, dataset or instance by the component that owns it. No basic role (owner/editor/viewer) anywhere.
WORKLOADS: dict[str, Workload] = {
    "bridge": Workload("bridge", "MQTT bridge hosts",
                       ("roles/logging.logWriter", "roles/monitoring.metricWriter")),
    "dataflow": Workload("dataflow", "Dataflow workers of the telemetry pipeline",
                         ("roles/dataflow.worker", "roles/logging.logWriter", "roles/monitoring.metricWriter")),
    "config-push": Workload("cfgpush", "Config-push function",
                            ("roles/logging.logWriter", "roles/monitoring.metricWriter")),
    "admin-api": Workload("adminapi", "Admin API (IoT Core device manager) on Cloud Run",
                          ("roles/logging.logWriter", "roles/monitoring.metricWriter")),
}

# Google-managed service agents: service-{project_number}@{domain}.
SERVICE_AGENT_DOMAINS: dict[str, str] = {
    "pubsub.googleapis.com": "gcp-sa-pubsub.iam.gserviceaccount.com",
    "eventarc.googleapis.com": "gcp-sa-eventarc.iam.gserviceaccount.com",
    "dataflow.googleapis.com": "dataflow-service-producer-prod.iam.gserviceaccount.com",
    "storage.googleapis.com": "gs-project-accounts.iam.gserviceaccount.com",
    "bigtableadmin.googleapis.com": "gcp-sa-bigtable.iam.gserviceaccount.com",
    "compute.googleapis.com": "compute-system.iam.gserviceaccount.com",
}
# Agents that are created lazily by Google: generating the identity up front avoids granting a role to an account
# that does not exist yet ("Service account service-...@gcp-sa-pubsub... does not exist").
GENERATED_IDENTITIES: tuple[str, ...] = ("pubsub.googleapis.com", "eventarc.googleapis.com")

KMS_API = "cloudkms.googleapis.com"
KEY_ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
# The services whose Google agent encrypts the stack's data with the key:
# Pub/Sub topics, the BigQuery dataset, Bigtable clusters, Cloud Storage buckets, and the Dataflow job, whose
# workers' persistent disks the Compute Engine agent encrypts.
KEY_USERS: tuple[str, ...] = ("pubsub.googleapis.com", "bigquery.googleapis.com", "bigtableadmin.googleapis.com",
                              "storage.googleapis.com", "dataflow.googleapis.com", "compute.googleapis.com")
# Of those, the agents Google creates lazily that `services identity create` can generate: a Bigtable CMEK cluster
# cannot be created before its agent exists.
KEY_USER_IDENTITIES: tuple[str, ...] = ("bigtableadmin.googleapis.com",)
# Until a key grant has propagated, creating a store with the key fails ("Cloud Pub/Sub did not have the necessary
# permissions configured ... was granted the Cloud KMS CryptoKey Encrypter/Decrypter role").
# IAM propagates a grant in typically 2 minutes.
KEY_GRANTS_WAIT = "120s"


@dataclass(frozen=True)
class FoundationArgs:
    project: str
    prefix: str
    apis: tuple[str, ...] = APIS
    workloads: Mapping[str, Workload] = field(default_factory=lambda: dict(WORKLOADS))
    kms_key_name: str | None = None  # projects/P/locations/L/keyRings/R/cryptoKeys/K; None: Google-managed keys


class Foundation(pulumi.ComponentResource):
    """APIs, workload service accounts and service agents of one project."""

    apis: dict[str, gcp.projects.Service]
    service_accounts: dict[str, gcp.serviceaccount.Account]
    service_identities: dict[str, gcp.projects.ServiceIdentity]
    project_number: pulumi.Output[str]
    kms_grants: dict[str, gcp.kms.CryptoKeyIAMMember]  # API -> its agent's role on the key; empty without a key

    def __init__(self, name: str, args: FoundationArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Foundation", name, None, opts)
        self._project = args.project
        apis = tuple(args.apis)
        # Cloud KMS only when the stack asks for a key: the grants below call it; a stack without one has no use for it.
        if args.kms_key_name and KMS_API not in apis:
            apis += (KMS_API,)

        self.apis = {
            api: gcp.projects.Service(
                f"{name}-{api.split('.')[0]}",
                project=args.project,
                service=api,
                # Destroying the stack must not switch off APIs other things in the project use.
                disable_on_destroy=False,
                disable_dependent_services=False,
                opts=pulumi.ResourceOptions(parent=self),
            )
            for api in apis
        }

        crm = self.apis["cloudresourcemanager.googleapis.com"]
        # The data source waits for the API it calls: a plain invoke runs at once, before any resource exists.
        project_info = gcp.organizations.get_project_output(
            project_id=args.project, opts=pulumi.InvokeOutputOptions(parent=self, depends_on=[crm]))
        self.project_number = project_info.number

        self.service_identities = {
            api: gcp.projects.ServiceIdentity(
                f"{name}-{api.split('.')[0]}-agent",
                project=args.project,
                service=api,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.apis[api]]),
            )
            for api in GENERATED_IDENTITIES + (KEY_USER_IDENTITIES if args.kms_key_name else ())
            if api in self.apis
        }

        iam_api = self.apis["iam.googleapis.com"]
        self.service_accounts = {}
        for key, workload in args.workloads.items():
            account = gcp.serviceaccount.Account(
                f"{name}-sa-{key}",
                project=args.project,
                account_id=f"{args.prefix}-{workload.account_suffix}",
                display_name=f"{workload.display_name} ({args.prefix})",
                opts=pulumi.ResourceOptions(parent=self, depends_on=[iam_api]),
            )
            self.service_accounts[key] = account
            for role in workload.project_roles:
                gcp.projects.IAMMember(
                    f"{name}-sa-{key}-{role.split('/')[-1].replace('.', '-')}",
                    project=args.project,
                    role=role,
                    member=account.member,
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[crm]),
                )

        self.kms_grants = self._key_grants(name, args.kms_key_name) if args.kms_key_name else {}
        self.kms_grants_wait: time.Sleep | None = None
        if self.kms_grants:
            # The stores encrypted with the key wait for their agents' grants to propagate (see KEY_GRANTS_WAIT).
            self.kms_grants_wait = time.Sleep(
                f"{name}-key-grants-wait",
                create_duration=KEY_GRANTS_WAIT,
                triggers={api.split(".")[0]: grant.id for api, grant in self.kms_grants.items()},
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.kms_grants.values())),
            )

        self.register_outputs({
            "project_number": self.project_number,
            "service_accounts": {k: a.email for k, a in self.service_accounts.items()},
        })

    def _key_grants(self, name: str, key: str) -> dict[str, gcp.kms.CryptoKeyIAMMember]:
        missing = [api for api in KEY_USERS if api not in self.apis]
        if missing:
            raise KeyError(f"a key is given but the API(s) of its users are not enabled: {missing}")
        members: dict[str, pulumi.Input[str]] = {
            api: self.service_agent(api) for api in KEY_USERS if api in SERVICE_AGENT_DOMAINS
        }
        # The BigQuery encryption agent (bq-{number}@bigquery-encryption) and the Cloud Storage agent exist only
        # once their service is asked for them; these data sources ask, so the grant never names a missing account.
        members["bigquery.googleapis.com"] = gcp.bigquery.get_default_service_account_output(
            project=self._project, opts=pulumi.InvokeOutputOptions(
                parent=self, depends_on=[self.apis["bigquery.googleapis.com"]])).member
        members["storage.googleapis.com"] = gcp.storage.get_project_service_account_output(
            project=self._project, opts=pulumi.InvokeOutputOptions(
                parent=self, depends_on=[self.apis["storage.googleapis.com"]])).member
        return {
            api: gcp.kms.CryptoKeyIAMMember(
                f"{name}-key-{api.split('.')[0]}",
                crypto_key_id=key,
                role=KEY_ROLE,
                member=members[api],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.apis[KMS_API], *self.needs(api)]),
            )
            for api in KEY_USERS
        }

    def key_grants(self, *apis: str) -> list[pulumi.Resource]:
        """The key grants of the agents of ``apis`` and the wait for them to propagate, for ``depends_on``; empty
        when the stack has no key."""
        if not self.kms_grants or self.kms_grants_wait is None:
            return []
        unknown = [api for api in apis if api not in self.kms_grants]
        if unknown:
            raise KeyError(f"no key grant for {unknown}; key users are {list(KEY_USERS)}")
        return [*(self.kms_grants[api] for api in apis), self.kms_grants_wait]

    def needs(self, *apis: str) -> list[pulumi.Resource]:
        """The resources a component passes into ``depends_on`` for the APIs it calls."""
        missing = [api for api in apis if api not in self.apis]
        if missing:
            raise KeyError(f"API(s) not enabled by Foundation: {missing}; add them to foundation.APIS")
        deps: list[pulumi.Resource] = [self.apis[api] for api in apis]
        deps += [self.service_identities[api] for api in apis if api in self.service_identities]
        return deps

    def service_agent(self, api: str) -> pulumi.Output[str]:
        """The IAM member of Google's service agent for ``api``, e.g. ``serviceAccount:service-123@gcp-sa-pubsub...``.

        Grants to it must also depend on ``needs(api)`` so that the agent exists before the grant.
        """
        domain = SERVICE_AGENT_DOMAINS[api]
        return self.project_number.apply(lambda number: f"serviceAccount:service-{number}@{domain}")

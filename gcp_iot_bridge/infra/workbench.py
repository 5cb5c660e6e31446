"""Workbench: a Vertex AI Workbench instance (the successor of Cloud Datalab) to explore the warehouse.

Declared only when the stack enables it (``declare_workbench``): an idle notebook VM still costs its disks, and
a running one its machine. Restrictions, each a GCP pitfall or a least-privilege rule:

- Its own service account, allowed to read our dataset (BigQuery Data Viewer on the dataset, not the project)
  and to run query jobs (BigQuery Job User, which exists only at project level). No other role: the notebook
  reads with ``create_bqstorage_client=False``, so the Storage Read API (readSessionUser) is not needed.
- No external IP. The VM then reaches Google APIs (BigQuery, the Workbench proxy it registers with, package
  mirrors) only through Private Google Access on its subnet, or Cloud NAT; without either it boots but JupyterLab
  never becomes reachable. The subnet passed in must have Private Google Access: checked when its value is known.
- Users reach JupyterLab through the Workbench proxy (Google sign-in), so ``disable_proxy_access`` stays false.
  In the service-account access mode whoever holds Service Account User on the instance's account may open it:
  ``users`` get exactly that, on this account only.
- Idle shutdown (metadata ``idle-timeout-seconds``; it relies on guest attributes, which Workbench enables by
  default: not overridden here). No root in notebooks (``notebook-disable-root``).
- Shielded VM: Secure Boot, vTPM, integrity monitoring.
- Teardown: ``deletion_protection`` drives the API's deletion protection and the provider's deletion policy, so a
  dev/demo stack goes with one ``pulumi destroy`` and prod refuses to delete the notebooks' data disk.
- Creating a Workbench instance routinely takes 10-20 minutes (the provider raised its own create timeout to
  20 min for that reason): the create timeout here is longer still.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp

# Workbench counts idle time in minutes; its idle shutdown accepts 10 minutes to 24 hours.
MIN_IDLE_SECONDS = 10 * 60
MAX_IDLE_SECONDS = 24 * 60 * 60
_ZONE_RE = re.compile(r"^(?P<region>[a-z]+-[a-z]+\d+)-[a-z]$")
_MEMBER_RE = re.compile(r"^(user|group|serviceAccount|domain):\S+$")


@dataclass(frozen=True)
class WorkbenchArgs:
    project: str
    prefix: str
    zone: str  # Workbench instances are zonal, e.g. us-central1-a; must be in the subnet's region
    subnetwork: gcp.compute.Subnetwork  # with Private Google Access (no external IP)
    dataset_id: pulumi.Input[str]  # the warehouse dataset the notebooks read
    deletion_protection: bool
    machine_type: str = "e2-standard-4"
    idle_timeout_seconds: int = 60 * 60
    data_disk_gb: int = 100
    users: Sequence[str] = ()  # IAM members allowed into JupyterLab, e.g. "group:analysts@example.com"
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # notebooks, compute, bigquery, iam APIs

    def __post_init__(self) -> None:
        if not _ZONE_RE.match(self.zone):
            raise ValueError(f"zone {self.zone!r} is not a zone (e.g. us-central1-a); Workbench instances are zonal")
        if not MIN_IDLE_SECONDS <= self.idle_timeout_seconds <= MAX_IDLE_SECONDS:
            raise ValueError(f"idle_timeout_seconds={self.idle_timeout_seconds}: Workbench allows "
                             f"{MIN_IDLE_SECONDS}..{MAX_IDLE_SECONDS}")
        if self.data_disk_gb < 10:
            raise ValueError(f"data_disk_gb={self.data_disk_gb}: at least 10")
        for member in self.users:
            if not _MEMBER_RE.match(member):
                raise ValueError(f"user {member!r} is not an IAM member (user:, group:, serviceAccount:, domain:)")


class Workbench(pulumi.ComponentResource):
    """A private, self-stopping Workbench instance that can read the warehouse and nothing else."""

    service_account: gcp.serviceaccount.Account
    instance: gcp.workbench.Instance
    proxy_uri: pulumi.Output[str]

    def __init__(self, name: str, args: WorkbenchArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Workbench", name, None, opts)
        deps = list(args.depends_on)
        child = pulumi.ResourceOptions(parent=self, depends_on=deps)

        self.service_account = gcp.serviceaccount.Account(
            f"{name}-sa",
            project=args.project,
            account_id=f"{args.prefix}-workbench",
            display_name=f"Workbench notebooks ({args.prefix})",
            opts=child,
        )
        member = self.service_account.member

        grants: list[pulumi.Resource] = [
            gcp.bigquery.DatasetIamMember(
                f"{name}-dataset-viewer",
                project=args.project,
                dataset_id=args.dataset_id,
                role="roles/bigquery.dataViewer",
                member=member,
                opts=child,
            ),
            gcp.projects.IAMMember(
                f"{name}-job-user",
                project=args.project,
                role="roles/bigquery.jobUser",
                member=member,
                opts=child,
            ),
        ]
        for user in args.users:
            gcp.serviceaccount.IAMMember(
                f"{name}-user-{_slug(user)}",
                service_account_id=self.service_account.name,
                role="roles/iam.serviceAccountUser",
                member=user,
                opts=child,
            )

        subnet = args.subnetwork
        # Fails `pulumi up` (not the preview, where the values are unknown) on a subnet the VM cannot use.
        checked_subnet = pulumi.Output.all(subnet.id, subnet.region, subnet.private_ip_google_access).apply(
            lambda v: _check_subnet(v[0], v[1], v[2], args.zone))

        self.instance = gcp.workbench.Instance(
            f"{name}-instance",
            project=args.project,
            name=f"{args.prefix}-workbench",
            location=args.zone,
            gce_setup=gcp.workbench.InstanceGceSetupArgs(
                machine_type=args.machine_type,
                disable_public_ip=True,
                network_interfaces=[gcp.workbench.InstanceGceSetupNetworkInterfaceArgs(
                    network=subnet.network,
                    subnet=checked_subnet,
                )],
                service_accounts=[gcp.workbench.InstanceGceSetupServiceAccountArgs(
                    email=self.service_account.email)],
                shielded_instance_config=gcp.workbench.InstanceGceSetupShieldedInstanceConfigArgs(
                    enable_secure_boot=True,
                    enable_vtpm=True,
                    enable_integrity_monitoring=True,
                ),
                data_disks=gcp.workbench.InstanceGceSetupDataDisksArgs(
                    disk_size_gb=str(args.data_disk_gb), disk_type="PD_BALANCED"),
                metadata={
                    "idle-timeout-seconds": str(args.idle_timeout_seconds),
                    "notebook-disable-root": "true",
                },
            ),
            disable_proxy_access=False,
            enable_deletion_protection=args.deletion_protection,
            deletion_policy="PREVENT" if args.deletion_protection else "DELETE",
            labels=dict(args.labels),
            opts=pulumi.ResourceOptions(
                parent=self,
                # Grants first: the VM's first queries must not race its roles.
                depends_on=[*deps, *grants],
                custom_timeouts=pulumi.CustomTimeouts(create="40m", update="30m", delete="30m"),
            ),
        )
        self.proxy_uri = self.instance.proxy_uri
        self.register_outputs({
            "workbench_instance": self.instance.name,
            "workbench_service_account": self.service_account.email,
            "workbench_proxy_uri": self.proxy_uri,
        })


def declare_workbench(name: str, enabled: bool, args: WorkbenchArgs,
                      opts: pulumi.ResourceOptions | None = None) -> Workbench | None:
    """The Workbench when the stack enables it; otherwise nothing is declared (and nothing is billed)."""
    return Workbench(name, args, opts) if enabled else None


def _check_subnet(subnet_id: str, region: str | None, private_google_access: bool | None, zone: str) -> str:
    if not private_google_access:
        raise pulumi.RunError(
            f"Workbench subnet {subnet_id} has no Private Google Access: an instance without an external IP "
            f"could not reach BigQuery or the Workbench proxy; set private_ip_google_access=True on it")
    zone_region = _ZONE_RE.match(zone)
    if region and zone_region and zone_region.group("region") != region:
        raise pulumi.RunError(f"Workbench zone {zone} is not in the subnet's region {region}")
    return subnet_id


def _slug(member: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", member.lower()).strip("-")[:50]

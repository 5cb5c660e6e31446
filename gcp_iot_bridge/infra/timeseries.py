"""Time-series store: a Bigtable instance with autoscaling clusters and the ``telemetry`` table of ``iotbridge.spec``
with a max-age GC policy on each column family.

No app profile is declared: the pipeline writes with Beam's Python ``WriteToBigTable``, which takes no app profile
id, so its writes go through the instance's ``default`` profile, and a profile nothing uses would only be clutter.

Teardown: pulumi-gcp defaults the instance's ``deletion_protection`` to true, so it is always set from the stack's
switch; the table's own protection (``PROTECTED`` forbids deleting the table, its column families and the
instance) follows the same switch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulumi
import pulumi_gcp as gcp

from iotbridge import spec


@dataclass(frozen=True)
class TimeSeriesArgs:
    project: str
    prefix: str
    zones: Sequence[str]  # one cluster per zone; two or more replicate
    deletion_protection: bool
    depends_on: Sequence[pulumi.Resource] = ()  # the Bigtable admin API
    labels: Mapping[str, str] = field(default_factory=dict)
    storage_type: Literal["SSD", "HDD"] = "SSD"
    min_nodes: int = 1
    max_nodes: int = 3
    cpu_target: int = 60  # percent, 10..80
    gc_max_age: str = "720h"  # Go duration, as the GC policy takes it
    # CMEK for every cluster (one key for all clusters, in their region). Changing it later recreates the whole
    # instance, so set it when the stack is created. depends_on must hold the Bigtable agent's key grant.
    kms_key_name: str | None = None


class TimeSeries(pulumi.ComponentResource):
    """Bigtable instance and the ``telemetry`` table with GC policies."""

    instance: gcp.bigtable.Instance
    table: gcp.bigtable.Table
    gc_policies: dict[str, gcp.bigtable.GCPolicy]

    def __init__(self, name: str, args: TimeSeriesArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:TimeSeries", name, None, opts)
        if not args.zones:
            raise ValueError("at least one zone is needed")
        if not 10 <= args.cpu_target <= 80:
            raise ValueError(f"cpu_target must be 10..80, got {args.cpu_target}")
        if not 1 <= args.min_nodes <= args.max_nodes <= 10 * args.min_nodes:
            raise ValueError(
                f"need 1 <= min_nodes <= max_nodes <= 10 x min_nodes, got {args.min_nodes}..{args.max_nodes}")
        child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))

        # Cluster ids must be unique per project and 6..30 characters: "{prefix}-c-{zone letter}".
        cluster_ids = [f"{args.prefix}-c-{zone.rsplit('-', 1)[-1]}" for zone in args.zones]
        self.instance = gcp.bigtable.Instance(
            f"{name}-instance",
            project=args.project,
            name=f"{args.prefix}-tsdb",
            display_name=f"{args.prefix} telemetry",
            clusters=[
                gcp.bigtable.InstanceClusterArgs(
                    cluster_id=cluster_id,
                    zone=zone,
                    storage_type=args.storage_type,
                    kms_key_name=args.kms_key_name,
                    autoscaling_config=gcp.bigtable.InstanceClusterAutoscalingConfigArgs(
                        min_nodes=args.min_nodes, max_nodes=args.max_nodes, cpu_target=args.cpu_target),
                )
                for cluster_id, zone in zip(cluster_ids, args.zones, strict=True)
            ],
            labels=dict(args.labels),
            deletion_protection=args.deletion_protection,
            opts=child,
        )

        table_spec = spec.BIGTABLE
        self.table = gcp.bigtable.Table(
            f"{name}-{table_spec.table}",
            project=args.project,
            instance_name=self.instance.name,
            name=table_spec.table,
            column_families=[gcp.bigtable.TableColumnFamilyArgs(family=f) for f in table_spec.column_families],
            deletion_protection="PROTECTED" if args.deletion_protection else "UNPROTECTED",
            opts=child,
        )

        self.gc_policies = {
            family: gcp.bigtable.GCPolicy(
                f"{name}-{table_spec.table}-{family}-gc",
                project=args.project,
                instance_name=self.instance.name,
                table=self.table.name,
                column_family=family,
                max_age=gcp.bigtable.GCPolicyMaxAgeArgs(duration=args.gc_max_age),
                # A GC policy cannot be deleted on a replicated instance, which would block `pulumi destroy`;
                # the table's deletion removes it anyway.
                deletion_policy="ABANDON",
                opts=child,
            )
            for family in table_spec.column_families
        }

        self.register_outputs({
            "bigtable_instance": self.instance.name,
            "bigtable_table": self.table.name,
        })

"""Warehouse: the BigQuery dataset, the tables and the dashboard views of ``iotbridge.spec``
(docs/storage.md).

Teardown: ``deletion_protection`` drives both BigQuery knobs. pulumi-gcp defaults a table's own
``deletion_protection`` to true, so a dev stack that forgot it could never be destroyed; it is always set
explicitly here, on tables and views alike.

Data expiry (demo stacks) is a partition expiration, not the dataset's ``default_table_expiration_ms``: that one
would give the managed tables an expiration time, BigQuery would drop them (and the BigQuery subscription's
target with them) and the provider cannot clear it again (setting 0 leaves the expiration in place).
All tables here are partitioned, so partition expiration ages out the data and keeps the tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp

from iotbridge import spec

_DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class WarehouseArgs:
    project: str
    dataset_id: str
    location: str
    deletion_protection: bool
    depends_on: Sequence[pulumi.Resource] = ()  # the BigQuery API
    labels: Mapping[str, str] = field(default_factory=dict)
    data_expiration_days: int = 0  # 0: keep data
    # CMEK: the dataset's default key, so every table, view and model created in it is encrypted with it. Tables
    # that already exist keep their key. depends_on must hold the BigQuery encryption agent's key grant.
    kms_key_name: str | None = None
    # A dataset of the user's own (declared in their program, or ``gcp.bigquery.Dataset.get`` of one outside it):
    # the tables and views go into it and the warehouse declares no dataset. ``dataset_id`` must name it (the views'
    # queries name it); its location, expiry default and key stay the user's (``location`` and ``kms_key_name`` are
    # then not used).
    dataset: gcp.bigquery.Dataset | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and self.kms_key_name:
            raise ValueError("kms_key_name sets the key of the dataset the warehouse declares; with your own dataset, "
                             "set its default_encryption_configuration instead")


class Warehouse(pulumi.ComponentResource):
    """BigQuery dataset, tables with explicit schemas, and views a Looker Studio report reads."""

    dataset: gcp.bigquery.Dataset
    tables: dict[str, gcp.bigquery.Table]
    views: dict[str, gcp.bigquery.Table]
    table_ids: dict[str, pulumi.Output[str]]  # spec name -> "project.dataset.table" (BigQuery subscriptions)

    def __init__(self, name: str, args: WarehouseArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:Warehouse", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on))
        expiration_ms = args.data_expiration_days * _DAY_MS if args.data_expiration_days else None

        self.dataset = args.dataset or gcp.bigquery.Dataset(
            f"{name}-dataset",
            project=args.project,
            dataset_id=args.dataset_id,
            location=args.location,
            description="IoT telemetry warehouse (gcp-iot-bridge).",
            labels=dict(args.labels),
            default_partition_expiration_ms=expiration_ms,
            default_encryption_configuration=gcp.bigquery.DatasetDefaultEncryptionConfigurationArgs(
                kms_key_name=args.kms_key_name) if args.kms_key_name else None,
            delete_contents_on_destroy=not args.deletion_protection,
            opts=child,
        )

        self.tables = {}
        for table in spec.TABLES.values():
            partitioning = None
            if table.partition_field:
                partitioning = gcp.bigquery.TableTimePartitioningArgs(
                    type="DAY", field=table.partition_field, expiration_ms=expiration_ms)
            self.tables[table.name] = gcp.bigquery.Table(
                f"{name}-{table.name}",
                project=args.project,
                dataset_id=self.dataset.dataset_id,
                table_id=table.name,
                description=table.description,
                schema=json.dumps(table.schema()),
                time_partitioning=partitioning,
                clusterings=list(table.clustering) or None,
                labels=dict(args.labels),
                deletion_protection=args.deletion_protection,
                opts=child,
            )

        self.views = {}
        for view in spec.VIEWS.values():
            self.views[view.name] = gcp.bigquery.Table(
                f"{name}-{view.name}",
                project=args.project,
                dataset_id=self.dataset.dataset_id,
                table_id=view.name,
                description=view.description,
                view=gcp.bigquery.TableViewArgs(
                    query=view.render(args.project, args.dataset_id), use_legacy_sql=False),
                labels=dict(args.labels),
                deletion_protection=args.deletion_protection,
                # A view is created by query text; BigQuery checks the referenced tables exist.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.depends_on, *self.tables.values()]),
            )

        self.table_ids = {
            key: pulumi.Output.concat(t.project, ".", t.dataset_id, ".", t.table_id) for key, t in self.tables.items()
        }
        self.register_outputs({
            "bigquery_dataset": self.dataset.dataset_id,
            "tables": {k: t.table_id for k, t in self.tables.items()},
            "views": {k: v.table_id for k, v in self.views.items()},
        })

"""RegistryDatabase: the device registry's Firestore database, shared by everything that reads or writes devices —
the broker hosts (``Broker``), the config-push function (``ConfigPush``) and any other service over the registry.
It is a component of its own so that each of them takes it as an input, and none of them owns it.

What it declares, and the GCP pitfall behind each choice:

- Firestore database (Native mode) with ``deletion_policy`` and ``delete_protection_state`` from the one
  ``deletion_protection`` switch: the provider's default ``ABANDON`` would leave the database behind on
  ``pulumi destroy`` and the next ``pulumi up`` would fail with "database already exists". Protection is the
  database's own delete protection, so ``pulumi destroy`` of a protected stack fails loudly on it.
- A TTL policy on ``requests.expire_at``, which removes the config-push function's idempotency markers, with no
  single-field index (nobody queries that field).
- A TTL policy on ``changes.expire_at``, which removes the devices' change stamps a week after their last change
  (``iotbridge.registry.CHANGE_STAMP_KEEP_S``): a deleted device's tombstone does not stay forever. The broker hosts
  query ``changes.at``, whose automatic single-field index stays; ``expire_at`` gets none. Created after the first
  policy, not beside it: Firestore answers concurrent field changes of one database with 409 "underlying data
  changed".

The database is the registry: replacing it loses every device, credential and config. It was declared by
``Broker`` (as ``{broker}-firestore`` and ``{broker}-requests-ttl``) before this component existed; a program
names the ``Broker`` components that declared it in ``former_brokers``, and both resources carry aliases to
their former URNs, so a deployed stack moves them here without replacing anything.

Outputs: ``name`` (the database id, e.g. ``(default)``), ``resource_name`` (``projects/{p}/databases/{id}``, the
name IAM conditions and the Firestore clients use), ``location``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

BROKER_TYPE = "gcp-iot-bridge:index:Broker"
# The names the two resources had under a Broker named B: f"{B}{suffix}".
FORMER_SUFFIXES = {"database": "-firestore", "requests_ttl": "-requests-ttl"}


@dataclass(frozen=True)
class FormerBroker:
    """A ``Broker`` component that declared the registry's database before ``RegistryDatabase`` existed."""

    name: str  # its logical name
    parent: pulumi.Resource | None = None  # its parent component; None: the stack itself


@dataclass(frozen=True)
class RegistryDatabaseArgs:
    project: str
    location: str  # a Firestore location: a region (the stack's) or a multi-region such as nam5, eur3
    deletion_protection: bool
    database: str = "(default)"  # the database id; "(default)" is the project's default database
    depends_on: Sequence[pulumi.Resource] = ()  # the Firestore API
    # Where the database was declared before (see the module docstring): each becomes an alias of the database and
    # of its TTL policy. A program that never deployed a Broker with a database of its own leaves it empty.
    former_brokers: Sequence[FormerBroker] = ()


class RegistryDatabase(pulumi.ComponentResource):
    """The device registry's Firestore database and the TTL policies of the config-push idempotency markers and of
    the devices' change stamps."""

    database: gcp.firestore.Database
    requests_ttl: gcp.firestore.Field
    changes_ttl: gcp.firestore.Field
    name: pulumi.Output[str]  # the database id
    resource_name: pulumi.Output[str]  # projects/{project}/databases/{id}
    location: pulumi.Output[str]

    def __init__(self, name: str, args: RegistryDatabaseArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("gcp-iot-bridge:index:RegistryDatabase", name, None, opts)
        self._project = args.project
        deps = list(args.depends_on)
        self.database = gcp.firestore.Database(
            f"{name}-firestore",
            project=args.project,
            name=args.database,
            location_id=args.location,
            type="FIRESTORE_NATIVE",
            deletion_policy="DELETE",
            delete_protection_state=("DELETE_PROTECTION_ENABLED" if args.deletion_protection
                                     else "DELETE_PROTECTION_DISABLED"),
            opts=pulumi.ResourceOptions(parent=self, depends_on=deps,
                                        aliases=_former(args.former_brokers, "database")),
        )
        self.requests_ttl = self._ttl_policy(f"{name}-requests-ttl", "requests", deps,
                                             aliases=_former(args.former_brokers, "requests_ttl"))
        self.changes_ttl = self._ttl_policy(f"{name}-changes-ttl", "changes", [*deps, self.requests_ttl])
        self.name = self.database.name
        self.resource_name = self.database.name.apply(lambda db: f"projects/{args.project}/databases/{db}")
        self.location = self.database.location_id
        self.register_outputs({
            "firestore_database": self.name,
            "resource_name": self.resource_name,
            "location": self.location,
        })

    def _ttl_policy(self, resource_name: str, collection: str, depends_on: list[pulumi.Resource],
                    aliases: list[pulumi.Input[str] | pulumi.Alias] | None = None) -> gcp.firestore.Field:
        """A TTL policy on ``{collection}.expire_at`` (a collection group), with no single-field index: the field
        is never queried."""
        return gcp.firestore.Field(
            resource_name,
            project=self._project,
            database=self.database.name,
            collection=collection,
            field="expire_at",
            ttl_config=gcp.firestore.FieldTtlConfigArgs(),
            index_config=gcp.firestore.FieldIndexConfigArgs(indexes=[]),
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on, aliases=aliases),
        )

    def user_grant(self, resource_name: str, member: pulumi.Input[str], opts: pulumi.ResourceOptions, *,
                   title: str, condition: Callable[[str], str]) -> gcp.projects.IAMMember:
        """``roles/datastore.user`` for ``member`` on this database only: a project grant with an IAM condition,
        ``condition(resource_name)`` of this database's ``projects/{p}/databases/{id}``. (Each caller keeps the
        condition text its deployed grant has: a changed condition replaces the grant.)"""
        return gcp.projects.IAMMember(
            resource_name,
            project=self._project,
            role="roles/datastore.user",
            member=member,
            condition=gcp.projects.IAMMemberConditionArgs(title=title,
                                                          expression=self.resource_name.apply(condition)),
            opts=opts,
        )


def _former(brokers: Sequence[FormerBroker], key: str) -> list[pulumi.Input[str] | pulumi.Alias]:
    """Aliases of one resource: the name it had under each former Broker, with that Broker as its parent."""
    return [pulumi.Alias(name=f"{b.name}{FORMER_SUFFIXES[key]}",
                         parent=pulumi.create_urn(b.name, BROKER_TYPE, parent=b.parent))
            for b in brokers]

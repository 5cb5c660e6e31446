"""Access to the device registry's Firestore database for a workload that reads and writes it.

``roles/datastore.user`` can only be granted on the project; an IAM condition on the resource name narrows it to
the registry's database (and every document in it), so the workload cannot touch another database of the project.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp


def registry_database_user(name: str, project: str, database: str, member: pulumi.Input[str],
                           opts: pulumi.ResourceOptions) -> gcp.projects.IAMMember:
    """``roles/datastore.user`` for ``member`` on ``projects/{project}/databases/{database}`` only."""
    path = f"projects/{project}/databases/{database}"
    return gcp.projects.IAMMember(
        name,
        project=project,
        role="roles/datastore.user",
        member=member,
        condition=gcp.projects.IAMMemberConditionArgs(
            title="registry-database-only",
            expression=f'resource.name == "{path}" || resource.name.startsWith("{path}/")',
        ),
        opts=opts,
    )

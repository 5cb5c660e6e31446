"""The one way this library makes a Cloud Storage bucket: private, in one location, emptied by ``pulumi destroy``
only when the stack is not protected, and encrypted with the stack's key when it has one.

Every bucket here holds the stack's own files (the broker hosts' code, the config-push function's source, the
Dataflow template and its temp files, the edge models), never anything the public reads:

- uniform bucket-level access: IAM alone decides who reads an object; no object ACL can open one up;
- public access prevention ``enforced``: a grant to ``allUsers`` or ``allAuthenticatedUsers`` is refused;
- ``force_destroy`` = not ``deletion_protection``: an unprotected stack's ``destroy`` empties and removes the
  bucket; a protected one's fails on a bucket that still holds objects;
- ``kms_key_name`` (CMEK): the bucket's default key; the caller's ``depends_on`` must hold the Cloud Storage
  agent's grant on it, or the first write fails;
- ``versioned``: keep earlier generations of an overwritten object (the models bucket, whose artifacts devices
  may still be downloading).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pulumi
import pulumi_gcp as gcp


def private_bucket(resource_name: str, *, project: str, name: str, location: str, deletion_protection: bool,
                   labels: Mapping[str, str], kms_key_name: str | None, opts: pulumi.ResourceOptions,
                   versioned: bool = False,
                   lifecycle_rules: Sequence[gcp.storage.BucketLifecycleRuleArgs] | None = None,
                   ) -> gcp.storage.Bucket:
    """A private bucket named ``name`` (globally unique), declared as ``resource_name`` with ``opts``."""
    return gcp.storage.Bucket(
        resource_name,
        project=project,
        name=name,
        location=location,
        uniform_bucket_level_access=True,
        public_access_prevention="enforced",
        versioning=gcp.storage.BucketVersioningArgs(enabled=True) if versioned else None,
        lifecycle_rules=list(lifecycle_rules) if lifecycle_rules is not None else None,
        force_destroy=not deletion_protection,
        encryption=gcp.storage.BucketEncryptionArgs(default_kms_key_name=kms_key_name) if kms_key_name else None,
        labels=dict(labels),
        opts=opts,
    )

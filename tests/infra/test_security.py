"""No basic role (roles/owner|editor|viewer) and no public member (allUsers, allAuthenticatedUsers) anywhere in
any stack. The scan reads every input of every resource, so it also covers components added later.

One public member is by design: ``roles/run.invoker`` for ``allUsers`` on the admin API's Cloud Run service, which
authenticates every request itself (docs/admin-api-auth.md). The scan allows exactly that grant and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pulumi_gcp as gcp
import pytest

from tests.infra import harness

BASIC_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}
PUBLIC = {"allUsers", "allAuthenticatedUsers"}


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def _is_the_admin_api_invoker(r: harness.Resource) -> bool:
    return (r.type, r.name, r.get("role"), r.get("member")) == (
        "gcp:cloudrunv2/serviceIamMember:ServiceIamMember", "admin-api-public-invoker", "roles/run.invoker",
        "allUsers") and str(r.get("name")).endswith("-admin-api")


def violations(run: harness.StackRun) -> list[str]:
    found = []
    for r in run.resources:
        if _is_the_admin_api_invoker(r):
            continue
        for text in strings(r.inputs):
            if text in BASIC_ROLES or text.split(":")[-1] in PUBLIC or text in PUBLIC:
                found.append(f"{r.type} {r.name}: {text}")
    return found


@pytest.mark.parametrize("stack", harness.STACKS)
def test_no_basic_roles_and_no_public_members(stack: str) -> None:
    run = harness.stack_run(stack)
    assert any(r.get("role") for r in run.resources), "no IAM grants scanned at all"
    assert violations(run) == []
    assert len([r for r in run.resources if _is_the_admin_api_invoker(r)]) == 1


@pytest.mark.parametrize(("role", "member"), [("roles/editor", "serviceAccount:x@p.iam.gserviceaccount.com"),
                                              ("roles/pubsub.subscriber", "allUsers")])
def test_the_scan_catches_a_basic_role_or_public_member(role: str, member: str) -> None:
    def program() -> None:
        gcp.projects.IAMMember("bad", project="p-123456", role=role, member=member)

    run = harness.run_program("dev", program=program)
    assert violations(run) == [f"gcp:projects/iAMMember:IAMMember bad: {role if role in BASIC_ROLES else member}"]

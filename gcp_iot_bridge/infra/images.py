"""Container images a component builds and pushes during ``pulumi up``: an Artifact Registry repository of its own
and a pulumi-docker-build image of a Dockerfile over a staged build context (``packaging.stage``).

The pipeline's Flex Template image and the admin API's image are built this way. The tag is the content hash of
what the image is built from (each component computes it), so a preview sees the same tag until the code changes;
the reference the workload runs is ``tag@sha256:digest``, the exact bytes that were pushed. Nothing is staged or
hashed for a component that runs a prebuilt image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp


@dataclass(frozen=True)
class ImageArgs:
    project: str
    region: str
    repository_id: str  # the Artifact Registry repository, e.g. "{prefix}-dataflow"
    description: str  # of the repository
    image_name: str  # the image's name in the repository
    dockerfile: Path
    context: Callable[[], Path]  # stages the build context and returns its folder
    tag: Callable[[], str]  # the content hash of the build context and the Dockerfile
    build_args: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    depends_on: Sequence[pulumi.Resource] = ()  # the artifactregistry API


@dataclass(frozen=True)
class PushedImage:
    repository: gcp.artifactregistry.Repository
    image: docker_build.Image
    ref: pulumi.Output[str]  # tag@sha256:digest


def push_image(name: str, args: ImageArgs, parent: pulumi.Resource) -> PushedImage:
    """``{name}-images`` (the repository) and ``{name}-image`` (the build and push), children of ``parent``."""
    repository = gcp.artifactregistry.Repository(
        f"{name}-images",
        project=args.project,
        location=args.region,
        repository_id=args.repository_id,
        format="DOCKER",
        description=args.description,
        labels=dict(args.labels),
        opts=pulumi.ResourceOptions(parent=parent, depends_on=list(args.depends_on)),
    )
    registry = f"{args.region}-docker.pkg.dev"
    # The short-lived token of the identity running `pulumi up`; a secret so it never reaches the state.
    token = pulumi.Output.secret(gcp.organizations.get_client_config_output(
        opts=pulumi.InvokeOutputOptions(parent=parent)).access_token)
    image = docker_build.Image(
        f"{name}-image",
        # Paths relative to where `pulumi` runs: absolute ones would differ between checkouts and show a diff on
        # every other operator's machine.
        context=docker_build.BuildContextArgs(location=os.path.relpath(args.context())),
        dockerfile=docker_build.DockerfileArgs(location=os.path.relpath(args.dockerfile)),
        platforms=[docker_build.Platform.LINUX_AMD64],  # Dataflow workers and Cloud Run are x86-64
        build_args=dict(args.build_args) or None,
        tags=[repository.repository_id.apply(
            lambda repo: f"{registry}/{args.project}/{repo}/{args.image_name}:{args.tag()}")],
        push=True,
        # Previews must not need a Docker daemon or push anything.
        build_on_preview=False,
        registries=[docker_build.RegistryArgs(address=registry, username="oauth2accesstoken", password=token)],
        opts=pulumi.ResourceOptions(parent=parent, depends_on=[*args.depends_on, repository]),
    )
    return PushedImage(repository=repository, image=image, ref=image.ref)


def prebuilt_or_pushed(name: str, prebuilt: str | None, args: ImageArgs, parent: pulumi.Resource
                       ) -> tuple[gcp.artifactregistry.Repository | None, docker_build.Image | None,
                                  pulumi.Output[str]]:
    """The repository, image and reference a component runs: ``prebuilt`` as given (no repository, no build), or
    the image of ``args`` built and pushed (``push_image``)."""
    if prebuilt:
        return None, None, pulumi.Output.from_input(prebuilt)
    pushed = push_image(name, args, parent)
    return pushed.repository, pushed.image, pushed.ref

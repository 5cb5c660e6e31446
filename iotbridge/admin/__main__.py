"""``python -m iotbridge.admin``: serve the device manager API (docs/admin-api.md).

Settings come from flags or, for a container (Cloud Run), the environment:

    --host     ADMIN_HOST      address to listen on (default 0.0.0.0)
    --port     PORT            port (default 8080; Cloud Run sets PORT)
    --project  PROJECT_ID      the deployment's project
    --region   REGION          its region (the API's location)
    --registry REGISTRY_ID     the deployment's own registry, created when first served
    --prefix   TOPIC_PREFIX    the stack's topic prefix ({prefix}-device-commands, -telemetry, -state, ...)
    --database FIRESTORE_DATABASE  the registry's Firestore database (default: (default))
    --auth     ADMIN_AUTH      none: any caller (local, like Google's emulators) | google: the callers the
                               deployment authorizes (``iotbridge.admin.auth.authorizer_from_env(os.environ)``)

``ADMIN_AUTH`` has no default: a server that accepts every caller is never started by omission.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from google.cloud import firestore, pubsub_v1
from werkzeug.serving import make_server

from iotbridge import registry as reg
from iotbridge.admin.app import Access, Authorize, allow_all, create_app


def default_settings(project: str, prefix: str) -> reg.RegistrySettings:
    """The deployment's own registry is created with no routes of its own: its devices' events and states go where
    the stack's config routes them (the bridge's ``routes`` and topics, docs/messages.md). A stored copy of those
    routes would outlive a change of the stack's config and, read by the bridge, send events to the old topics; an
    operator who sets ``eventNotificationConfigs`` on it through the API still gets them honoured."""
    del project, prefix
    return reg.RegistrySettings()


def authorizer(mode: str, env: Mapping[str, str]) -> Authorize:
    if mode == "none":
        return allow_all
    if mode == "google":
        import importlib

        # The cloud deployment's access-token verifier (iotbridge/admin/auth.py): authorizer_from_env(env).
        auth = importlib.import_module("iotbridge.admin.auth")
        return auth.authorizer_from_env(env)
    raise SystemExit(f"--auth/ADMIN_AUTH must be none or google, got {mode!r}")


def parse(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m iotbridge.admin", description="Serve the device manager API.")
    p.add_argument("--host", default=env.get("ADMIN_HOST", "0.0.0.0"))  # noqa: S104 - a container's server
    p.add_argument("--port", type=int, default=int(env.get("PORT", "8080")))
    p.add_argument("--project", default=env.get("PROJECT_ID"))
    p.add_argument("--region", default=env.get("REGION"))
    p.add_argument("--registry", default=env.get("REGISTRY_ID"))
    p.add_argument("--prefix", default=env.get("TOPIC_PREFIX"))
    p.add_argument("--database", default=env.get("FIRESTORE_DATABASE") or None)
    p.add_argument("--auth", default=env.get("ADMIN_AUTH"))
    ns = p.parse_args(argv)
    missing = [flag for flag in ("project", "region", "registry", "prefix", "auth") if not getattr(ns, flag)]
    if missing:
        p.error("not set: " + ", ".join(f"--{m}" for m in missing) + " (or their environment variables)")
    return ns


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ns = parse(sys.argv[1:] if argv is None else argv, env)
    authorize = authorizer(ns.auth, env)
    client = firestore.Client(project=ns.project, database=ns.database) if ns.database \
        else firestore.Client(project=ns.project)
    access = Access(ns.project, ns.region, ns.registry, ns.prefix, client, default_settings(ns.project, ns.prefix))
    access.ensure_default()
    app = create_app(access, pubsub_v1.PublisherClient(), authorize)
    server = make_server(ns.host, ns.port, app, threaded=True)
    logging.getLogger("iotbridge.admin").info("serving the device manager API on http://%s:%d/ (auth: %s)",
                                              ns.host, server.server_port, ns.auth)
    server.serve_forever()


if __name__ == "__main__":  # pragma: no cover
    main()

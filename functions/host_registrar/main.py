"""Host registrar: an HTTP function that makes and deletes a broker host's own delivery subscription on the host's
behalf (:mod:`iotbridge.bridge.registrar`), so that the hosts' service account holds no project role for Pub/Sub.

A host calls it at start (``PUT``) and at a clean stop (``DELETE``) with its instance identity token in
``X-Host-Identity``; the answer is JSON: ``{"subscription": path, "host": id}``, or ``{"error": reason}`` with 401
(no valid Google-signed token for this function's URL), 403 (not a broker host of this stack) or 405.

Configuration (environment): PROJECT_ID, PREFIX, REGISTRAR_URL (this function's own URL: the tokens' audience),
HOSTS_ACCOUNT (the hosts' service account's email), PUBSUB_AGENT (``serviceAccount:service-{number}@gcp-sa-pubsub
.iam.gserviceaccount.com``), CERTS_URL (optional: where Google's token-signing certificates are read).

Run locally: ``functions-framework --source functions/host_registrar/main.py --target handle``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import functions_framework

from iotbridge.bridge import registrar

logging.basicConfig(level=logging.INFO)


@functools.cache
def _settings() -> registrar.RegistrarSettings:
    return registrar.RegistrarSettings.from_env(os.environ)


@functools.cache
def subscriber() -> Any:  # noqa: ANN401 - a pubsub_v1.SubscriberClient, made once per instance
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()


@functions_framework.http
def handle(request: Any) -> tuple[dict[str, str], int]:  # noqa: ANN401 - a flask.Request
    return registrar.handle(request.method, request.headers.get(registrar.IDENTITY_HEADER, ""), _settings(),
                            subscriber)

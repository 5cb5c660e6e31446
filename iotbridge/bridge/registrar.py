"""The host registrar: makes and deletes a broker host's own delivery subscription on the host's behalf, so that the
hosts' service account needs no project role for Pub/Sub (docs/broker-scaling.md, "What a host may do").

A host proves which VM it is with its instance identity token: the metadata server's
``instance/service-accounts/default/identity?audience={registrar}&format=full``, a Google-signed ID token whose
``google.compute_engine`` claims name the project and the instance. The registrar (``functions/host_registrar``)
verifies the token (Google's signature, the audience, the issuer, the hosts' service account), takes the host id
from the instance's name, and

- at ``PUT``, creates or reuses that host's subscription exactly as a host would
  (:func:`fanout.ensure_host_subscription`: filter, expiration, retries, dead-letter policy) and sets its IAM
  policy: ``roles/pubsub.subscriber`` for the hosts' service account (pull and acknowledge) and for Pub/Sub's
  service agent (acknowledging what it dead-letters). Nothing else is granted on it;
- at ``DELETE`` (a clean stop), deletes it.

A token for another project, another service account, or a VM outside the group (its name lacks
``{prefix}-broker-``) is refused. The host side is :class:`RegistrarClient`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from iotbridge import spec
from iotbridge.bridge import fanout

log = logging.getLogger(__name__)

# The registrar reads the instance identity token from this header, not from Authorization: the platform in front of
# the function (Cloud Run's invoker check) reads Authorization itself and does not promise to pass it on intact.
IDENTITY_HEADER = "X-Host-Identity"
CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"  # the certificates Google signs ID tokens with
ID_TOKEN_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
SUBSCRIBER_ROLE = "roles/pubsub.subscriber"
METADATA_HOST = "metadata.google.internal"


class Refused(Exception):  # noqa: N818 - a refusal with its HTTP status, not a fault
    """A request the registrar does not carry out: ``Refused(status, reason)``, ``status`` its HTTP answer."""

    @property
    def status(self) -> int:
        return int(self.args[0])

    def __str__(self) -> str:
        return str(self.args[1])


@dataclass(frozen=True)
class RegistrarSettings:
    project: str
    prefix: str
    audience: str  # the registrar's own URL: the audience the hosts' tokens must name
    hosts_account: str  # the email of the hosts' service account
    pubsub_agent: str  # "serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    certs_url: str = CERTS_URL

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RegistrarSettings:
        """PROJECT_ID, PREFIX, REGISTRAR_URL, HOSTS_ACCOUNT, PUBSUB_AGENT; CERTS_URL optional."""
        missing = [k for k in ("PROJECT_ID", "PREFIX", "REGISTRAR_URL", "HOSTS_ACCOUNT", "PUBSUB_AGENT")
                   if not env.get(k)]
        if missing:
            raise ValueError(f"host registrar: missing environment {', '.join(missing)}")
        return cls(project=env["PROJECT_ID"], prefix=env["PREFIX"], audience=env["REGISTRAR_URL"],
                   hosts_account=env["HOSTS_ACCOUNT"], pubsub_agent=env["PUBSUB_AGENT"],
                   certs_url=env.get("CERTS_URL") or CERTS_URL)

    @property
    def host_prefix(self) -> str:
        """What the managed instance group's VMs are named with (``{prefix}-broker`` and a suffix)."""
        return f"{self.prefix}-broker-"


def verify(token: str, settings: RegistrarSettings, request: Any = None) -> Mapping[str, Any]:  # noqa: ANN401
    """The claims of a Google-signed ID token for the registrar's audience; Refused (401) otherwise."""
    import google.auth.exceptions
    from google.auth.transport import requests as auth_requests
    from google.oauth2 import id_token

    if not token:
        raise Refused(401, f"no instance identity token in {IDENTITY_HEADER}")
    try:
        claims = id_token.verify_token(token, request or auth_requests.Request(), audience=settings.audience,
                                       certs_url=settings.certs_url)
    except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
        raise Refused(401, f"instance identity token refused: {exc}") from None
    if claims.get("iss") not in ID_TOKEN_ISSUERS:
        raise Refused(401, f"instance identity token from issuer {claims.get('iss')!r}, not Google")
    return claims


def host_of(claims: Mapping[str, Any], settings: RegistrarSettings) -> str:
    """The host id a verified token speaks for: its instance's name, when the instance is one of the group's and
    runs as the hosts' service account in this project. Refused (403) otherwise."""
    if claims.get("email") != settings.hosts_account or claims.get("email_verified") is not True:
        raise Refused(403, f"{claims.get('email')!r} is not the broker hosts' service account")
    engine = (claims.get("google") or {}).get("compute_engine") or {}
    if not engine:
        raise Refused(403, "not an instance identity token with its instance's details (format=full)")
    if engine.get("project_id") != settings.project:
        raise Refused(403, f"instance of project {engine.get('project_id')!r}, not {settings.project!r}")
    name = str(engine.get("instance_name") or "")
    if not name.startswith(settings.host_prefix):
        raise Refused(403, f"instance {name!r} is not a broker host of {settings.prefix!r}")
    try:
        return spec.validate_host_id(name)
    except spec.MessageError as exc:
        raise Refused(403, str(exc)) from None


def subscription_policy(settings: RegistrarSettings) -> dict[str, Any]:
    """The whole IAM policy of a host's subscription: the hosts' account and Pub/Sub's agent as subscribers."""
    members = sorted({f"serviceAccount:{settings.hosts_account}", settings.pubsub_agent})
    return {"bindings": [{"role": SUBSCRIBER_ROLE, "members": members}]}


def register(subscriber: Any, settings: RegistrarSettings, host_id: str) -> str:  # noqa: ANN401 - SubscriberClient
    """Create (or reuse) the host's subscription and set its policy; its path."""
    path = fanout.ensure_host_subscription(subscriber, settings.project, settings.prefix, host_id)
    subscriber.set_iam_policy(request={"resource": path, "policy": subscription_policy(settings)})
    log.info("registered %s for host %s", path, host_id)
    return path


def unregister(subscriber: Any, settings: RegistrarSettings, host_id: str) -> None:  # noqa: ANN401
    fanout.delete_host_subscription(subscriber, settings.project, settings.prefix, host_id)
    log.info("deleted the subscription of host %s", host_id)


def handle(method: str, token: str, settings: RegistrarSettings, subscriber: Callable[[], Any],
           request: Any = None) -> tuple[dict[str, str], int]:  # noqa: ANN401
    """One registrar request: ``PUT`` registers the calling host, ``DELETE`` unregisters it. The JSON body and
    the HTTP status; a refusal's reason is in ``error``."""
    if method not in ("PUT", "DELETE"):
        return {"error": f"method {method} not allowed: PUT or DELETE"}, 405
    try:
        host = host_of(verify(token, settings, request), settings)
    except Refused as exc:
        log.warning("refused %s: %s", method, exc)
        return {"error": str(exc)}, exc.status
    if method == "PUT":
        return {"subscription": register(subscriber(), settings, host), "host": host}, 200
    unregister(subscriber(), settings, host)
    return {"host": host}, 200


class RegistrarClient:
    """What a host calls instead of creating and deleting its subscription itself (``registrar_url`` set)."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        self.url = url
        self.timeout_s = timeout_s

    def identity_token(self) -> str:
        """This VM's instance identity token for the registrar, with the instance's details (``format=full``).
        ``GCE_METADATA_HOST`` moves the metadata server (as google-auth reads it)."""
        import requests

        host = os.environ.get("GCE_METADATA_HOST") or METADATA_HOST
        answer = requests.get(
            f"http://{host}/computeMetadata/v1/instance/service-accounts/default/identity",
            params={"audience": self.url, "format": "full"}, headers={"Metadata-Flavor": "Google"},
            timeout=self.timeout_s)
        answer.raise_for_status()
        return answer.text

    def _call(self, method: str) -> dict[str, str]:
        import requests

        token = self.identity_token()
        # Authorization for the platform's invoker check (the hosts' account holds run.invoker), the same token in
        # IDENTITY_HEADER for the registrar itself.
        answer = requests.request(method, self.url, timeout=self.timeout_s,
                                  headers={"Authorization": f"Bearer {token}", IDENTITY_HEADER: token})
        if answer.status_code != 200:
            raise RuntimeError(f"host registrar {method} {self.url}: HTTP {answer.status_code} {answer.text[:200]}")
        return answer.json()

    def claim(self) -> str:
        """Have this host's subscription made (or reused); its path."""
        return self._call("PUT")["subscription"]

    def release(self) -> None:
        """Have this host's subscription deleted (a clean stop)."""
        self._call("DELETE")

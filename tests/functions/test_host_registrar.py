"""The host registrar (functions/host_registrar, iotbridge.bridge.registrar): a broker host's subscription made and
deleted on its behalf, for the host its instance identity token names and no other.

Tokens are signed here with a key of this test and verified by google-auth against that key's certificate, served
over HTTP as Google serves its own; nothing about the verification is stubbed. Subscriptions are made on the Pub/Sub
emulator. The emulator does not implement IAM (SetIamPolicy answers 501 Method not implemented), so the policy the
registrar sets is checked as the request it sends, recorded on its way to the emulator: that Pub/Sub applies it is
not proven here.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from werkzeug.serving import make_server

from iotbridge import spec
from iotbridge.bridge import fanout, registrar
from tests.admin.test_auth import _signer
from tests.bridge.conftest import PROJECT, create_topics

pytestmark = pytest.mark.emulator

FUNCTION = Path(__file__).resolve().parents[2] / "functions" / "host_registrar" / "main.py"
HOSTS = f"iot-bridge@{PROJECT}.iam.gserviceaccount.com"
AGENT = "serviceAccount:service-42@gcp-sa-pubsub.iam.gserviceaccount.com"
KID = "test-key-1"


class _Http:
    """A small HTTP server in a thread: ``answer(path, query, headers) -> (status, body)``."""

    def __init__(self, answer: Any) -> None:  # noqa: ANN401
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                status, body = answer(url.path, parse_qs(url.query), self.headers)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:  # noqa: ANN401
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Signer:
    """Google's part: a key that signs ID tokens and the URL its certificate is read from."""

    def __init__(self) -> None:
        self.key = _signer(KID)  # an RSA key and its self-signed certificate, as Google publishes its own
        self.certs = _Http(lambda path, query, headers: (200, json.dumps({KID: self.key.cert_pem})))
        self.certs_url = f"{self.certs.url}/oauth2/v1/certs"

    def token(self, audience: str, instance: str, **override: Any) -> str:  # noqa: ANN401
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com", "aud": audience, "azp": "1234", "sub": "1234",
            "email": HOSTS, "email_verified": True, "iat": now, "exp": now + 3600,
            "google": {"compute_engine": {"project_id": PROJECT, "project_number": 42, "zone": "europe-west1-b",
                                          "instance_id": "77", "instance_name": instance}}}
        claims.update(override)
        return jwt.encode(claims, self.key.key, algorithm="RS256", headers={"kid": KID})


@pytest.fixture(scope="module")
def google() -> Iterator[Signer]:
    signer = Signer()
    yield signer
    signer.certs.close()


def settings_for(google: Signer, prefix: str,
                 audience: str = "https://registrar.example") -> registrar.RegistrarSettings:
    return registrar.RegistrarSettings(project=PROJECT, prefix=prefix, audience=audience, hosts_account=HOSTS,
                                       pubsub_agent=AGENT, certs_url=google.certs_url)


def test_a_token_speaks_for_the_broker_host_it_names_and_nothing_else_passes(google):
    s = settings_for(google, "iot-dev")
    assert registrar.host_of(registrar.verify(google.token(s.audience, "iot-dev-broker-x1y2"), s), s) == (
        "iot-dev-broker-x1y2")
    other = Signer()  # a key Google does not sign with
    try:
        refused = {
            "no token": ("", 401),
            "another audience": (google.token("https://elsewhere.example", "iot-dev-broker-x1y2"), 401),
            "expired": (google.token(s.audience, "iot-dev-broker-x1y2", iat=int(time.time()) - 7200,
                                     exp=int(time.time()) - 3600), 401),
            "not Google's signature": (other.token(s.audience, "iot-dev-broker-x1y2"), 401),
            "not Google's issuer": (google.token(s.audience, "iot-dev-broker-x1y2", iss="https://evil.example"), 401),
            "another service account": (google.token(s.audience, "iot-dev-broker-x1y2",
                                                     email=f"other@{PROJECT}.iam.gserviceaccount.com"), 403),
            "email not verified": (google.token(s.audience, "iot-dev-broker-x1y2", email_verified=False), 403),
            "no instance details (format=standard)": (google.token(s.audience, "x", google={}), 403),
            "another project": (google.token(s.audience, "iot-dev-broker-x1y2", google={"compute_engine": {
                "project_id": "elsewhere", "instance_name": "iot-dev-broker-x1y2"}}), 403),
            "a VM outside the group": (google.token(s.audience, "iot-dev-bastion"), 403),
            "another stack's host": (google.token(s.audience, "iot-prod-broker-x1y2"), 403),
        }
        for why, (token, status) in refused.items():
            with pytest.raises(registrar.Refused) as caught:
                registrar.host_of(registrar.verify(token, s), s)
            assert caught.value.status == status, why
    finally:
        other.certs.close()


class RecordingIam:
    """The emulator's SubscriberClient, with the IAM policies it is asked to set recorded (the emulator answers
    SetIamPolicy with 501)."""

    def __init__(self) -> None:
        self.client = pubsub_v1.SubscriberClient()
        self.policies: dict[str, Any] = {}

    def set_iam_policy(self, request: dict[str, Any]) -> None:
        self.policies[request["resource"]] = request["policy"]

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        return getattr(self.client, name)


@pytest.fixture
def served(google, pubsub_emulator, emulator_env, monkeypatch) -> Iterator[tuple[str, str, RecordingIam]]:
    """The function on a local port (functions-framework's app, as deployed), its prefix and its IAM record."""
    import functions_framework

    emulator_env(pubsub_emulator)
    prefix = f"r{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    iam = RecordingIam()
    server = make_server("127.0.0.1", 0, functions_framework.create_app("handle", str(FUNCTION)))
    url = f"http://127.0.0.1:{server.server_port}"
    # create_app loaded main.py as a module of its own: the test's settings and subscriber go there.
    (main,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(FUNCTION)]
    monkeypatch.setattr(main, "subscriber", lambda: iam)
    monkeypatch.setattr(main, "_settings", lambda: settings_for(google, prefix, url))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield url, prefix, iam
    server.shutdown()


def test_a_host_claims_and_releases_its_subscription_through_the_registrar(google, served, monkeypatch):
    """A host's client (its identity from a metadata server that answers as GCE's does) against the function: the
    subscription is the one a host would make itself, and its policy names the hosts' account and Pub/Sub's agent
    as subscribers, and nothing else."""
    url, prefix, iam = served
    host = f"{prefix}-broker-ab12"
    asked: list[dict[str, list[str]]] = []

    def metadata(path: str, query: dict[str, list[str]], headers: Any) -> tuple[int, str]:  # noqa: ANN401
        if headers.get("Metadata-Flavor") != "Google":
            return 403, "missing Metadata-Flavor"
        asked.append(query)
        assert path == "/computeMetadata/v1/instance/service-accounts/default/identity"
        return 200, google.token(query["audience"][0], host)

    server = _Http(metadata)
    try:
        monkeypatch.setenv("GCE_METADATA_HOST", server.url.removeprefix("http://"))
        client = registrar.RegistrarClient(url)
        path = client.claim()
        assert asked[0] == {"audience": [url], "format": ["full"]}
        assert path == f"projects/{PROJECT}/subscriptions/{fanout.host_subscription(prefix, host)}"
        got = iam.client.get_subscription(request={"subscription": path})
        assert got.filter == spec.host_filter(host) and got.dead_letter_policy.max_delivery_attempts == 10
        assert iam.policies == {path: {"bindings": [{"role": "roles/pubsub.subscriber",
                                                     "members": sorted([AGENT, f"serviceAccount:{HOSTS}"])}]}}
        assert client.claim() == path  # a restart reuses it
        client.release()
        with pytest.raises(gexc.NotFound):
            iam.client.get_subscription(request={"subscription": path})
    finally:
        server.close()


def test_the_registrar_answers_a_refusal_with_its_status_and_touches_nothing(google, served):
    import requests

    url, prefix, iam = served
    for method, headers, status in (
            ("PUT", {}, 401),
            ("PUT", {registrar.IDENTITY_HEADER: google.token(url, f"{prefix}-bastion")}, 403),
            ("DELETE", {registrar.IDENTITY_HEADER: google.token("https://elsewhere.example", f"{prefix}-broker-a")},
             401),
            ("POST", {registrar.IDENTITY_HEADER: google.token(url, f"{prefix}-broker-a")}, 405)):
        answer = requests.request(method, url, headers=headers, timeout=10)
        assert (answer.status_code, sorted(answer.json())) == (status, ["error"]), (method, answer.text)
    assert iam.policies == {}
    topic = fanout.topic_path(PROJECT, prefix)
    assert list(pubsub_v1.PublisherClient().list_topic_subscriptions(request={"topic": topic})) == []


def test_a_broker_host_with_a_registrar_url_has_its_subscription_made_and_deleted_there(
        google, served, firestore_emulator, pubsub_emulator, tmp_path):
    """The bridge service of a real host (Mosquitto, service, front on this machine) with ``registrar_url``: its
    subscription is made by the registrar, under the registrar's IAM policy, and deleted there at a clean stop."""
    from iotbridge.local import services
    from iotbridge.local.broker_host import start_bridge_stack
    from tests.bridge.conftest import REGION, REGISTRY
    from tests.waiting import wait_for

    url, prefix, iam = served
    host = f"{prefix}-broker-h0st"
    server = _Http(lambda path, query, headers: (200, google.token(query["audience"][0], host)))
    env = {**pubsub_emulator.env, **firestore_emulator.env, "GCE_METADATA_HOST": server.url.removeprefix("http://")}
    path = f"projects/{PROJECT}/subscriptions/{fanout.host_subscription(prefix, host)}"
    try:
        try:
            stack = start_bridge_stack(tmp_path / "host", PROJECT, REGION, REGISTRY, prefix, env, host_id=host,
                                       registrar_url=url)
        except services.MissingPrerequisite as exc:
            pytest.fail(f"prerequisite missing: {exc}", pytrace=False)
        try:
            wait_for("the registrar to make the host's subscription", lambda: path in iam.policies, timeout=30)
            assert iam.client.get_subscription(request={"subscription": path}).filter == spec.host_filter(host)
        finally:
            stack.stop()
        with pytest.raises(gexc.NotFound):
            iam.client.get_subscription(request={"subscription": path})
    finally:
        server.close()


def test_a_pull_refused_again_and_again_is_retried_backing_off_to_a_minute():
    """A subscriber grant the registrar just set may not apply yet: each pull is refused (PermissionDenied ends the
    stream) and the host makes its subscription again. It waits longer each time, up to RESUBSCRIBE_MAX_S, instead
    of calling the registrar every second; a message arriving resets the wait. (The bridge service in-process, its
    Pub/Sub and registrar calls stood in for: what is measured is the waits it chooses.)"""
    from iotbridge.bridge import service as svc_mod
    from iotbridge.bridge.settings import BridgeSettings

    class Ended:
        def cancelled(self) -> bool:
            return False

        def exception(self) -> BaseException:
            return gexc.PermissionDenied("User not authorized to perform this action.")

    waits: list[float] = []
    made_again = threading.Semaphore(0)

    class Stop:
        def is_set(self) -> bool:
            return False

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return False

    class NoPubSub:
        api = type("Api", (), {"publish": None})()  # the publisher's raw API: nothing is published here

        def topic_path(self, project: str, topic: str) -> str:
            return f"projects/{project}/topics/{topic}"

    bridge = svc_mod.BridgeService(BridgeSettings(project="p", region="r", registry_id="reg", prefix="pre"),
                                   registry=None, password="x", publisher=cast(Any, NoPubSub()),
                                   subscriber=cast(Any, NoPubSub()))
    try:
        bridge._stop = Stop()  # type: ignore[assignment]
        bridge._claim_delivery = made_again.release  # type: ignore[method-assign]
        bridge._subscribe = lambda: None  # type: ignore[method-assign]
        for _ in range(9):
            bridge._pull_ended(Ended())
            assert made_again.acquire(timeout=10)
        assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
        bridge._on_fanout(type("Message", (), {"attributes": {}, "ack": lambda self: None})())
        bridge._pull_ended(Ended())
        assert made_again.acquire(timeout=10) and waits[-1] == 0.0
    finally:
        bridge.batcher.stop()

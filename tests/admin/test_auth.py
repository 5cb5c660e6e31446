"""The admin API's authentication (iotbridge/admin/auth.py) against stand-ins of Google's token endpoints.

Google is unreachable here, so a loopback HTTP server plays both endpoints the service calls: tokeninfo (answering
with the documented shapes: every field a string on success, HTTP 400 with ``invalid_token`` for an unknown or
expired token) and the certificate list ID tokens are verified against (``{kid: PEM certificate}``, the format of
``https://www.googleapis.com/oauth2/v1/certs``). The ID tokens are real RS256 JWTs signed by a key made here and
verified by google-auth itself; only the certificate URL differs.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from iotbridge.admin import auth
from iotbridge.admin.errors import ApiError

CLOUD = "https://www.googleapis.com/auth/cloud-platform"
CLOUDIOT = "https://www.googleapis.com/auth/cloudiot"
EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email"
SERVICE_URL = "https://iot-dev-admin-api-123456789012.europe-west1.run.app"
OPERATOR = "ops@example.com"
VIEWER = "viewer@example.com"
ROBOT = "provisioner@my-project.iam.gserviceaccount.com"


@dataclass
class GoogleStandIn:
    """tokeninfo and the certificate list, served on loopback; ``tokens`` maps an access token to its info."""

    url: str = ""
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)
    certs: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # paths asked for, query strings left out
    fail_with: int | None = None  # answer every request with this status
    certs_cache_control: str = ""  # the Cache-Control header of the certificate list, when set

    @property
    def tokeninfo_url(self) -> str:
        return f"{self.url}/tokeninfo"

    @property
    def certs_url(self) -> str:
        return f"{self.url}/oauth2/v1/certs"

    def access_token(self, email: str | None, scopes: tuple[str, ...] = (CLOUD, EMAIL_SCOPE),
                     expires_in: int = 3599, verified: bool = True) -> str:
        """A new opaque token and the answer Google's tokeninfo gives for it."""
        token = f"ya29.{uuid.uuid4().hex}{uuid.uuid4().hex}"
        info = {"azp": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
                "aud": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
                "sub": "110248495921238986420", "scope": " ".join(scopes),
                "exp": str(int(time.time()) + expires_in), "expires_in": str(expires_in), "access_type": "offline"}
        if email is not None:
            info.update(email=email, email_verified="true" if verified else "false")
        self.tokens[token] = info
        return token


class _Server(ThreadingHTTPServer):
    standin: GoogleStandIn


@dataclass(frozen=True)
class _Request:
    """What the app's ``authorize(request, writes)`` hook reads of a request."""

    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    """tokeninfo takes the token as ``?access_token=``, as a form field or in the Authorization header (the way
    Google's Node.js auth library sends it); the certificate list is a GET."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _answer(self, body: bytes) -> None:
        assert isinstance(self.server, _Server)
        standin = self.server.standin
        url = urlparse(self.path)
        standin.requests.append(url.path)
        if standin.fail_with is not None:
            return self._send(standin.fail_with, {"error": "backendError"})
        if url.path == "/oauth2/v1/certs":
            extra = {"Cache-Control": standin.certs_cache_control} if standin.certs_cache_control else {}
            return self._send(200, standin.certs, extra)
        if url.path == "/tokeninfo":
            fields = {**parse_qs(url.query), **parse_qs(body.decode())}
            header = self.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ") if header else fields.get("access_token", [""])[0]
            info = standin.tokens.get(token)
            if info is None or int(info["expires_in"]) <= 0:
                return self._send(400, {"error": "invalid_token", "error_description": "Invalid Value"})
            return self._send(200, info)
        self._send(404, {})

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture
def google() -> Iterator[GoogleStandIn]:
    server = _Server(("127.0.0.1", 0), _Handler)
    standin = GoogleStandIn(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.standin = standin  # read by the handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield standin
    server.shutdown()
    server.server_close()


@dataclass(frozen=True)
class Signer:
    """An RSA key and its self-signed certificate, as Google publishes its ID-token signing keys."""

    kid: str
    key: rsa.RSAPrivateKey
    cert_pem: str

    def id_token(self, email: str, audience: str = SERVICE_URL, issuer: str = "https://accounts.google.com",
                 lifetime_s: int = 3600, verified: bool = True, issued_ago_s: int = 0) -> str:
        now = int(time.time()) - issued_ago_s
        claims = {"iss": issuer, "aud": audience, "azp": "1234", "sub": "1234", "email": email,
                  "email_verified": verified, "iat": now, "exp": now + lifetime_s}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def _signer(kid: str) -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-id-token-signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    return Signer(kid, key, cert.public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture(scope="module")
def signer() -> Signer:
    return _signer("test-kid-1")


def _authorizer(google: GoogleStandIn, signer: Signer | None = None, clock=time.time, readers=(VIEWER,),
                writers=(f"user:{OPERATOR}", f"serviceAccount:{ROBOT}")) -> auth.GoogleAuthorizer:
    if signer is not None:
        google.certs[signer.kid] = signer.cert_pem
    env = {auth.ENV_READERS: json.dumps([f"user:{r}" for r in readers]), auth.ENV_WRITERS: json.dumps(list(writers)),
           auth.ENV_TOKENINFO_URL: google.tokeninfo_url, auth.ENV_CERTS_URL: google.certs_url,
           auth.ENV_AUDIENCES: json.dumps([SERVICE_URL])}
    authorizer = auth.authorizer_from_env(env)
    assert isinstance(authorizer, auth.GoogleAuthorizer)
    authorizer.verifier.clock = clock
    return authorizer


def _refused(call, code: int, *words: str) -> auth.AuthError:
    with pytest.raises(auth.AuthError) as caught:
        call()
    err = caught.value
    assert isinstance(err, ApiError)  # the app answers it as every error of Google's model, with its HTTP code
    assert err.code == code, err.message
    status = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 503: "UNAVAILABLE"}[code]
    assert err.body() == {"error": {"code": code, "message": err.message, "status": status}}
    for word in words:
        assert word in err.message
    return err


# ------------------------------------------------------------------------------------------ access tokens


def test_an_operator_with_default_credentials_may_write(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    token = google.access_token(OPERATOR)
    identity = authorize.check(f"Bearer {token}", writes=True)
    assert (identity.member, identity.via) == (f"user:{OPERATOR}", "access_token")
    assert google.requests == ["/tokeninfo"]


def test_a_service_account_token_with_the_cloudiot_scope_may_write(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    identity = authorize.check(f"Bearer {google.access_token(ROBOT, scopes=(CLOUDIOT, EMAIL_SCOPE))}", writes=True)
    assert identity.member == f"serviceAccount:{ROBOT}"


def test_a_reader_may_read_but_not_write(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    header = f"Bearer {google.access_token(VIEWER)}"
    assert authorize.check(header, writes=False).email == VIEWER
    err = _refused(lambda: authorize.check(header, writes=True), 403, f"user:{VIEWER} may read but not write")
    assert err.body() == {"error": {"code": 403, "message": err.message, "status": "PERMISSION_DENIED"}}


def test_an_unknown_member_is_refused_reading_too(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    header = f"Bearer {google.access_token('stranger@example.org')}"
    _refused(lambda: authorize.check(header, writes=False), 403, "user:stranger@example.org is not in adminApiReaders")


def test_a_domain_member_admits_the_domains_users_but_not_its_service_accounts(google: GoogleStandIn) -> None:
    authorize = _authorizer(google, readers=(), writers=("domain:example.com",))
    assert authorize.check(f"Bearer {google.access_token('anyone@example.com')}", writes=True).kind == "user"
    robot = "bot@example.com.iam.gserviceaccount.com"
    header = f"Bearer {google.access_token(robot)}"
    _refused(lambda: authorize.check(header, writes=False), 403, "not in adminApiReaders")


def test_a_token_without_a_cloud_scope_is_refused(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    header = f"Bearer {google.access_token(OPERATOR, scopes=(EMAIL_SCOPE, 'https://www.googleapis.com/auth/drive'))}"
    for _ in range(3):
        _refused(lambda: authorize.check(header, writes=False), 403, "insufficient authentication scopes", CLOUDIOT)
    assert authorize.verifier.lookups == 1  # the refusal is remembered: tokeninfo is asked once


def test_a_token_without_its_email_is_refused_with_the_scope_to_ask_for(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    _refused(lambda: authorize.check(f"Bearer {google.access_token(None)}", writes=False), 401, "userinfo.email")
    unverified = google.access_token(OPERATOR, verified=False)
    _refused(lambda: authorize.check(f"Bearer {unverified}", writes=False), 401, "not verified")


def test_an_expired_or_unknown_access_token_is_unauthenticated(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    expired = google.access_token(OPERATOR, expires_in=0)
    _refused(lambda: authorize.check(f"Bearer {expired}", writes=False), 401, "invalid or has expired")
    _refused(lambda: authorize.check("Bearer ya29.not-a-token-google-issued", writes=False), 401)


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
def test_a_missing_or_malformed_header_is_unauthenticated(google: GoogleStandIn, header: str | None) -> None:
    authorize = _authorizer(google)
    err = _refused(lambda: authorize.check(header, writes=False), 401)
    assert err.headers()["WWW-Authenticate"].startswith("Bearer")
    assert google.requests == []  # refused before Google is asked


def test_verified_tokens_are_cached_until_the_cache_window_or_the_token_ends(google: GoogleStandIn, clock) -> None:
    offset = [0.0]
    authorize = _authorizer(google, clock=lambda: clock.time() + offset[0])
    long_lived = f"Bearer {google.access_token(OPERATOR, expires_in=3599)}"
    short_lived = f"Bearer {google.access_token(OPERATOR, expires_in=60)}"
    for _ in range(3):
        authorize.check(long_lived, writes=True)
        authorize.check(short_lived, writes=True)
    assert authorize.verifier.lookups == 2
    offset[0] = 61  # the short-lived token has expired (Google now refuses it); the other is still cached
    google.tokens[short_lived.removeprefix("Bearer ")]["expires_in"] = "0"
    _refused(lambda: authorize.check(short_lived, writes=True), 401, "expired")
    authorize.check(long_lived, writes=True)
    assert authorize.verifier.lookups == 3  # the expired token was asked for again (and refused), not the other
    offset[0] = auth.CACHE_SECONDS + 1  # past the cache window: asked again, so a revoked token stops working
    authorize.check(long_lived, writes=True)
    assert authorize.verifier.lookups == 4


def test_a_refused_token_is_remembered_briefly(google: GoogleStandIn, clock) -> None:
    offset = [0.0]
    authorize = _authorizer(google, clock=lambda: clock.time() + offset[0])
    for _ in range(5):
        _refused(lambda: authorize.check("Bearer ya29.bogus", writes=False), 401)
    assert authorize.verifier.lookups == 1
    offset[0] = auth.NEGATIVE_CACHE_SECONDS + 1
    _refused(lambda: authorize.check("Bearer ya29.bogus", writes=False), 401)
    assert authorize.verifier.lookups == 2


def test_the_cache_is_bounded(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    authorize.verifier = auth.Verifier(tokeninfo_url=google.tokeninfo_url, cache_size=4)
    tokens = [google.access_token(OPERATOR) for _ in range(10)]
    for token in tokens:
        authorize.check(f"Bearer {token}", writes=True)
    assert len(authorize.verifier._cache) == 4


def test_an_unreachable_token_endpoint_is_unavailable_and_not_remembered(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    token = google.access_token(OPERATOR)
    google.fail_with = 500
    _refused(lambda: authorize.check(f"Bearer {token}", writes=False), 503, "HTTP 500")
    google.fail_with = None
    assert authorize.check(f"Bearer {token}", writes=False).email == OPERATOR
    authorize.verifier.tokeninfo_url = "http://127.0.0.1:9/tokeninfo"  # nothing listens on the discard port
    _refused(lambda: authorize.check(f"Bearer {google.access_token(OPERATOR)}", writes=False), 503, "did not answer")


def test_no_token_reaches_a_log_line_or_an_error(google: GoogleStandIn, caplog: pytest.LogCaptureFixture) -> None:
    authorize = _authorizer(google)
    caplog.set_level(logging.DEBUG)
    tokens = [google.access_token("stranger@example.org"), google.access_token(OPERATOR, expires_in=0),
              "ya29.bogus-secret-value"]
    messages = []
    for token in tokens:
        with pytest.raises(auth.AuthError) as caught:
            authorize.check(f"Bearer {token}", writes=True)
        messages.append(caught.value.message)
    authorize.verifier.tokeninfo_url = "http://127.0.0.1:9/tokeninfo"
    with pytest.raises(auth.AuthError) as caught:
        authorize.check("Bearer ya29.another-secret-value", writes=True)
    messages.append(caught.value.message)
    text = caplog.text + "\n".join(messages)
    assert "sha256:" in caplog.text  # refusals are logged, by the token's hash
    for token in [*tokens, "ya29.another-secret-value"]:
        assert token not in text
        assert token not in repr(authorize.verifier._cache)


# ---------------------------------------------------------------------------------------------- ID tokens


def test_an_id_token_for_the_service_url_is_verified_with_google_auth(google: GoogleStandIn, signer: Signer) -> None:
    authorize = _authorizer(google, signer)
    identity = authorize.check(f"Bearer {signer.id_token(ROBOT)}", writes=True)
    assert (identity.member, identity.via, identity.audience) == (f"serviceAccount:{ROBOT}", "id_token", SERVICE_URL)
    assert google.requests == ["/oauth2/v1/certs"]


def test_an_id_token_for_the_host_the_request_reached_is_accepted(google: GoogleStandIn, signer: Signer) -> None:
    authorize = _authorizer(google, signer)
    custom = "https://iot-admin.example.com"
    token = signer.id_token(OPERATOR, audience=custom)
    # The app's hook: the request's Authorization and Host headers; it returns to allow and raises to refuse.
    authorize(_Request(headers={"Authorization": f"Bearer {token}", "Host": "iot-admin.example.com"}), True)
    elsewhere = _Request(headers={"Authorization": f"Bearer {token}", "Host": "other.example.com"})
    _refused(lambda: authorize(elsewhere, True), 401, "audience")
    _refused(lambda: authorize(_Request(headers={"Host": "iot-admin.example.com"}), False), 401, "missing")


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"issued_ago_s": 7200, "lifetime_s": 3600}, ("expired",)),
    ({"audience": "https://someone-else.run.app"}, ("audience",)),
    ({"issuer": "https://evil.example.com"}, ("not issued by Google",)),
    ({"verified": False}, ("not verified",)),
])
def test_a_bad_id_token_is_unauthenticated(google: GoogleStandIn, signer: Signer, kwargs: dict,
                                           words: tuple[str, ...]) -> None:
    authorize = _authorizer(google, signer)
    token = signer.id_token(OPERATOR, **kwargs)
    _refused(lambda: authorize.check(f"Bearer {token}", writes=False), 401, *words)


def test_an_id_token_signed_by_another_key_is_unauthenticated(google: GoogleStandIn, signer: Signer) -> None:
    authorize = _authorizer(google, signer)
    forger = _signer(signer.kid)  # same key id, a key Google never published
    _refused(lambda: authorize.check(f"Bearer {forger.id_token(OPERATOR)}", writes=False), 401, "ID token was refused")


def test_the_certificates_are_fetched_once_for_many_id_tokens(google: GoogleStandIn, signer: Signer) -> None:
    # The ID tokens' times are real (google-auth checks them against the real time), so is the verifier's clock.
    offset = [0.0]
    authorize = _authorizer(google, signer, clock=lambda: time.time() + offset[0])
    for i, email in enumerate((OPERATOR, ROBOT, VIEWER) * 4):  # 12 different tokens, each verified by signature
        authorize.check(f"Bearer {signer.id_token(email, issued_ago_s=i)}", writes=False)
    assert authorize.verifier.lookups == 12
    assert google.requests.count("/oauth2/v1/certs") == 1
    # Tokens naming a key Google has not published refetch the list at most once a minute, whatever their number.
    stranger = _signer("unknown-kid")
    _refused(lambda: authorize.check(f"Bearer {stranger.id_token(OPERATOR)}", writes=False), 401, "refused")
    assert google.requests.count("/oauth2/v1/certs") == 1  # fetched less than a minute ago: not again
    offset[0] = auth.CERTS_REFETCH_SECONDS + 1
    for _ in range(20):
        _refused(lambda: authorize.check(f"Bearer {stranger.id_token(OPERATOR)}", writes=False), 401, "refused")
    assert google.requests.count("/oauth2/v1/certs") == 2
    offset[0] = 2 * (auth.CERTS_REFETCH_SECONDS + 1)
    rotated = _signer("rotated-kid")  # Google published a new key: the next token naming it refetches the list
    google.certs[rotated.kid] = rotated.cert_pem
    authorize.check(f"Bearer {rotated.id_token(OPERATOR)}", writes=False)
    assert google.requests.count("/oauth2/v1/certs") == 3
    offset[0] += auth.CERTS_SECONDS + 1  # the list fetched last has aged out (the stand-in sends no Cache-Control)
    authorize.check(f"Bearer {signer.id_token(OPERATOR, lifetime_s=3 * 3600)}", writes=False)
    assert google.requests.count("/oauth2/v1/certs") == 4


def test_the_certificates_are_kept_for_their_max_age(google: GoogleStandIn, signer: Signer) -> None:
    google.certs_cache_control = "public, max-age=120, must-revalidate, no-transform"  # Google's header, shorter
    offset = [0.0]
    authorize = _authorizer(google, signer, clock=lambda: time.time() + offset[0])
    authorize.check(f"Bearer {signer.id_token(OPERATOR)}", writes=False)
    offset[0] = 100
    authorize.check(f"Bearer {signer.id_token(OPERATOR, issued_ago_s=1)}", writes=False)
    assert google.requests.count("/oauth2/v1/certs") == 1
    offset[0] = 121
    authorize.check(f"Bearer {signer.id_token(OPERATOR, issued_ago_s=2)}", writes=False)
    assert google.requests.count("/oauth2/v1/certs") == 2


def test_refused_tokens_do_not_evict_verified_callers(google: GoogleStandIn, signer: Signer) -> None:
    authorize = _authorizer(google, signer)
    authorize.verifier = auth.Verifier(tokeninfo_url=google.tokeninfo_url, certs_url=google.certs_url, cache_size=4)
    good = f"Bearer {google.access_token(OPERATOR)}"
    authorize.check(good, writes=True)
    garbage = [f"Bearer eyJ{uuid.uuid4().hex}.{uuid.uuid4().hex}.{uuid.uuid4().hex}" for _ in range(50)]
    garbage += [f"Bearer ya29.{uuid.uuid4().hex}" for _ in range(50)]
    for header in garbage:
        _refused(lambda header=header: authorize.check(header, writes=False), 401)
    assert google.requests.count("/oauth2/v1/certs") == 0  # a token that is not a JWT costs no fetch
    asked = google.requests.count("/tokeninfo")
    authorize.check(good, writes=True)
    assert google.requests.count("/tokeninfo") == asked  # still cached: the refusals did not push it out
    assert len(authorize.verifier._refused) == 4  # and they are bounded too


def test_the_hook_says_whether_the_caller_may_write(google: GoogleStandIn) -> None:
    authorize = _authorizer(google)
    reader = _Request(headers={"Authorization": f"Bearer {google.access_token(VIEWER)}"})
    writer = _Request(headers={"Authorization": f"Bearer {google.access_token(OPERATOR)}"})
    assert authorize(reader, False) is False  # allowed to read, told it may not write (testIamPermissions)
    assert authorize(writer, False) is True
    assert auth.accept_any(reader, False) is True  # locally everyone may write


def test_an_id_token_of_a_reader_may_not_write(google: GoogleStandIn, signer: Signer) -> None:
    authorize = _authorizer(google, signer)
    _refused(lambda: authorize.check(f"Bearer {signer.id_token(VIEWER)}", writes=True), 403, "may read but not write")


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(("member", "why"), [
    ("group:ops@example.com", "group membership cannot be resolved"),
    ("allUsers", "not user:EMAIL"),
    ("user:ops", "needs an email address"),
    ("role:roles/owner", "not user:EMAIL"),
])
def test_members_are_validated(member: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        auth.Members.parse([member], [])


def test_local_mode_accepts_any_credentials_and_the_default_fails_closed(google: GoogleStandIn) -> None:
    local = auth.authorizer_from_env({auth.ENV_MODE: "none"})
    assert local is auth.accept_any
    local(_Request(headers={}), True)
    local(_Request(headers={"Authorization": "Bearer anything"}), True)
    assert google.requests == []
    closed = auth.authorizer_from_env({auth.ENV_TOKENINFO_URL: google.tokeninfo_url})
    assert isinstance(closed, auth.GoogleAuthorizer)
    header = f"Bearer {google.access_token(OPERATOR)}"
    _refused(lambda: closed.check(header, writes=False), 403, "not in adminApiReaders")
    with pytest.raises(ValueError, match="must be 'google' or 'none'"):
        auth.authorizer_from_env({auth.ENV_MODE: "off"})

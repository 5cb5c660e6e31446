"""Who may call the deployed admin API, checked by the service itself (docs/admin-api-auth.md).

Google's client libraries send the caller's OAuth2 *access token* (``Authorization: Bearer ya29...``). Cloud Run's
own invoker check accepts only an *ID token* minted for the service's URL, so an unmodified client with default
credentials would be turned away before our code ran. The service is therefore public at the Cloud Run level and
checks every request here:

1. **Authentication.** A bearer token that is a JWT is an ID token: its signature is checked against Google's
   certificates (google-auth's ``jwt.decode``; the certificate list is fetched once and kept for its Cache-Control
   ``max-age``, and a token naming an unknown key refetches it at most once a minute), its issuer must be Google,
   its audience one of the service's URLs, and its email verified. Any other bearer token is an access token, looked
   up at Google's tokeninfo endpoint (``https://oauth2.googleapis.com/tokeninfo``), which answers 400 for an
   unknown, revoked or expired token and otherwise with the token's ``email``, ``email_verified``, ``expires_in``
   (seconds left), ``scope`` (space-separated) and ``aud``/``azp`` (the OAuth client it was issued to; any client
   may call us). It is asked the way Google's Node.js auth library asks it, a POST with the token in the
   ``Authorization`` header, rather than ``?access_token=`` in the URL: HTTP libraries log URLs (urllib3 does at
   DEBUG), so the token would reach logs. The token must carry a scope that lets it call IoT Core
   (``cloud-platform`` or ``cloudiot``, as ``cloudiot.v1.json`` lists), and its email, which it carries when the
   ``userinfo.email`` scope was granted: ``gcloud auth application-default login`` and the metadata server of
   Google's runtimes grant it.
2. **Authorization.** The caller's email is matched against the members the stack declares (``adminApiReaders``,
   ``adminApiWriters``): ``user:EMAIL``, ``serviceAccount:EMAIL`` or ``domain:DOMAIN`` (every user account of that
   domain, not service accounts, as in IAM). A writer may also read. ``group:`` members are refused: deciding
   membership would need the Cloud Identity Groups API with a Workspace role granted to the service's account,
   which a project deployment cannot grant itself; list the members or use ``domain:``.

Verified identities are cached, keyed on the SHA-256 of the token (the token itself is never stored, logged or
echoed), for at most ``CACHE_SECONDS`` and never past the token's expiry; the cache holds ``CACHE_SIZE`` entries.
A token refused (Google does not know it, or it lacks a scope or an email) is remembered as refused for
``NEGATIVE_CACHE_SECONDS`` in a cache of its own (so a flood of refused tokens cannot evict verified callers),
and a client retrying a bad token does not hammer tokeninfo; an outage of Google's endpoints is not remembered.

Errors follow Google's error model: 401 ``UNAUTHENTICATED`` (no, malformed, unknown or expired credentials), 403
``PERMISSION_DENIED`` (insufficient scope, not a member, a reader writing), 503 ``UNAVAILABLE`` (Google's token
endpoints could not be reached: the request may be retried).

Configured from the environment (``authorizer_from_env``, which ``python -m iotbridge.admin`` calls with
``ADMIN_AUTH=google``). The result is the app's ``authorize(request, writes)`` hook (``iotbridge.admin.app``); its
``check(authorization, writes, audiences)`` is the same decision over plain values. Locally, ``ADMIN_AUTH=none``
accepts any credentials, as Google's emulators do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cachetools
import google.auth.exceptions
import google.auth.jwt
import requests

from iotbridge.admin.errors import ApiError

log = logging.getLogger(__name__)

TOKENINFO_URL = "https://oauth2.googleapis.com/tokeninfo"
CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"  # the certificates Google signs ID tokens with
ID_TOKEN_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
# The scopes of cloudiot.v1.json: a token with either may call IoT Core's API, so it may call ours.
SCOPES = frozenset({"https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudiot"})
CACHE_SIZE = 1024
CACHE_SECONDS = 300.0  # a revoked token stops working within this long
NEGATIVE_CACHE_SECONDS = 30.0
CERTS_SECONDS = 3600.0  # how long Google's certificates are kept when its answer names no Cache-Control max-age
CERTS_REFETCH_SECONDS = 60.0  # a token naming a key not in the kept set refetches them at most this often
HTTP_TIMEOUT_S = 5.0

# Environment of the service (gcp_iot_bridge/infra/admin_api.py sets it).
ENV_MODE = "ADMIN_AUTH"  # "google" (verify every request; also when unset) or "none" (local: accept anything)
ENV_READERS = "ADMIN_READERS"  # JSON list of members
ENV_WRITERS = "ADMIN_WRITERS"
ENV_AUDIENCES = "ADMIN_AUDIENCES"  # JSON list: the service URLs an ID token may be minted for
ENV_TOKENINFO_URL = "ADMIN_TOKENINFO_URL"
ENV_CERTS_URL = "ADMIN_CERTS_URL"

MEMBER_RE = re.compile(r"^(user|serviceAccount|domain):[^\s:,]+$")
MEMBER_KINDS = "user:EMAIL, serviceAccount:EMAIL or domain:DOMAIN"
_SERVICE_ACCOUNT_DOMAIN = ".gserviceaccount.com"


_STATUS = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 503: "UNAVAILABLE"}


class AuthError(ApiError):
    """A refused request, in Google's error model (the app answers it as it answers every ``ApiError``)."""

    def __init__(self, code: Literal[401, 403, 503], message: str):
        super().__init__(_STATUS[code], message)

    def headers(self) -> dict[str, str]:
        """What Google's APIs send with a 401 (RFC 6750)."""
        return {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'} if self.code == 401 else {}


@dataclass(frozen=True)
class Identity:
    email: str  # lower-case
    kind: Literal["user", "serviceAccount", "anonymous"]
    expires_at: float  # epoch seconds: when the token stops being valid
    via: Literal["access_token", "id_token", "none"]
    audience: str = ""  # an ID token's audience

    @property
    def member(self) -> str:
        return f"{self.kind}:{self.email}"


def parse_members(members: Collection[str], key: str) -> frozenset[str]:
    """Validated IAM member strings; a ``ValueError`` naming ``key`` and the bad member otherwise."""
    out = set()
    for member in members:
        if not isinstance(member, str) or not MEMBER_RE.match(member):
            why = ("group membership cannot be resolved by the service (see docs/admin-api-auth.md)"
                   if isinstance(member, str) and member.startswith("group:") else f"not {MEMBER_KINDS}")
            raise ValueError(f"{key}: {member!r} is refused: {why}")
        kind, _, value = member.partition(":")
        if kind != "domain" and "@" not in value:
            raise ValueError(f"{key}: {member!r} is refused: {kind}: needs an email address")
        out.add(f"{kind}:{value.lower()}")
    return frozenset(out)


def _kind_of(email: str) -> Literal["user", "serviceAccount"]:
    return "serviceAccount" if email.endswith(_SERVICE_ACCOUNT_DOMAIN) else "user"


@dataclass(frozen=True)
class Members:
    """Who may read and who may write (writers may also read)."""

    readers: frozenset[str] = frozenset()
    writers: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, readers: Collection[str], writers: Collection[str]) -> Members:
        return cls(parse_members(readers, "adminApiReaders"), parse_members(writers, "adminApiWriters"))

    @staticmethod
    def _matches(identity: Identity, members: frozenset[str]) -> bool:
        if identity.member in members:
            return True
        domain = identity.email.rpartition("@")[2]
        return identity.kind == "user" and f"domain:{domain}" in members

    def allows(self, identity: Identity, writes: bool) -> bool:
        return self._matches(identity, self.writers) or (not writes and self._matches(identity, self.readers))


def token_digest(token: str) -> str:
    """What a log line or a cache may hold of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts) and token.startswith("eyJ")


class Verifier:
    """Bearer token -> ``Identity``, with a bounded cache keyed on the token's hash."""

    def __init__(self, *, tokeninfo_url: str = TOKENINFO_URL, certs_url: str = CERTS_URL,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.time,
                 cache_size: int = CACHE_SIZE, cache_seconds: float = CACHE_SECONDS,
                 negative_cache_seconds: float = NEGATIVE_CACHE_SECONDS, timeout_s: float = HTTP_TIMEOUT_S):
        self.tokeninfo_url = tokeninfo_url
        self.certs_url = certs_url
        self.session = session or requests.Session()
        self.clock = clock
        self.cache_seconds = cache_seconds
        self.negative_cache_seconds = negative_cache_seconds
        self.timeout_s = timeout_s
        self.lookups = 0  # tokens verified (tokeninfo asked, or an ID token's signature checked), for tests
        self.certs_fetches = 0  # times Google's certificate list was fetched
        self._lock = threading.Lock()
        # digest -> Identity, until min(expiry, now + cache_seconds).
        self._cache: cachetools.TLRUCache[str, Identity] = cachetools.TLRUCache(
            maxsize=cache_size, ttu=self._until, timer=lambda: self.clock())
        # digest -> AuthError for negative_cache_seconds: apart, so a flood of refused tokens cannot evict a
        # verified identity.
        self._refused: cachetools.TTLCache[str, AuthError] = cachetools.TTLCache(
            maxsize=cache_size, ttl=negative_cache_seconds, timer=lambda: self.clock())
        self._certs_lock = threading.Lock()  # one fetch at a time; the others wait and use its answer
        self._certs: dict[str, str] = {}
        self._certs_fetched_at = float("-inf")
        self._certs_until = float("-inf")

    def _until(self, _key: str, value: Identity, now: float) -> float:
        return min(value.expires_at, now + self.cache_seconds)

    def identify(self, token: str, audiences: Collection[str] = ()) -> Identity:
        digest = token_digest(token)
        with self._lock:
            refused = self._refused.get(digest)
            cached = self._cache.get(digest)
        if refused is not None:
            raise refused
        if cached is None:
            try:
                cached = self._verify_id_token(token) if _looks_like_jwt(token) else self._verify_access_token(token)
            except AuthError as exc:
                if exc.code != 503:  # Google's answer about this token, not an outage: remembered briefly
                    with self._lock:
                        self._refused[digest] = exc
                log.info("admin api: token sha256:%s refused: %s", digest[:12], exc.message)
                raise
            if cached.expires_at > self.clock():
                with self._lock:
                    self._cache[digest] = cached
        if cached.expires_at <= self.clock():
            raise AuthError(401, "Request had invalid authentication credentials: the token has expired.")
        if cached.via == "id_token" and cached.audience not in audiences:
            raise AuthError(401, f"Request had invalid authentication credentials: the ID token's audience "
                                 f"{cached.audience!r} is not this service's URL.")
        return cached

    # ------------------------------------------------------------------------------ access tokens

    def _verify_access_token(self, token: str) -> Identity:
        self.lookups += 1
        try:
            response = self.session.post(
                self.tokeninfo_url, timeout=self.timeout_s,
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8"})
        except requests.RequestException as exc:
            # Only the exception's class is reported: its text is the library's, which this code does not vouch for.
            raise AuthError(503, f"Could not verify the access token: the token endpoint did not answer "
                                 f"({type(exc).__name__}).") from None
        if response.status_code == 400:  # unknown, revoked or expired
            raise AuthError(401, "Request had invalid authentication credentials: the access token is invalid or "
                                 "has expired.")
        if response.status_code != 200:
            raise AuthError(503, f"Could not verify the access token: the token endpoint answered "
                                 f"HTTP {response.status_code}.")
        try:
            info = response.json()
            expires_in = float(info.get("expires_in", 0))
        except (ValueError, TypeError, AttributeError):
            raise AuthError(503, "Could not verify the access token: the token endpoint's answer is not JSON "
                                 "with expires_in.") from None
        if expires_in <= 0:
            raise AuthError(401, "Request had invalid authentication credentials: the access token has expired.")
        scopes = set(str(info.get("scope", "")).split())
        if not scopes & SCOPES:
            raise AuthError(403, "Request had insufficient authentication scopes: the token needs "
                                 f"{' or '.join(sorted(SCOPES))}.")
        email = _verified_email(info, "access token")
        return Identity(email=email, kind=_kind_of(email), expires_at=self.clock() + expires_in, via="access_token")

    # ---------------------------------------------------------------------------------- ID tokens

    def certificates(self, kid: str) -> dict[str, str]:
        """Google's ID-token certificates (``{kid: PEM}``), fetched once and kept for the answer's Cache-Control
        ``max-age`` (``CERTS_SECONDS`` without one); a ``kid`` not in the kept set refetches them, at most once per
        ``CERTS_REFETCH_SECONDS`` (Google publishes a new key before it signs with it)."""
        with self._certs_lock:
            now = self.clock()
            stale = now >= self._certs_until
            unknown = kid not in self._certs and now - self._certs_fetched_at >= CERTS_REFETCH_SECONDS
            if stale or unknown:
                self._fetch_certificates(now)
            return self._certs

    def _fetch_certificates(self, now: float) -> None:
        self.certs_fetches += 1
        try:
            response = self.session.get(self.certs_url, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise AuthError(503, f"Could not verify the ID token: Google's certificates could not be fetched "
                                 f"({type(exc).__name__}).") from None
        if response.status_code != 200:
            raise AuthError(503, f"Could not verify the ID token: Google's certificates could not be fetched "
                                 f"(HTTP {response.status_code}).")
        try:
            certs = response.json()
        except ValueError:
            certs = None
        if not isinstance(certs, dict) or not all(isinstance(v, str) for v in certs.values()):
            raise AuthError(503, "Could not verify the ID token: Google's certificate list is not {kid: PEM}.")
        max_age = re.search(r"(?:^|[,\s])max-age=(\d+)", response.headers.get("Cache-Control", ""))
        self._certs = {str(k): v for k, v in certs.items()}
        self._certs_fetched_at = now
        self._certs_until = now + (float(max_age.group(1)) if max_age else CERTS_SECONDS)

    def _verify_id_token(self, token: str) -> Identity:
        try:
            kid = google.auth.jwt.decode_header(token).get("kid")
        except (ValueError, TypeError, AttributeError):
            raise AuthError(401, "Request had invalid authentication credentials: the ID token is not a JWT.") \
                from None
        if not isinstance(kid, str):
            raise AuthError(401, "Request had invalid authentication credentials: the ID token names no key id.")
        certs = self.certificates(kid)  # before counting: an outage raises 503 without a verification
        self.lookups += 1
        try:
            # The audience is checked per request (identify), so one cached verification serves every call.
            claims = google.auth.jwt.decode(token, certs=certs, audience=None)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            # google-auth's messages name the failed check (expired, signature, ...) and never hold the token.
            reason = str(exc).split(",")[0][:120]
            raise AuthError(401, f"Request had invalid authentication credentials: the ID token was refused "
                                 f"({reason}).") from None
        if claims.get("iss") not in ID_TOKEN_ISSUERS:
            raise AuthError(401, "Request had invalid authentication credentials: the ID token was not issued by "
                                 "Google.")
        audience = claims.get("aud")
        email = _verified_email(claims, "ID token")
        return Identity(email=email, kind=_kind_of(email), expires_at=float(claims.get("exp", 0)), via="id_token",
                        audience=audience if isinstance(audience, str) else "")


def _verified_email(info: Mapping[str, Any], what: str) -> str:
    email = info.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise AuthError(401, f"Request had invalid authentication credentials: the {what} carries no email "
                             "address; request it with the userinfo.email scope.")
    if str(info.get("email_verified", "")).lower() != "true":
        raise AuthError(401, f"Request had invalid authentication credentials: the {what}'s email address is not "
                             "verified.")
    return email.lower()


class _Request(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


Authorize = Callable[[Any, bool], bool]  # the app's hook: (request, writes) -> may write; raises ApiError to refuse


def request_audiences(headers: Mapping[str, str]) -> set[str]:
    """The URL the caller reached: on Cloud Run the Host header routes the request, so it names this service
    (its run.app URL or a custom domain mapped to it), the audience an ID token for the service carries."""
    host = headers.get("Host") or headers.get("host")
    return {f"https://{host}"} if host else set()


@dataclass
class GoogleAuthorizer:
    """Verifies the bearer token, then checks the caller against the stack's members."""

    members: Members
    verifier: Verifier
    audiences: frozenset[str] = frozenset()  # service URLs an ID token may name, besides the request's own

    def __call__(self, request: _Request, writes: bool) -> bool:
        """The app's ``authorize(request, writes)`` hook over any request object with ``headers``: whether the
        allowed caller may also write (``testIamPermissions`` answers from it)."""
        headers = request.headers
        identity = self.check(headers.get("Authorization") or headers.get("authorization"), writes,
                              request_audiences(headers))
        log.debug("admin api: %s allowed (writes=%s)", identity.member, writes)
        return self.members.allows(identity, writes=True)

    def check(self, authorization: str | None, writes: bool, audiences: Collection[str] = ()) -> Identity:
        """The caller of an ``Authorization`` header value, if it may make a call that ``writes`` (or reads)."""
        token = bearer_token(authorization)
        identity = self.verifier.identify(token, self.audiences | set(audiences))
        if not self.members.allows(identity, writes):
            readable = self.members.allows(identity, writes=False)
            raise AuthError(403, f"Permission denied: {identity.member} may read but not write (adminApiWriters)."
                            if readable else
                            f"Permission denied: {identity.member} is not in adminApiReaders or adminApiWriters.")
        return identity


def accept_any(_request: object, _writes: bool) -> bool:
    """Local mode: any credentials, or none, as Google's emulators accept; every caller may write."""
    return True


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(401, "Request is missing required authentication credential. Expected OAuth 2 access "
                             "token, login cookie or other valid authentication credential.")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError(401, "Request had invalid authentication credentials: expected an Authorization header "
                             "of the form 'Bearer TOKEN'.")
    return token


def _members_env(environ: Mapping[str, str], name: str) -> list[str]:
    text = environ.get(name, "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{name} is not a JSON list of members") from None
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a JSON list of members")
    return value


def authorizer_from_env(environ: Mapping[str, str], session: requests.Session | None = None) -> Authorize:
    """The authorizer the service's environment asks for; ``ValueError`` (one line) on a bad setting.

    Without ``ADMIN_AUTH`` every request is verified and, with no members set, refused: the service
    fails closed.
    """
    mode = environ.get(ENV_MODE, "google")
    if mode == "none":
        return accept_any
    if mode != "google":
        raise ValueError(f"{ENV_MODE}={mode!r}: must be 'google' or 'none'")
    members = Members.parse(_members_env(environ, ENV_READERS), _members_env(environ, ENV_WRITERS))
    audiences = frozenset(_members_env(environ, ENV_AUDIENCES))
    verifier = Verifier(tokeninfo_url=environ.get(ENV_TOKENINFO_URL) or TOKENINFO_URL,
                        certs_url=environ.get(ENV_CERTS_URL) or CERTS_URL, session=session)
    return GoogleAuthorizer(members=members, verifier=verifier, audiences=audiences)


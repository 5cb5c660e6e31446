"""Device authentication the way Cloud IoT Core did it (docs/device-protocol.md): client id path + JWT password.

``verify_jwt`` checks a password against a device's registered credentials; ``parse_client_id`` checks the
client id names this deployment's project, region and registry. Both raise :class:`AuthError` with a reason
that is safe to log (it never contains the token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt

from iotbridge.registry import DEVICE_ID_RE

ALLOWED_ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_LIFETIME_S = 24 * 3600
CLOCK_SKEW_S = 600
_CLIENT_ID_RE = re.compile(r"projects/([^/]+)/locations/([^/]+)/registries/([^/]+)/devices/([^/]+)")


class AuthError(Exception):
    """Authentication refused; ``str(exc)`` is a reason without secrets."""


class ClientIdError(AuthError):
    pass


class CredentialLike(Protocol):
    @property
    def expiration_time(self) -> datetime | None: ...  # read-only: the registry's credentials are frozen

    def algorithm(self) -> str: ...

    def public_key(self) -> Any: ...


@dataclass(frozen=True)
class Token:
    algorithm: str
    issued_at: datetime
    expires_at: datetime
    credential: Any = None  # the registered credential whose key signed it


def parse_client_id(client_id: str, project: str, region: str, registry_id: str) -> str:
    """The device id named by ``client_id``; ClientIdError unless it is the path of ``registry_id``."""
    reg, device = _device_path(client_id, project, region)
    if reg != registry_id:
        raise ClientIdError(f"client id names project/region/registry {project}/{region}/{reg}, not this "
                            "deployment's")
    return device


def parse_device_path(client_id: str, project: str, region: str) -> tuple[str, str]:
    """(registry id, device id) named by ``client_id``; ClientIdError unless it names this deployment's project
    and region (any of its registries) and a valid device id."""
    reg, device = _device_path(client_id, project, region)
    if not DEVICE_ID_RE.fullmatch(reg):  # the registry id rule is the device id's
        raise ClientIdError(f"client id names registry {reg!r}, not a valid registry id")
    return reg, device


def _device_path(client_id: str, project: str, region: str) -> tuple[str, str]:
    m = _CLIENT_ID_RE.fullmatch(client_id)
    if not m:
        raise ClientIdError("client id is not projects/{p}/locations/{r}/registries/{reg}/devices/{d}")
    p, r, reg, device = m.groups()
    if (p, r) != (project, region):
        raise ClientIdError(f"client id names project/region/registry {p}/{r}/{reg}, not this deployment's")
    if not DEVICE_ID_RE.fullmatch(device):
        raise ClientIdError("device id in client id is not a valid device id")
    return reg, device


def verify_jwt(token: bytes | str, credentials: Iterable[CredentialLike], audience: str,
               now: datetime | None = None) -> Token:
    """Verify an IoT Core device JWT against the device's credentials; return its validity window.

    Only RS256/ES256 (``none`` and HMAC are refused before any key is tried); ``aud`` must equal the
    project; ``iat``/``exp`` required, ``exp - iat`` at most 24 h. The 10 minute skew is granted to ``iat``
    (a device clock ahead of ours); ``exp`` must still lie ahead, because the session is closed at ``exp``.
    """
    now = now or datetime.now(UTC)
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("password is not a JWT") from None
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("password is not a JWT") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(f"JWT alg {alg!r} refused; allowed: {list(ALLOWED_ALGORITHMS)}")
    candidates = [c for c in credentials
                  if c.algorithm() == alg and (c.expiration_time is None or c.expiration_time > now)]
    if not candidates:
        raise AuthError(f"no unexpired {alg} credential registered for this device")
    last: Exception | None = None
    for cred in candidates:
        try:
            claims = jwt.decode(
                token, cred.public_key(), algorithms=[alg], audience=audience,
                # Every time claim is judged below against ``now``, the bridge's clock: PyJWT's own checks read
                # the process clock and would ignore it.
                options={"require": ["iat", "exp", "aud"], "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False},
            )
        except jwt.InvalidSignatureError as exc:
            last = exc
            continue
        except jwt.InvalidAudienceError:
            raise AuthError("JWT aud is not this project") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"JWT rejected: {type(exc).__name__}") from None
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise AuthError("JWT iat/exp must be numbers")
        if exp - iat > MAX_TOKEN_LIFETIME_S:
            raise AuthError("JWT lifetime exp - iat exceeds 24 h")
        if exp <= iat:
            raise AuthError("JWT exp is not after iat")
        if iat > now.timestamp() + CLOCK_SKEW_S:
            raise AuthError("JWT iat lies in the future beyond the allowed clock skew")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or nbf > now.timestamp() + CLOCK_SKEW_S):
            raise AuthError("JWT nbf lies in the future beyond the allowed clock skew")
        if exp <= now.timestamp():
            raise AuthError("JWT expired")
        return Token(alg, datetime.fromtimestamp(iat, UTC), datetime.fromtimestamp(exp, UTC), cred)
    raise AuthError("JWT signature does not match any registered credential") from last

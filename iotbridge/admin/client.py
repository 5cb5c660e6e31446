"""A small client of the device manager API for ``iotctl``: JSON over HTTP, Google's error model turned into
:class:`ApiCallError`. Locally it sends no credentials (the local API accepts any caller); for a deployed stack it
sends the caller's Google access token (application default credentials), as Google's own clients do."""

from __future__ import annotations

from typing import Any

import requests

TIMEOUT_S = 60.0


class ApiCallError(RuntimeError):
    """The API refused the call; the message is its one-line error."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class AdminClient:
    def __init__(self, url: str, project: str, region: str, authenticated: bool):
        self.url = url.rstrip("/") + "/"
        self.location = f"projects/{project}/locations/{region}"
        self.session: Any = requests.Session()
        if authenticated:
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
            self.session = AuthorizedSession(credentials)

    def registry(self, registry_id: str) -> str:
        return f"{self.location}/registries/{registry_id}"

    def device(self, registry_id: str, device_id: str) -> str:
        return f"{self.registry(registry_id)}/devices/{device_id}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self.session.request(method, self.url + "v1/" + path, json=body, params=params, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise ApiCallError("UNAVAILABLE", f"the admin API at {self.url} is unreachable: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            raise ApiCallError("UNKNOWN", f"HTTP {resp.status_code} without a JSON body") from None
        if resp.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiCallError(str(err.get("status", resp.status_code)), str(err.get("message", "")))
        return data if isinstance(data, dict) else {}


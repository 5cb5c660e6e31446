"""Stand-ins for the Google endpoints a broker host talks to while it boots, on one loopback HTTP server.

- the **metadata server** (``/computeMetadata/v1/...``; answers only requests carrying ``Metadata-Flavor:
  Google``, as the real one does): project, instance id/zone/hostname and the service account's token;
- **Cloud Storage**'s JSON API (``/storage/v1/b/{bucket}/o/{object}``, ``alt=json|media``): the code bucket;
- **Secret Manager** (``/v1/projects/{p}/secrets/{s}/versions/{v}:access``): the host's two secrets;
- an **HTTP proxy** that refuses every ``CONNECT``: the processes under test get it as ``https_proxy`` so that
  nothing they would send to a real Google endpoint leaves this machine (the attempt is recorded instead).

Storage and Secret Manager accept only the bearer token the metadata server issued, so a request that gets an
answer proves its client took the instance's identity from the metadata stand-in. Every request is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import google_crc32c

TOKEN = "ya29.simulated-host-token"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class GoogleStandIns:
    project: str
    numeric_project: str
    zone: str
    instance_id: str
    hostname: str
    service_account: str
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (bucket, name) -> bytes
    secrets: dict[str, bytes] = field(default_factory=dict)  # secret id -> latest version's data
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> GoogleStandIns:
        standins = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                status, ctype, body = standins._answer(self.path, self.headers)
                standins.requests.append(Recorded("GET", self.path, dict(self.headers.items()), status))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if self.path == "/" or self.path.startswith("/computeMetadata/"):
                    self.send_header("Metadata-Flavor", "Google")
                self.end_headers()
                self.wfile.write(body)

            def do_CONNECT(self) -> None:  # noqa: N802
                standins.requests.append(Recorded("CONNECT", self.path, dict(self.headers.items()), 403))
                self.send_response(403, "no network beyond this machine")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="gce-standins").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def env(self) -> dict[str, str]:
        """What points gcloud and the Google client libraries at these stand-ins instead of Google."""
        url = f"http://{self.address}/"
        return {
            "GCE_METADATA_ROOT": self.address,  # gcloud
            "GCE_METADATA_HOST": self.address,  # google-auth and the bridge
            "GCE_METADATA_IP": self.address,  # google-auth's "am I on GCE" probe
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": url + "storage/v1/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER": url,
            "https_proxy": url, "HTTPS_PROXY": url, "http_proxy": url, "HTTP_PROXY": url,
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        }

    def seen(self, method: str, prefix: str) -> list[Recorded]:
        return [r for r in list(self.requests) if r.method == method and r.path.startswith(prefix)]

    # ------------------------------------------------------------------ answers

    def _answer(self, raw_path: str, headers) -> tuple[int, str, bytes]:  # noqa: ANN001
        url = urllib.parse.urlsplit(raw_path)
        path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
        if path == "/" and headers.get("Metadata-Flavor") == "Google":  # google-auth's "am I on GCE" probe
            return 200, "application/text", b"computeMetadata/\n"
        if path.startswith("/computeMetadata/v1/"):
            if headers.get("Metadata-Flavor") != "Google":
                return 403, "text/plain", b"Missing Metadata-Flavor:Google header."
            return self._metadata(path.removeprefix("/computeMetadata/v1/"), query)
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, "application/json", _error(401, "Request had invalid authentication credentials.")
        if path.startswith("/storage/v1/b/"):
            return self._storage(path.removeprefix("/storage/v1/b/"), query)
        if path.startswith("/download/storage/v1/b/"):
            return self._storage(path.removeprefix("/download/storage/v1/b/"), {"alt": ["media"]})
        if path.startswith("/v1/projects/") and path.endswith(":access"):
            return self._secret(path)
        return 404, "application/json", _error(404, f"no stand-in for {path}")

    def _metadata(self, key: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        sa = "instance/service-accounts/"
        values = {
            "project/project-id": self.project,
            "project/numeric-project-id": self.numeric_project,
            "instance/id": self.instance_id,
            "instance/zone": f"projects/{self.numeric_project}/zones/{self.zone}",
            "instance/hostname": f"{self.hostname}.{self.zone}.c.{self.project}.internal",
            "instance/name": self.hostname,
            "universe/universe-domain": "googleapis.com",
            sa: "default/\n" + self.service_account + "/\n",
            sa + "default/email": self.service_account,
            sa + "default/scopes": "https://www.googleapis.com/auth/cloud-platform\n",
            sa + "default/aliases": "default\n",
        }
        accounts = (sa + "default", sa + self.service_account)
        if key.rstrip("/") in accounts and query.get("recursive") == ["true"]:
            return 200, "application/json", json.dumps({
                "aliases": ["default"], "email": self.service_account,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}).encode()
        if key.endswith("/token") and key.startswith(sa):
            return 200, "application/json", json.dumps(
                {"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}).encode()
        if key in values:
            return 200, "application/text", values[key].encode()
        return 404, "text/html", b"not found"

    def _storage(self, rest: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        # {bucket}/o/{object}; the object name arrives percent-decoded (slashes and all)
        bucket, sep, name = rest.partition("/o/")
        data = self.objects.get((bucket, name)) if sep else None
        if data is None:
            return 404, "application/json", _error(404, f"No such object: {bucket}/{name}")
        if query.get("alt") == ["media"]:
            return 200, "application/octet-stream", data
        crc = google_crc32c.Checksum(data).digest()
        return 200, "application/json", json.dumps({
            "kind": "storage#object", "bucket": bucket, "name": name, "id": f"{bucket}/{name}/1",
            "generation": "1", "metageneration": "1", "size": str(len(data)),
            "contentType": "application/zip", "storageClass": "STANDARD",
            "mediaLink": f"http://{self.address}/download/storage/v1/b/{bucket}/o/"
                         f"{urllib.parse.quote(name, safe='')}?generation=1&alt=media",
            "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),  # noqa: S324 - GCS's own field
            "crc32c": base64.b64encode(crc).decode(),
            "timeCreated": "2020-01-01T00:00:00.000Z", "updated": "2020-01-01T00:00:00.000Z",
        }).encode()

    def _secret(self, path: str) -> tuple[int, str, bytes]:
        # /v1/projects/{project}/secrets/{secret}/versions/{version}:access
        parts = path.removesuffix(":access").split("/")
        if len(parts) != 8 or parts[4] != "secrets" or parts[6] != "versions":
            return 400, "application/json", _error(400, f"malformed {path}")
        project, secret, version = parts[3], parts[5], parts[7]
        if project not in (self.project, self.numeric_project) or secret not in self.secrets:
            return 404, "application/json", _error(404, f"Secret [{secret}] not found or has no versions.")
        if version not in ("latest", "1"):
            return 404, "application/json", _error(404, f"Secret version [{version}] not found.")
        data = self.secrets[secret]
        return 200, "application/json", json.dumps({
            "name": f"projects/{self.numeric_project}/secrets/{secret}/versions/1",
            "payload": {"data": base64.b64encode(data).decode(),
                        "dataCrc32c": str(int.from_bytes(google_crc32c.Checksum(data).digest(), "big"))},
        }).encode()


def _error(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "status": {
        400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}.get(code, "UNKNOWN")}}).encode()

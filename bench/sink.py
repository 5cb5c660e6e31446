"""A do-nothing Pub/Sub sink for the bridge service, bench only: the service's own MQTT side measured without the
Pub/Sub client's RPCs and the emulator.

A bridge service started with ``publisher_factory = "bench.sink:make_publisher"`` (and ``BENCH_SINK_FILE`` in its
environment) keeps everything it does per message — the MQTT client, topic parsing, the device lookup, attributes,
limits, protobuf messages, batching, one PUBACK per message after its batch was "published" — but the publish
request goes nowhere: each batch's payloads are appended to that file (a header line ``{time} {count}``, then one
payload a line) and the call returns at once. The benchmark reads the file back (:func:`read_sink`) and counts what
arrived per (device, seq), as it does on Pub/Sub. Not a stand-in for Pub/Sub in any test: a measuring instrument
that separates "devices + front + Mosquitto + service" from "Pub/Sub client + emulator".
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1
from google.pubsub_v1.types import PublishRequest

from bench.core import Arrivals

SINK_ENV = "BENCH_SINK_FILE"
FACTORY = "bench.sink:make_publisher"


class SinkApi:
    """``PublisherClient.api`` whose ``publish`` writes each request's payloads to a file and returns."""

    def __init__(self, path: str):
        self._file = open(path, "ab", buffering=1 << 20)  # noqa: SIM115 - open for the life of the service
        self._lock = threading.Lock()

    def publish(self, request: Any = None, **_kwargs: Any) -> None:
        raw = PublishRequest.pb(request) if isinstance(request, PublishRequest) else request
        datas = [m.data for m in raw.messages]
        head = f"{time.time():.6f} {len(datas)}\n".encode()
        with self._lock:
            self._file.write(head + b"".join(d + b"\n" for d in datas))
            self._file.flush()


class SinkPublisher:
    """A ``PublisherClient`` (topic paths and the rest are the client's) whose ``api.publish`` is the sink."""

    def __init__(self, path: str):
        self._client = pubsub_v1.PublisherClient()
        self.api = SinkApi(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def make_publisher() -> SinkPublisher:
    path = os.environ.get(SINK_ENV)
    if not path:
        raise RuntimeError(f"{SINK_ENV} is not set: the sink needs a file to write to")
    return SinkPublisher(path)


def read_sink(path: Path, run: str) -> tuple[set[tuple[int, int]], int, list[float], float]:
    """(unique (dev, seq) of run ``run``, duplicates, latencies (batch time − the device's send time), time of the
    last batch holding a message of the run) from a sink file."""
    arrivals = Arrivals(run)
    latencies, last = [], 0.0
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    i = 0
    while i < len(lines) and lines[i]:
        stamp, count = lines[i].split()
        at, n = float(stamp), int(count)
        batch = lines[i + 1:i + 1 + n]
        if len(batch) < n or not all(batch) or i + 1 + n >= len(lines):
            break  # a batch still being written when the file was read (each line ends with a newline)
        for data in batch:
            if (body := arrivals.first(data)) is not None:
                latencies.append(at - body["sent"])
                last = max(last, at)
        i += 1 + n
    return arrivals.seen, arrivals.dups, latencies, last

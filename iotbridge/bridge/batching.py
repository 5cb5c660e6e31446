"""Batched Pub/Sub publishing for the bridge service: raw protobuf messages, one callback per batch.

The client library's ``PublisherClient.publish`` costs the bridge more CPU per message than everything else it
does (py-spy, ``bench/``): each call wraps the message in proto-plus types, builds a throw-away
``PublishRequest`` to measure its size, passes flow control and a sequencer, and creates a ``Future`` (with its
``threading.Condition``) and a done-callback. The bridge needs none of that per message: it acknowledges the
broker per batch anyway. Here a message is a raw ``PubsubMessage`` protobuf (built in C), batches are kept per
topic and sent with the GAPIC ``Publish`` call (``PublisherClient.api.publish``, the library's own retry and
timeout) from a small pool of threads, and the outcome is reported once per batch.

A batch is sent when it reaches ``max_messages`` or ``max_bytes`` or when its first message is ``max_latency``
seconds old, whichever comes first (the library's batching rules, without its per-message cost).

Pub/Sub refuses a whole request with INVALID_ARGUMENT when one message in it breaks a limit
(:mod:`iotbridge.bridge.limits`). Retrying such a request can never succeed, and every other message in it would
wait forever: a request refused permanently is split in halves, each sent again, until the refused message is
alone — ``on_rejected(batch, exc)`` gets it, and the others are sent as usual (log2 of the batch size rounds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.pubsub_v1.types import PublishRequest, PubsubMessage

from iotbridge.bridge import limits

RawMessage = PubsubMessage.pb()
_RawRequest = PublishRequest.pb()
# Pub/Sub refuses a publish request over 10 MB or 1,000 messages; the request's own framing needs some room.
MAX_REQUEST_BYTES = limits.MAX_REQUEST_BYTES - 1_000_000
MAX_REQUEST_MESSAGES = limits.MAX_REQUEST_MESSAGES


def is_permanent(exc: BaseException) -> bool:
    """Pub/Sub refused the request's content: sending the same messages again can never succeed. Everything else
    (unavailable, deadline, quota, a missing topic or grant an operator can fix) is worth retrying."""
    return isinstance(exc, gexc.InvalidArgument)


@dataclass
class Batch:
    topic: str
    started: float
    messages: list[Any] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)  # whatever the caller needs per message (e.g. its MQTT ack)
    size: int = 0
    attempt: int = 0


# Building a message's attribute map from a dict runs a Python loop per attribute (protobuf's map ``update``): the
# largest single item of the service's CPU per message (py-spy, ``bench/``). A device's messages carry the same
# attributes each time, so the map is built once per distinct set and copied in C (``CopyFrom``) into each message.
_templates: dict[tuple[tuple[str, str], ...], Any] = {}
# Distinct attribute sets kept, about one per device: above what one host carries (the front's idle CPU bounds every
# machine type at 80,645 devices, Mosquitto's with device_auth mosquitto at 227,272: iotbridge/planning/
# host_sizing.py), so a full host's devices all stay cached (a cache smaller than its devices, cleared when full,
# would rebuild most maps and copy them too); about 2 KiB each (450 MiB at 227,272, in the memory host_sizing keeps
# for the bridge service). The cache starts over when full (devices that left).
MAX_TEMPLATES = 250_000


def raw_message(data: bytes, attributes: dict[str, str], cache: bool = True) -> Any:
    """The raw Pub/Sub message; ``cache=False`` for attributes that differ per message (a dead letter's reason),
    which would only push the devices' sets out of the cache."""
    if not cache:
        return RawMessage(data=data, attributes=attributes)
    key = tuple(attributes.items())
    template = _templates.get(key)
    if template is None:
        if len(_templates) >= MAX_TEMPLATES:
            _templates.clear()
        template = _templates[key] = RawMessage(attributes=attributes)
    message = RawMessage()
    message.CopyFrom(template)
    message.data = data
    return message


def framed_size(message: Any) -> int:
    return message.ByteSize() + 8  # the repeated field's tag and length prefix


def split(batch: Batch) -> tuple[Batch, Batch]:
    """The two halves of a batch, each a fresh batch (no retry attempts yet)."""
    mid = len(batch.messages) // 2
    halves = []
    for sl in (slice(None, mid), slice(mid, None)):
        messages = batch.messages[sl]
        halves.append(Batch(batch.topic, batch.started, messages, batch.tokens[sl],
                            sum(framed_size(m) for m in messages)))
    return halves[0], halves[1]


class Batcher:
    """``add(topic, raw_message, token)``; ``on_sent(batch)`` or ``on_failed(batch, exc)`` per batch, from a pool
    thread, and ``on_rejected(batch, exc)`` for a batch of one message Pub/Sub refused permanently (its batch mates
    are sent without it). ``send(batch)`` sends a batch again (retries are the caller's: it knows whether they still
    matter)."""

    def __init__(self, publish: Callable[..., Any], on_sent: Callable[[Batch], None],
                 on_failed: Callable[[Batch, BaseException], None],
                 on_rejected: Callable[[Batch, BaseException], None], max_messages: int = 250,
                 max_bytes: int = MAX_REQUEST_BYTES, max_latency: float = 0.005, rpc_threads: int = 8,
                 timeout: float = 60.0):
        self._publish = publish
        self._on_sent, self._on_failed, self._on_rejected = on_sent, on_failed, on_rejected
        self.max_messages = min(max_messages, MAX_REQUEST_MESSAGES)
        self.max_bytes = min(max_bytes, MAX_REQUEST_BYTES)
        self.max_latency = max_latency
        self.timeout = timeout
        self._open: dict[str, Batch] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(rpc_threads, thread_name_prefix="pubsub-rpc")
        self._flusher = threading.Thread(target=self._flush_loop, name="pubsub-batches", daemon=True)
        self._flusher.start()

    def add(self, topic: str, message: Any, token: Any) -> None:
        size = framed_size(message)
        with self._cond:
            batch = self._open.get(topic)
            if batch is not None and batch.size + size > self.max_bytes:
                del self._open[topic]
                self.send(batch)
                batch = None
            if batch is None:
                batch = self._open[topic] = Batch(topic, time.monotonic())
                self._cond.notify()
            batch.messages.append(message)
            batch.tokens.append(token)
            batch.size += size
            if len(batch.messages) >= self.max_messages:
                del self._open[topic]
                self.send(batch)

    def send(self, batch: Batch) -> None:
        if not self._stopped:
            self._pool.submit(self._send, batch)

    def _send(self, batch: Batch) -> None:
        request = PublishRequest.wrap(_RawRequest(topic=batch.topic, messages=batch.messages))
        try:
            self._publish(request=request, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - reported to the owner, who retries or lets the broker redeliver
            if not is_permanent(exc):
                self._on_failed(batch, exc)
            elif len(batch.messages) == 1:
                self._on_rejected(batch, exc)
            else:
                for half in split(batch):
                    self.send(half)
            return
        self._on_sent(batch)

    def _flush_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._open:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = [t for t, b in self._open.items() if b.started + self.max_latency <= now]
                for topic in due:
                    self.send(self._open.pop(topic))
                if self._open:
                    oldest = min(b.started for b in self._open.values())
                    self._cond.wait(max(0.0005, oldest + self.max_latency - now))

    def stop(self) -> None:
        """Drop what is not sent yet (unacknowledged: the broker redelivers it) and stop the threads."""
        with self._cond:
            self._stopped = True
            self._open.clear()
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

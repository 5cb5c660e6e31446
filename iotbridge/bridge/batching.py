"""Batched Pub/Sub publishing for the bridge service: raw protobuf messages, one callback per batch.

The client library's ``PublisherClient.publish`` costs the bridge more CPU per message than everything else it
does (py-spy, ``bench/`` issue #7): each call wraps the message in proto-plus types, builds a throw-away
``PublishRequest`` to measure its size, passes flow control and a sequencer, and creates a ``Future`` (with its
``threading.Condition``) and a done-callback. The bridge needs none of that per message: it acknowledges the
broker per batch anyway. Here a message is a raw ``PubsubMessage`` protobuf (built in C), batches are kept per
topic and sent with the GAPIC ``Publish`` call (``PublisherClient.api.publish``, the library's own retry and
timeout) from a small pool of threads, and the outcome is reported once per batch.

A batch is sent when it reaches ``max_messages`` or ``max_bytes`` or when its first message is ``max_latency``
seconds old, whichever comes first (the library's batching rules, without its per-message cost).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.pubsub_v1.types import PublishRequest, PubsubMessage

RawMessage = PubsubMessage.pb()
_RawRequest = PublishRequest.pb()
# Pub/Sub refuses a publish request over 10 MB or 1,000 messages.
MAX_REQUEST_BYTES = 9_000_000
MAX_REQUEST_MESSAGES = 1000


@dataclass
class Batch:
    topic: str
    started: float
    messages: list[Any] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)  # whatever the caller needs per message (e.g. its MQTT ack)
    size: int = 0
    attempt: int = 0


def raw_message(data: bytes, attributes: dict[str, str]) -> Any:
    return RawMessage(data=data, attributes=attributes)


class Batcher:
    """``add(topic, raw_message, token)``; ``on_sent(batch)`` or ``on_failed(batch, exc)`` per batch, from a pool
    thread. ``send(batch)`` sends a batch again (retries are the caller's: it knows whether they still matter)."""

    def __init__(self, publish: Callable[..., Any], on_sent: Callable[[Batch], None],
                 on_failed: Callable[[Batch, BaseException], None], max_messages: int = 250,
                 max_bytes: int = MAX_REQUEST_BYTES, max_latency: float = 0.005, rpc_threads: int = 8,
                 timeout: float = 60.0):
        self._publish = publish
        self._on_sent, self._on_failed = on_sent, on_failed
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
        size = message.ByteSize() + 8  # the repeated field's tag and length prefix
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
            self._on_failed(batch, exc)
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

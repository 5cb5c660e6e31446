"""A Pub/Sub publisher that refuses what real Pub/Sub refuses, for tests: the emulator accepts any attribute.

Real Pub/Sub answers a publish request with INVALID_ARGUMENT, for the whole request, when one of its messages has
more than 100 attributes, an attribute key over 256 bytes or a value over 1,024 bytes, more than 10 MB, or when
the request holds more than 1,000 messages or 10 MB.
Written apart from ``iotbridge.bridge.limits`` on purpose: the code under test must not grade itself.

``make_publisher`` is what a bridge service started by the tests loads through its ``publisher_factory`` setting;
every request it refuses is logged with ``REFUSED`` in the service's log.
"""

from __future__ import annotations

import logging
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.types import PublishRequest

log = logging.getLogger("tests.pubsub_limits")
REFUSED = "stand-in Pub/Sub refused a publish request"
_MB10 = 10 * 1000 * 1000


def refusal(request: Any) -> str | None:
    """Why real Pub/Sub would refuse this publish request (None: it would take it)."""
    raw = PublishRequest.pb(request) if isinstance(request, PublishRequest) else request
    if len(raw.messages) > 1000:
        return f"The request contains {len(raw.messages)} messages, but the maximum allowed is 1000."
    if raw.ByteSize() > _MB10:
        return f"Request payload size exceeds the limit: {_MB10} bytes."
    for message in raw.messages:
        if len(message.attributes) > 100:
            return f"The message has {len(message.attributes)} attributes, but the maximum allowed is 100."
        size = len(message.data)
        for key, value in message.attributes.items():
            k, v = len(key.encode()), len(value.encode())
            if k > 256:
                return f"One of the attributes in the request has a key that is too long ({k} bytes; at most 256)."
            if v > 1024:
                return (f"One of the attributes in the request has a value that is too long. The length is {v} "
                        "bytes, but the maximum allowed is 1024.")
            size += k + v
        if size > _MB10:
            return f"A message in the request is {size} bytes, over the {_MB10} bytes allowed."
    return None


class EnforcingApi:
    """The GAPIC publisher (``PublisherClient.api``) behind a check of every publish request."""

    def __init__(self, api: Any):
        self._api = api
        self.refused: list[str] = []

    def publish(self, request: Any = None, **kwargs: Any) -> Any:
        why = refusal(request)
        if why is not None:
            self.refused.append(why)
            log.warning("%s: %s", REFUSED, why)
            raise gexc.InvalidArgument(why)
        return self._api.publish(request=request, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


class EnforcingPublisher:
    """A ``PublisherClient`` whose ``api.publish`` enforces Pub/Sub's limits; everything else is the client's."""

    def __init__(self, client: pubsub_v1.PublisherClient | None = None):
        self._client = client or pubsub_v1.PublisherClient()
        self.api = EnforcingApi(self._client.api)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def make_publisher() -> EnforcingPublisher:
    return EnforcingPublisher(pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.005)))


# A rule Pub/Sub might add that the bridge does not know of: how the bridge copes with a refusal it did not foresee.
UNFORESEEN_MARKER = b"refused-for-an-unforeseen-reason"


class PickyApi(EnforcingApi):
    """Also refuses any request holding a message whose data contains ``UNFORESEEN_MARKER``: on the device-facing
    topics only (as a schema on the telemetry topic would), or, ``everywhere``, on the dead-letter topic too."""

    def __init__(self, api: Any, everywhere: bool = False):
        super().__init__(api)
        self.everywhere = everywhere

    def publish(self, request: Any = None, **kwargs: Any) -> Any:
        raw = PublishRequest.pb(request) if isinstance(request, PublishRequest) else request
        judged = self.everywhere or not raw.topic.endswith("-dead-letter")
        if judged and any(UNFORESEEN_MARKER in m.data for m in raw.messages):
            why = "A message in the request breaks a rule the bridge does not check."
            self.refused.append(why)
            log.warning("%s: %s", REFUSED, why)
            raise gexc.InvalidArgument(why)
        return super().publish(request=request, **kwargs)


def make_picky_publisher(everywhere: bool = False) -> EnforcingPublisher:
    publisher = make_publisher()
    publisher.api = PickyApi(publisher.api._api, everywhere)
    return publisher


def make_pickier_publisher() -> EnforcingPublisher:
    return make_picky_publisher(everywhere=True)


class UnavailableApi:
    """Pub/Sub out of reach: every publish request fails with UNAVAILABLE (a passing error, retried)."""

    def publish(self, request: Any = None, **kwargs: Any) -> Any:
        raise gexc.ServiceUnavailable("stand-in Pub/Sub outage")


def make_unavailable_publisher() -> EnforcingPublisher:
    publisher = make_publisher()
    publisher.api = UnavailableApi()  # type: ignore[assignment]
    return publisher

"""Pub/Sub's limits against the running bridge: one device's message that Pub/Sub can never accept is
dead-lettered, and every other device's messages go through. The bridge service publishes through a stand-in
that refuses what real Pub/Sub refuses (the emulator accepts over-long attributes)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from iotbridge.bridge import limits
from iotbridge.bridge.batching import Batch, Batcher, raw_message
from iotbridge.local.broker_host import BridgeStack
from tests.waiting import wait_for

from .conftest import PROJECT, DeviceFactory, PubSubReader, broker_session, new_stack
from .pubsub_limits import REFUSED, UNFORESEEN_MARKER, EnforcingPublisher

pytestmark = pytest.mark.emulator

# More than the broker's in-flight window for the bridge's session (max_inflight_messages 1000): a bridge that
# retries them forever never gets another message from the broker.
POISON_MESSAGES = 1200
OTHER_DEVICES = 8
DELIVERY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def enforcing_stack(bridge_env, tmp_path_factory) -> Iterator[BridgeStack]:
    st = new_stack(tmp_path_factory.mktemp("limits"), bridge_env,
                   publisher_factory="tests.bridge.pubsub_limits:make_publisher")
    yield st
    st.stop()


def test_poison_subfolder_is_dead_lettered_and_other_devices_get_through(enforcing_stack, registry):
    stack = enforcing_stack
    reader = PubSubReader(PROJECT, stack.settings.prefix)
    reader.attach(uuid.uuid4().hex[:8], keys=("telemetry", "dead-letter"))
    factory = DeviceFactory(registry, stack)
    poisoner, _ = factory.register("ES256")
    sub_folder = "s" * 1100  # a 1,100-byte subFolder attribute: real Pub/Sub refuses the whole request
    # Straight to the broker as the front relays a device: what the bridge service does with a message that got
    # this far is under test here, whatever the front lets through.
    session = broker_session(stack, "front", poisoner, max_inflight=POISON_MESSAGES)
    try:
        infos = [session.publish(f"/devices/{poisoner}/events/{sub_folder}", f"poison-{i}".encode(), qos=1)
                 for i in range(POISON_MESSAGES)]
        infos[-1].wait_for_publish(30)
        assert all(i.is_published() for i in infos)
    finally:
        session.disconnect()
        session.loop_stop()

    others = [factory.connected("ES256") for _ in range(OTHER_DEVICES)]
    try:
        for d in others:
            d.publish_event(f"from {d.identity.device_id}".encode()).wait_for_publish(10)
        got = reader.pull("telemetry", OTHER_DEVICES, timeout=DELIVERY_TIMEOUT_S)
        assert {m.data for m in got} == {f"from {d.identity.device_id}".encode() for d in others}
    finally:
        for d in others:
            d.disconnect()

    dead = reader.pull("dead-letter", POISON_MESSAGES, timeout=60)
    assert {m.data for m in dead} == {f"poison-{i}".encode() for i in range(POISON_MESSAGES)}
    sample = dict(dead[0].attributes)
    assert sample["error"] == limits.ATTRIBUTE_VALUE_TOO_LONG and sample["failedBy"] == "bridge"
    assert "1100 bytes" in sample["errorDetail"] and sample["deviceId"] == poisoner
    assert sample["subFolder"] == sub_folder[:limits.MAX_ATTRIBUTE_VALUE_BYTES]
    assert sample["mqttTopic"].startswith(f"/devices/{poisoner}/events/sss")
    # Acknowledged to the broker: nothing of it is redelivered, and no invalid request ever reached Pub/Sub.
    wait_for("dead-letter count", lambda: stack.service_stats().get("dead_lettered", 0), lambda v: v >= POISON_MESSAGES,
             timeout=10)
    assert reader.drain("telemetry", wait=1.0) == []
    assert REFUSED not in stack.procs["service"].log_path.read_text()


@pytest.mark.parametrize("factory", ["make_picky_publisher", "make_pickier_publisher"])
def test_message_pubsub_refuses_unforeseen_is_isolated_dead_lettered_and_acked(bridge_env, tmp_path, registry,
                                                                                factory):
    """A refusal the bridge's own checks did not predict: only that message leaves the batch, for the dead-letter
    topic with Pub/Sub's reason (without its data if the dead-letter topic refuses that too); the broker gets its
    PUBACK (nothing is redelivered)."""
    stack = new_stack(tmp_path, bridge_env, publisher_factory=f"tests.bridge.pubsub_limits:{factory}")
    try:
        reader = PubSubReader(PROJECT, stack.settings.prefix)
        reader.attach(uuid.uuid4().hex[:8], keys=("telemetry", "dead-letter"))
        device_id, _ = DeviceFactory(registry, stack).register("ES256")
        session = broker_session(stack, "front", device_id, max_inflight=100)
        try:
            # Sent back to back, most of them share the refused message's publish request.
            payloads = [f"ok-{i}".encode() for i in range(40)]
            payloads.insert(20, UNFORESEEN_MARKER)
            infos = [session.publish(f"/devices/{device_id}/events", p, qos=1) for p in payloads]
            infos[-1].wait_for_publish(10)
        finally:
            session.disconnect()
            session.loop_stop()
        got = reader.pull("telemetry", 40, timeout=DELIVERY_TIMEOUT_S)
        assert {m.data for m in got} == {f"ok-{i}".encode() for i in range(40)}
        dead = reader.pull("dead-letter", 1, timeout=DELIVERY_TIMEOUT_S, settle=1.0)
        attrs = dict(dead[0].attributes)
        if factory == "make_picky_publisher":
            assert [m.data for m in dead] == [UNFORESEEN_MARKER] and "dataDroppedBytes" not in attrs
        else:
            assert [m.data for m in dead] == [b""] and attrs["dataDroppedBytes"] == str(len(UNFORESEEN_MARKER))
        assert attrs["error"] == "pubsub_invalid_argument" and "does not check" in attrs["errorDetail"]
        assert attrs["mqttTopic"] == f"/devices/{device_id}/events" and attrs["deviceId"] == device_id
        stats = wait_for("every PUBACK", lambda: (s := stack.service_stats()).get("acked", 0) >= 41 and s, timeout=10)
        assert isinstance(stats, dict) and stats["dead_lettered"] == 1
    finally:
        stack.stop()


# ------------------------------------------------------------------------------------------- the batcher


@pytest.fixture
def enforcing_topic(bridge_env) -> Iterator[tuple[EnforcingPublisher, str, str]]:
    client = pubsub_v1.PublisherClient()
    topic = client.topic_path(PROJECT, f"limits-{uuid.uuid4().hex[:8]}")
    client.create_topic(request={"name": topic})
    subscriber = pubsub_v1.SubscriberClient()
    sub = subscriber.subscription_path(PROJECT, topic.rsplit("/", 1)[1])
    subscriber.create_subscription(request={"name": sub, "topic": topic})
    yield EnforcingPublisher(client), topic, sub
    subscriber.delete_subscription(request={"subscription": sub})
    client.delete_topic(request={"topic": topic})


class Outcomes:
    def __init__(self):
        self.sent: list[int] = []
        self.failed: list[tuple[list[int], BaseException]] = []
        self.rejected: list[tuple[list[int], BaseException]] = []
        self.lock = threading.Lock()

    def on_sent(self, batch: Batch) -> None:
        with self.lock:
            self.sent.extend(batch.tokens)

    def on_failed(self, batch: Batch, exc: BaseException) -> None:
        with self.lock:
            self.failed.append((list(batch.tokens), exc))

    def on_rejected(self, batch: Batch, exc: BaseException) -> None:
        with self.lock:
            self.rejected.append((list(batch.tokens), exc))

    def batcher(self, publish, max_messages: int) -> Batcher:  # noqa: ANN001
        # A latency far above the test's length: the batch is cut by its message count alone.
        return Batcher(publish, self.on_sent, self.on_failed, self.on_rejected, max_messages=max_messages,
                       max_latency=60.0)


def test_batcher_isolates_the_message_pubsub_refuses_and_sends_its_batch_mates(enforcing_topic):
    publisher, topic, sub = enforcing_topic
    out = Outcomes()
    batcher = out.batcher(publisher.api.publish, max_messages=16)
    try:
        for i in range(16):
            attrs = {"i": str(i), **({"subFolder": "x" * 1100} if i == 11 else {})}
            batcher.add(topic, raw_message(f"m{i}".encode(), attrs), i)
        wait_for("batch mates sent, refused one isolated", lambda: len(out.sent) == 15 and out.rejected, timeout=20)
    finally:
        batcher.stop()
    assert sorted(out.sent) == [i for i in range(16) if i != 11]
    assert [tokens for tokens, _ in out.rejected] == [[11]]
    assert isinstance(out.rejected[0][1], gexc.InvalidArgument) and out.failed == []
    # The first request (all 16) and the splits on the way to message 11 were refused; nothing else was.
    assert len(publisher.api.refused) == 5
    pulled = pubsub_v1.SubscriberClient().pull(request={"subscription": sub, "max_messages": 100}, timeout=10)
    assert sorted(m.message.data for m in pulled.received_messages) == sorted(
        f"m{i}".encode() for i in range(16) if i != 11)


def test_batcher_hands_a_passing_failure_back_whole_for_retry():
    out = Outcomes()

    def unavailable(**_):  # noqa: ANN003
        raise gexc.ServiceUnavailable("try again")

    batcher = out.batcher(unavailable, max_messages=4)
    try:
        for i in range(4):
            batcher.add("projects/p/topics/t", raw_message(b"m", {"i": str(i)}), i)
        wait_for("failure reported", lambda: out.failed, timeout=10)
    finally:
        batcher.stop()
    assert [tokens for tokens, _ in out.failed] == [[0, 1, 2, 3]] and out.rejected == [] and out.sent == []


@pytest.mark.parametrize(("attrs", "data", "reason"), [
    ({"k" * 257: "v"}, b"", limits.ATTRIBUTE_KEY_TOO_LONG),
    ({"googThing": "v"}, b"x", limits.ATTRIBUTE_KEY_RESERVED),
    ({"subFolder": "é" * 513}, b"x", limits.ATTRIBUTE_VALUE_TOO_LONG),  # 513 characters, 1,026 bytes
    ({f"a{i}": "v" for i in range(101)}, b"x", limits.TOO_MANY_ATTRIBUTES),
    ({"deviceId": "d"}, b"x" * limits.MAX_MESSAGE_BYTES, limits.MESSAGE_TOO_LARGE),
    ({}, b"", limits.EMPTY_MESSAGE),
])
def test_message_violation_names_each_limit(attrs, data, reason):
    assert limits.message_violation(data, attrs)[0] == reason  # type: ignore[index]


def test_message_at_every_limit_is_accepted():
    attrs = {f"{i:0>256}": "é" * 512 for i in range(99)}  # 256-byte keys, 1,024-byte values
    assert limits.message_violation(b"x" * 1000, attrs) is None


def test_event_topic_violation_for_the_front():
    assert limits.event_topic_violation("/devices/d1/events/" + "é" * 512, "d1") is None
    reason = limits.event_topic_violation("/devices/d1/events/" + "é" * 513, "d1")
    assert reason is not None and reason[0] == limits.ATTRIBUTE_VALUE_TOO_LONG
    assert limits.event_topic_violation("/devices/d1/state", "d1") is None

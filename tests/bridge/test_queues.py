"""The broker's queues are bounded, and a client over its bound is reported: against a real Mosquitto, the bridge
service's own session stalled by a Pub/Sub outage (a stand-in publisher that answers UNAVAILABLE)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iotbridge.local.broker_host import BridgeStack
from tests.waiting import wait_for

from .conftest import DeviceFactory, broker_session, new_stack

pytestmark = pytest.mark.emulator

QUEUE_BOUND = 100
BROKER_INFLIGHT = 1000  # mosquitto.conf max_inflight_messages: unacked messages the bridge's session may hold
SENT = BROKER_INFLIGHT + QUEUE_BOUND + 400


@pytest.fixture(scope="module")
def outage_stack(bridge_env, tmp_path_factory) -> Iterator[BridgeStack]:
    st = new_stack(tmp_path_factory.mktemp("queues"), bridge_env, max_queued_messages=QUEUE_BOUND,
                   publisher_factory="tests.bridge.pubsub_limits:make_unavailable_publisher")
    yield st
    st.stop()


def test_bridge_session_over_its_queue_bound_is_reported_by_client_and_bounded(outage_stack, registry):
    stack = outage_stack
    device_id, _ = DeviceFactory(registry, stack).register("ES256")
    session = broker_session(stack, "front", device_id, max_inflight=SENT)
    try:
        infos = [session.publish(f"/devices/{device_id}/events", f"m{i}".encode(), qos=1) for i in range(SENT)]
        infos[-1].wait_for_publish(30)
        assert all(i.is_published() for i in infos)  # the broker acknowledged every one of them to the "device"
    finally:
        session.disconnect()
        session.loop_stop()

    bridge_client = f"iotbridge:bridge:{stack.settings.host_id}"
    log_path = stack.procs["service"].log_path
    wait_for("the service's log line naming the client",
             lambda: f"dropping queued QoS 1 messages for client {bridge_client!r}" in log_path.read_text(),
             timeout=20)
    # $SYS is refreshed every sys_interval (5 s).
    stats = wait_for("the broker's drop counter in the service's stats",
                     lambda: (s := stack.service_stats()).get("broker_dropped_messages", 0) > 0 and s, timeout=20)
    assert isinstance(stats, dict) and stats["broker_queue_full"] >= 1
    # Bounded: what the broker holds is the bridge's in-flight window, its queue and the $SYS tree's own retained
    # messages (a few dozen), not everything that was sent.
    assert 0 < stats["broker_stored_messages"] <= BROKER_INFLIGHT + QUEUE_BOUND + 100 < SENT
    assert stats["broker_dropped_messages"] >= SENT - BROKER_INFLIGHT - QUEUE_BOUND

"""Fault tests: the bridge killed mid-stream, the Pub/Sub emulator stopped, Mosquitto restarted.

Each test runs its own broker host (Mosquitto + front + bridge service) so that it can break parts of it.
"""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
from google.cloud import pubsub_v1

from iotbridge.bridge import fanout
from iotbridge.local import services
from tests.waiting import wait_for

from .conftest import PROJECT, DeviceFactory, PubSubReader, new_stack, retained

pytestmark = pytest.mark.emulator


@pytest.fixture
def own_stack(bridge_env, tmp_path):
    st = new_stack(tmp_path / "host", bridge_env)
    yield st
    st.stop()


def _reader(stack) -> PubSubReader:
    r = PubSubReader(PROJECT, stack.settings.prefix)
    r.attach(uuid.uuid4().hex[:8])
    return r


def _seqs(messages) -> list[int]:
    return [json.loads(m.data)["seq"] for m in messages]


def test_bridge_killed_mid_stream_loses_nothing(own_stack, registry):
    """10,000 QoS 1 messages; the bridge service is SIGKILLed half way and restarted: all reach Pub/Sub."""
    n = 10_000
    reader = _reader(own_stack)
    factory = DeviceFactory(registry, own_stack)
    dev = factory.connected("ES256", max_inflight=500)
    infos = []
    for seq in range(n):
        infos.append(dev.publish_event(json.dumps({"ts": 1764252000000 + seq, "metrics": {"v": seq},
                                                   "seq": seq}).encode()))
        if seq == n // 2:
            # Kill once Pub/Sub has really received part of the stream, so the kill lands mid-flight.
            wait_for("first forwards", lambda: own_stack.service_stats().get("forwarded", 0),
                     lambda v: v > 1000, timeout=60)
            own_stack.kill("service")
    for info in infos:
        info.wait_for_publish(60)  # every message acknowledged by the broker (PUBACK through the front)
    own_stack.start_service()
    got = _seqs(reader.pull("telemetry", n, timeout=180))
    # Keep reading until the set is complete (duplicates make len(got) >= n before that).
    while len(set(got)) < n:
        got += _seqs(reader.pull("telemetry", 1, timeout=60))
    assert set(got) == set(range(n))
    duplicates = len(got) - n
    print(f"\n10,000 QoS 1 messages, bridge killed mid-stream: {duplicates} duplicates, 0 lost")
    dev.disconnect()


def test_pubsub_outage_stops_acks_then_delivers_everything(bridge_env, tmp_path, registry):
    """A Pub/Sub emulator of its own is stopped (SIGSTOP) while a device publishes: the bridge acks nothing
    until it is back (SIGCONT), then everything arrives."""
    pubsub = services.start_pubsub(tmp_path / "pubsub")
    env = {**bridge_env, **pubsub.env}
    mp = pytest.MonkeyPatch()
    mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.env["PUBSUB_EMULATOR_HOST"])
    stack = None
    try:
        stack = new_stack(tmp_path / "host", env)
        reader = _reader(stack)
        dev = DeviceFactory(registry, stack).connected("ES256")
        dev.publish_event(json.dumps({"seq": -1}).encode()).wait_for_publish(10)
        wait_for("first ack", lambda: stack.service_stats().get("acked"), lambda v: v == 1, timeout=20)

        os.killpg(pubsub.proc.pid, signal.SIGSTOP)
        n = 300
        for seq in range(n):
            dev.publish_event(json.dumps({"seq": seq}).encode()).wait_for_publish(10)
        # The broker holds them (the device got every PUBACK) and handed them to the bridge ...
        wait_for("bridge received all", lambda: stack.service_stats().get("received"), lambda v: v == n + 1, timeout=20)
        stats = stack.service_stats()
        # ... which has acknowledged none of them while Pub/Sub is away.
        assert stats["acked"] == 1 and stats["forwarded"] == 1, stats

        os.killpg(pubsub.proc.pid, signal.SIGCONT)
        got = _seqs(reader.pull("telemetry", n + 1, timeout=120))
        assert set(got) == set(range(-1, n))
        wait_for("all acked", lambda: stack.service_stats().get("acked"), lambda v: v == n + 1, timeout=30)
        dev.disconnect()
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(pubsub.proc.pid, signal.SIGCONT)
        if stack is not None:
            stack.stop()
        mp.undo()
        pubsub.stop()


def _retained(stack, device_id: str) -> bytes:
    return retained(stack, f"/devices/{device_id}/config", wait_s=3)


def test_mosquitto_restart_keeps_retained_configs_and_queued_messages(own_stack, registry):
    factory = DeviceFactory(registry, own_stack)
    device_id, private = factory.register("ES256")
    # A config is published only to the host holding the device (targeted delivery), so the device is connected.
    dev = factory.device(device_id, private)
    dev.connect()
    fanout.push_config(registry, pubsub_v1.PublisherClient(), own_stack.settings.prefix, device_id, b"cfg-v1")
    wait_for("retained config", lambda: _retained(own_stack, device_id), lambda v: v == b"cfg-v1", timeout=20)

    wait_for("/healthz 200", lambda: _health(own_stack), lambda v: v == 200, timeout=10)
    # Messages queued for the bridge's persistent session while the bridge is away.
    reader = _reader(own_stack)
    own_stack.stop_part("service")
    for seq in range(50):
        dev.publish_event(json.dumps({"seq": seq}).encode()).wait_for_publish(10)

    # SIGTERM: Mosquitto writes its persistence file. The device's session ends with the broker; the front's
    # request to clear its retained config waits for the bridge service, which is stopped.
    own_stack.stop_part("mosquitto")
    dev.disconnect()
    assert _health(own_stack) == 503  # the load balancer stops sending devices here, auto-healing may act
    own_stack.start_mosquitto()
    # Nothing has re-published it: the front and the bridge have not talked to the new broker yet.
    assert _retained(own_stack, device_id) == b"cfg-v1"

    own_stack.start_service()
    assert sorted(_seqs(reader.pull("telemetry", 50, timeout=60))) == list(range(50))

    again = factory.device(device_id, private)
    wait_for("device reconnects after the broker restart", lambda: _try_connect(again), timeout=20)
    again.subscribe_config()
    assert again.configs.get(timeout=20) == b"cfg-v1"
    again.disconnect()


def _health(stack) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.settings.health_port}/healthz", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0  # not listening (yet)


def test_settings_naming_pre_made_fanout_slots_are_refused(tmp_path):
    """The slots are retired (each host makes its own filtered subscription): settings that still name them fail
    with a one-line reason instead of the service silently reading nothing or every host's messages."""
    from iotbridge.bridge.settings import BridgeSettings

    path = tmp_path / "settings.json"
    base = {"project": PROJECT, "region": "r", "registry_id": "reg", "prefix": "p", "host_id": "host-a"}
    path.write_text(json.dumps({**base, "fanout_subscriptions": ["p-device-commands-host-0"]}))
    with pytest.raises(ValueError, match="fanout_subscriptions is retired"):
        BridgeSettings.load(path)
    path.write_text(json.dumps({**base, "fanout_subscriptions": []}))  # what the last slot-less scripts wrote
    assert BridgeSettings.load(path).host_id == "host-a"


def _try_connect(dev) -> bool:
    try:
        dev.connect(timeout=5)
        return True
    except Exception:  # noqa: BLE001 - whatever stops the connect, the device is not connected
        return False


def test_failed_publish_is_retried_and_acked_only_after_success(tmp_path):
    """The error path the emulator cannot show without racing its restart: a publish request that fails (here
    with NotFound, which the client library does not retry itself) is retried; the broker is acked once, after."""
    from google.api_core import exceptions as gexc

    from iotbridge.bridge import service as svc_mod
    from iotbridge.bridge.batching import raw_message
    from iotbridge.bridge.settings import BridgeSettings

    class FlakyApi:
        def __init__(self):
            self.calls = 0
            self.sent: list = []

        def publish(self, request, timeout):
            self.calls += 1
            if self.calls <= 2:
                raise gexc.NotFound("topic not found")
            self.sent.append(request)

    class FlakyPublisher:
        def __init__(self):
            self.api = FlakyApi()

        def topic_path(self, project, topic):
            return f"projects/{project}/topics/{topic}"

    class Sub:
        def subscription_path(self, project, sub):
            return f"projects/{project}/subscriptions/{sub}"

    settings = BridgeSettings(project="p", region="r", registry_id="reg", prefix="pre")
    publisher = FlakyPublisher()
    bridge = svc_mod.BridgeService(settings, registry=None, password="x", publisher=publisher, subscriber=Sub())
    acks: list[tuple[int, int]] = []
    bridge.mqtt.ack = lambda mid, qos: acks.append((mid, qos))  # type: ignore[method-assign]
    orig = svc_mod.RETRY_MAX_S
    svc_mod.RETRY_MAX_S = 0.01
    try:
        bridge.batcher.add("projects/p/topics/pre-telemetry", raw_message(b"x", {"deviceId": "dev-1"}), (7, 1, 0))
        wait_for("ack after retries", lambda: acks, timeout=10)
    finally:
        svc_mod.RETRY_MAX_S = orig
        bridge.batcher.stop()
    assert publisher.api.calls == 3 and acks == [(7, 1)]
    [request] = publisher.api.sent
    assert request.topic == "projects/p/topics/pre-telemetry"
    assert [(m.data, dict(m.attributes)) for m in request.messages] == [(b"x", {"deviceId": "dev-1"})]
    assert bridge.stats["publish_errors"] == 2 and bridge.stats["forwarded"] == 1

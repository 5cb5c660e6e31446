"""Config push function, levels 1 and 2: the logic called directly, then the handler given CloudEvents.

Level 1 runs the logic against the real registry (Firestore emulator) with a recording publisher, to reach
orderings (a stale redelivery overtaken by a newer version) a broker cannot be made to produce on demand.
Level 2 calls the CloudEvent handler as Eventarc would, with the Firestore and Pub/Sub emulators and a real
Mosquitto, and a device subscribed to its config topic.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import time
import uuid
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, cast

import pytest
from cloudevents.http import CloudEvent

from iotbridge import registry as reg
from iotbridge.local import services
from tests.functions.conftest import load_function
from tests.functions.served import DeviceClient
from tests.waiting import wait_for

cp_module = load_function

PROJECT = "local-project"

# ------------------------------------------------------------------------------------- level 1: parsing


def req(**fields) -> bytes:
    return json.dumps(fields).encode()


REFUSED = [
    (b"{", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b'{"device_id": "dev-1", "config": {"x": NaN}}', "malformed_json"),
    (b"", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"dev-1"', "not_an_object"),
    (req(device_id="dev-1", config=[1, 2]), "not_an_object"),
    (req(device_id="dev-1", config="text"), "not_an_object"),
    (req(device_id="dev-1", config={}, colour="red"), "invalid_request"),
    (req(device_id="dev-1"), "invalid_request"),
    (req(config={}), "invalid_request"),
    (req(device_id="dev-1", config={}, binary_data="AA=="), "invalid_request"),
    (req(device_id="dev-1", binary_data="not base64!"), "invalid_request"),
    (req(device_id="dev-1", binary_data=12), "invalid_request"),
    (req(device_id="dev-1", config={}, version_to_update=-1), "invalid_request"),
    (req(device_id="dev-1", config={}, version_to_update=True), "invalid_request"),
    (req(device_id="dev-1", config={}, version_to_update=1.5), "invalid_request"),
    (req(device_id="dev-1", deviceId="dev-1", config={}), "invalid_request"),
    (req(device_id="a/b/c", config={}), "invalid_device_id"),
    (req(device_id="dev+1", config={}), "invalid_device_id"),
    (req(device_id="dev#", config={}), "invalid_device_id"),
    (req(device_id=7, config={}), "invalid_device_id"),
    (req(device_id="dev-1", config={"k": "x" * (64 * 1024)}), "config_too_large"),
    (req(device_id="dev-1", binary_data=base64.b64encode(b"x" * (64 * 1024 + 1)).decode()), "config_too_large"),
]


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_parse_refuses_with_a_reason(cp: ModuleType, raw: bytes, reason: str) -> None:
    with pytest.raises(cp.PermanentError) as err:
        cp.parse_request(raw)
    assert err.value.reason == reason
    assert err.value.detail


def test_parse_accepts_objects_bytes_and_iot_core_names(cp: ModuleType) -> None:
    r = cp.parse_request(req(device_id="dev-1", config={"b": 1, "a": [1, "é"]}))
    assert r == cp.ConfigRequest("dev-1", '{"b":1,"a":[1,"é"]}'.encode(), 0)
    blob = bytes(range(256)) * 256  # exactly 64 KiB of binary
    r = cp.parse_request(req(deviceId="dev-1", binaryData=base64.b64encode(blob).decode(), versionToUpdate="3"))
    assert r == cp.ConfigRequest("dev-1", blob, 3)


def test_requests_written_by_iotctl_parse_to_the_operator_bytes(cp: ModuleType) -> None:
    from iotbridge.spec import config_request  # what iotctl config push sends

    # The operator's bytes, JSON or not, reach the device as given: never re-serialized.
    assert cp.parse_request(config_request("dev-1", b'{"a": 1, "b": [true]}', 0)) == cp.ConfigRequest(
        "dev-1", b'{"a": 1, "b": [true]}', 0)
    blob = b"\x00\xffnot json"
    assert cp.parse_request(config_request("dev-1", blob, 7)) == cp.ConfigRequest("dev-1", blob, 7)


def test_settings_from_env_refuse_bad_values_and_hide_the_password(cp: ModuleType) -> None:
    s = cp.MqttSettings.from_env({"MQTT_HOST": "10.0.0.2", "MQTT_PASSWORD": "hunter2-secret", "MQTT_TLS": "no"})
    assert (s.host, s.port, s.tls, s.retain) == ("10.0.0.2", 8883, False, True)
    assert "hunter2-secret" not in repr(s)
    assert s.client_id.startswith("iotbridge:config-push:") and ":" not in s.client_id[-12:]
    with pytest.raises(RuntimeError, match="MQTT_HOST"):
        cp.MqttSettings.from_env({})
    with pytest.raises(ValueError, match="true/false"):
        cp.MqttSettings.from_env({"MQTT_HOST": "h", "MQTT_TLS": "maybe"})
    with pytest.raises(RuntimeError, match="REGISTRY_ID"):
        cp.deps_from_env({"PROJECT_ID": "p"})
    with pytest.raises(RuntimeError, match="mqtt or fanout"):
        cp.deps_from_env({"PROJECT_ID": "p", "REGISTRY_ID": "reg", "CONFIG_DELIVERY": "smoke-signals"})
    with pytest.raises(RuntimeError, match="FANOUT_TOPIC"):
        cp.deps_from_env({"PROJECT_ID": "p", "REGISTRY_ID": "reg", "CONFIG_DELIVERY": "fanout"})


def test_settings_from_env_take_the_client_id_a_broker_host_binds_the_backend_user_to(cp: ModuleType) -> None:
    env = {"MQTT_HOST": "h", "MQTT_PORT": "1883", "MQTT_TIMEOUT_S": "2.5", "MQTT_RETAIN": "false"}
    s = cp.MqttSettings.from_env({**env, "MQTT_CLIENT_ID": "iotbridge:config-push:h1"})
    assert (s.client_id, s.port, s.timeout_s, s.retain) == ("iotbridge:config-push:h1", 1883, 2.5, False)
    # Without one, each instance takes a random id of its own.
    assert cp.MqttSettings.from_env(env).client_id != cp.MqttSettings.from_env(env).client_id


# ------------------------------------------------------------------------------------- level 1: the flow


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail: Exception | None = None

    def deliver(self, registry, device_id: str, version: int, payload: bytes) -> None:  # noqa: ANN001
        if self.fail is not None:
            raise self.fail
        self.sent.append((cp_module().config_topic(device_id), payload))


class RecordingDeadLetter:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, message, error) -> None:  # noqa: ANN001
        self.sent.append((message.id, error.reason))


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> reg.Registry:
    emulator_env(firestore_emulator)
    return reg.Registry(PROJECT, f"reg-{uuid.uuid4().hex[:12]}", "europe-west1")


@pytest.fixture
def deps(cp: ModuleType, registry: reg.Registry):
    return cp.Deps(registry=registry, publisher=RecordingPublisher(), dead_letter=RecordingDeadLetter())


def msg(cp: ModuleType, mid: str, **fields) -> object:
    return cp.Message(id=mid, data=req(**fields), attributes={"origin": "test"})


@pytest.mark.emulator
def test_logic_stores_publishes_and_redelivery_makes_one_version(cp, deps, registry) -> None:
    registry.create_device("pump-1")
    out = cp.process(msg(cp, "100", device_id="pump-1", config={"rpm": 1}), deps)
    assert out == cp.Outcome("delivered", "pump-1", 2)  # version 1 is the device's empty first config
    assert deps.publisher.sent == [("/devices/pump-1/config", b'{"rpm":1}')]
    # The same Pub/Sub message again (Eventarc redelivers after a lost ack): no second version, the same
    # config re-sent, and no rate-limit refusal although it comes within the second.
    again = cp.process(msg(cp, "100", device_id="pump-1", config={"rpm": 1}), deps)
    assert again == cp.Outcome("delivered", "pump-1", 2)
    assert [v.version for v in registry.list_config_versions("pump-1")] == [2, 1]
    assert deps.dead_letter.sent == []


@pytest.mark.emulator
def test_logic_stale_redelivery_is_not_published_over_a_newer_version(cp, deps, registry) -> None:
    registry.create_device("pump-2")
    deps.min_interval_s = 0
    deps.publisher.fail = cp.TransientError("broker down")
    with pytest.raises(cp.TransientError):
        cp.process(msg(cp, "200", device_id="pump-2", config={"v": 1}), deps)
    assert registry.get_config("pump-2").version == 2  # stored before the publish failed
    deps.publisher.fail = None
    assert cp.process(msg(cp, "201", device_id="pump-2", config={"v": 2}), deps).version == 3
    # The retry of the first request arrives after v2 went out: it must not overwrite v2 on the device.
    late = cp.process(msg(cp, "200", device_id="pump-2", config={"v": 1}), deps)
    assert late == cp.Outcome("superseded", "pump-2", 2)
    assert deps.publisher.sent == [("/devices/pump-2/config", b'{"v":2}')]


@pytest.mark.emulator
def test_logic_permanent_refusals_are_logged_dead_lettered_and_not_raised(cp, deps, registry, caplog) -> None:
    caplog.set_level(logging.INFO, logger="config_push")
    registry.create_device("pump-3")
    registry.create_device("pump-blocked", blocked=True)
    cases = [
        ("300", msg(cp, "300", device_id="nobody-here", config={}), "unknown_device"),
        ("301", msg(cp, "301", device_id="pump-blocked", config={}), "device_blocked"),
        ("302", cp.Message("302", b"{not json"), "malformed_json"),
        ("303", cp.Message("303", b"[]"), "not_an_object"),
        ("304", msg(cp, "304", device_id="pump-3", config={"k": "x" * 70000}), "config_too_large"),
        ("305", msg(cp, "305", device_id="pump-3", config={}, version_to_update=4), "version_conflict"),
    ]
    for mid, m, reason in cases:
        out = cp.process(m, deps)
        assert out.status == "rejected" and out.reason == reason, (mid, out)
    assert deps.dead_letter.sent == [(mid, reason) for mid, _, reason in cases]
    logged = [r for r in caplog.records if r.name == "config_push" and r.levelno == logging.WARNING]
    assert [r.fields["reason"] for r in logged] == [reason for *_, reason in cases]
    assert all(r.fields["messageId"] == mid for r, (mid, *_) in zip(logged, cases, strict=True))
    assert deps.publisher.sent == []
    assert registry.get_device("pump-3").config_version == 1


@pytest.mark.emulator
def test_logic_flood_for_one_device_keeps_one_update_per_second(cp, deps, registry, caplog) -> None:
    caplog.set_level(logging.INFO, logger="config_push")
    deps.min_interval_s = 60.0  # a slow machine must not space the five requests out past the window
    registry.create_device("pump-4")
    outcomes = [cp.process(msg(cp, f"40{i}", device_id="pump-4", config={"i": i}), deps) for i in range(5)]
    assert outcomes[0].status == "delivered"
    assert [o.reason for o in outcomes[1:]] == ["rate_limited"] * 4
    assert len(deps.publisher.sent) == 1 and registry.get_device("pump-4").config_version == 2
    assert sum("rate_limited" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.emulator
def test_logic_gives_up_on_a_request_older_than_the_retry_window(cp, deps, registry, clock) -> None:
    from datetime import timedelta

    deps.clock = clock.now  # the function's age check reads this clock, not the process's
    registry.create_device("pump-5")
    deps.publisher.fail = cp.TransientError("broker down")
    young = cp.Message("500", req(device_id="pump-5", config={}), publish_time=clock.now())
    with pytest.raises(cp.TransientError):
        cp.process(young, deps)
    almost = cp.Message("500", young.data, publish_time=clock.now() - timedelta(hours=22, minutes=59))
    with pytest.raises(cp.TransientError):  # still inside the 23 h window: retried, not given up
        cp.process(almost, deps)
    assert deps.dead_letter.sent == []
    old = cp.Message("500", young.data, publish_time=clock.now() - timedelta(hours=23, minutes=1))
    assert cp.process(old, deps) == cp.Outcome("rejected", reason="retries_exhausted")
    assert deps.dead_letter.sent == [("500", "retries_exhausted")]
    assert registry.get_device("pump-5").config_version == 2


def test_event_message_fields_are_read(cp) -> None:
    t = datetime.now(UTC).replace(microsecond=123456)
    nanos = t.strftime("%Y-%m-%dT%H:%M:%S.") + "123456789Z"  # Pub/Sub's publishTime carries nanoseconds
    m = cp.message_from_event({"message": {"data": "eyJhIjoxfQ==", "messageId": "91", "attributes": {"a": "b"},
                                           "publishTime": nanos}})
    assert m == cp.Message("91", b'{"a":1}', {"a": "b"}, t)
    assert cp.message_from_event({"message": {"messageId": "92"}}).data == b""
    with pytest.raises(cp.PermanentError, match="no Pub/Sub message"):
        cp.message_from_event({"data": "x"})


# ------------------------------------------------------------------------------------- level 2: handler


def cloud_event(mid: str, data: bytes, topic: str = "cfg-requests", published: datetime | None = None) -> CloudEvent:
    """A CloudEvent as Eventarc delivers it; the message was published at ``published`` (default: just now)."""
    published = published or datetime.now(UTC)
    attributes = {
        "id": mid,
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{topic}",
        "specversion": "1.0",
    }
    body = {"message": {"data": base64.b64encode(data).decode(), "messageId": mid, "attributes": {"k": "v"},
                        "publishTime": published.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
            "subscription": f"projects/{PROJECT}/subscriptions/eventarc-test"}
    return CloudEvent(attributes, body)


@pytest.fixture
def handler_env(cp, firestore_emulator, pubsub_emulator, mosquitto, emulator_env, monkeypatch):
    """The function's environment pointed at the emulators and the broker; a fresh registry and topics."""
    from google.cloud import pubsub_v1

    emulator_env(firestore_emulator, pubsub_emulator)
    suffix = uuid.uuid4().hex[:10]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    dlq = publisher.create_topic(name=f"projects/{PROJECT}/topics/dlq-{suffix}").name
    dlq_sub = subscriber.create_subscription(name=f"projects/{PROJECT}/subscriptions/dlq-{suffix}", topic=dlq).name
    env = {"PROJECT_ID": PROJECT, "REGISTRY_ID": f"reg-{suffix}", "REGION": "europe-west1",
           "MQTT_HOST": mosquitto.host, "MQTT_PORT": str(mosquitto.port), "MQTT_TLS": "false",
           "MQTT_TIMEOUT_S": "3", "DEAD_LETTER_TOPIC": dlq}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cp.reset_deps()
    yield {"registry": reg.Registry(PROJECT, env["REGISTRY_ID"], "europe-west1"), "dlq_sub": dlq_sub,
           "subscriber": subscriber}
    cp.reset_deps()


def pull_dead_letters(subscriber, subscription: str, count: int, timeout: float = 20.0) -> list:
    got: list = []

    def received() -> int:
        resp = subscriber.pull(subscription=subscription, max_messages=50, timeout=5)
        if resp.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in resp.received_messages])
            got.extend(m.message for m in resp.received_messages)
        return len(got)

    wait_for(f"{count} dead letters (the number received)", received, lambda n: n >= count, timeout=timeout,
             interval=0)
    return got


@pytest.mark.emulator
def test_handler_delivers_to_the_device_once_per_message_id(cp, handler_env, mosquitto) -> None:
    registry = handler_env["registry"]
    registry.create_device("valve-1")
    device = DeviceClient(mosquitto.host, mosquitto.port, "valve-1")
    try:
        event = cloud_event("5001", req(device_id="valve-1", config={"open": True}))
        cp.handle(event)
        got = device.next()
        assert got.topic == "/devices/valve-1/config" and got.payload == b'{"open":true}' and got.qos == 1
        cp.handle(cloud_event("5001", req(device_id="valve-1", config={"open": True})))  # redelivery
        assert device.next().payload == b'{"open":true}'
        assert [v.version for v in registry.list_config_versions("valve-1")] == [2, 1]
    finally:
        device.close()
    # Retained: a device that subscribes later (reconnect) gets the latest config from the broker.
    late = DeviceClient(mosquitto.host, mosquitto.port, "valve-1")
    try:
        assert late.next().payload == b'{"open":true}'
    finally:
        late.close()


@pytest.mark.emulator
def test_handler_refusals_land_on_the_dead_letter_topic(cp, handler_env, mosquitto, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="config_push")
    monkeypatch.setenv("CONFIG_MIN_INTERVAL_S", "60")  # 6008 must fall inside the window however slow the machine
    registry = handler_env["registry"]
    registry.create_device("valve-2")
    registry.create_device("valve-3", blocked=True)
    device = DeviceClient(mosquitto.host, mosquitto.port, "valve-2")
    bad = {
        "6001": (req(device_id="ghost-valve", config={}), "unknown_device"),
        "6002": (req(device_id="valve-3", config={}), "device_blocked"),
        "6003": (req(device_id="valve-2", config={"x": "y" * 70000}), "config_too_large"),
        "6004": (req(device_id="valve-2", config={}, version_to_update=9), "version_conflict"),
        "6005": (b"{oops", "malformed_json"),
        "6006": (b"42", "not_an_object"),
    }
    try:
        for mid, (data, _) in bad.items():
            cp.handle(cloud_event(mid, data))  # returns: acknowledged, not retried
        cp.handle(cloud_event("6007", req(device_id="valve-2", config={"n": 1})))
        cp.handle(cloud_event("6008", req(device_id="valve-2", config={"n": 2})))  # within the second: flood
        assert device.next().payload == b'{"n":1}'
        with pytest.raises(queue.Empty):
            device.next(timeout=1.0)
    finally:
        device.close()
    expected = {mid: reason for mid, (_, reason) in bad.items()} | {"6008": "rate_limited"}
    letters = pull_dead_letters(handler_env["subscriber"], handler_env["dlq_sub"], len(expected))
    assert {m.attributes["sourceMessageId"]: m.attributes["error"] for m in letters} == expected
    for m in letters:
        assert m.attributes["k"] == "v" and m.attributes["errorDetail"]
        assert m.data == (bad[m.attributes["sourceMessageId"]][0] if m.attributes["sourceMessageId"] in bad
                          else req(device_id="valve-2", config={"n": 2}))
    reasons = sorted(r.fields["reason"] for r in caplog.records if r.levelno == logging.WARNING)
    assert reasons == sorted(expected.values())
    assert registry.get_device("valve-2").config_version == 2


@pytest.mark.emulator
def test_handler_raises_when_the_broker_is_unreachable(cp, handler_env, monkeypatch, clock) -> None:
    registry = handler_env["registry"]
    registry.create_device("valve-4")
    monkeypatch.setenv("MQTT_PORT", str(services.free_port()))  # nothing listens there
    cp.reset_deps()
    cp.get_deps().clock = clock.now
    with pytest.raises(cp.TransientError, match="unreachable"):
        cp.handle(cloud_event("7001", req(device_id="valve-4", config={"a": 1}), published=clock.now()))
    assert registry.get_config("valve-4").version == 2
    with pytest.raises(cp.TransientError):  # the retry: still down, still the one version
        cp.handle(cloud_event("7001", req(device_id="valve-4", config={"a": 1}), published=clock.now()))
    assert registry.get_device("valve-4").config_version == 2


@pytest.mark.emulator
def test_handler_logs_and_acknowledges_an_event_without_a_message(cp, handler_env, caplog) -> None:
    caplog.set_level(logging.INFO, logger="config_push")
    cp.handle(CloudEvent({"id": "8001", "type": "google.cloud.pubsub.topic.v1.messagePublished",
                          "source": "//pubsub.googleapis.com/x", "specversion": "1.0"}, {"nothing": 1}))
    assert [r.fields["reason"] for r in caplog.records if r.levelno == logging.ERROR] == ["invalid_event"]


@pytest.mark.emulator
def test_handler_fanout_delivery_speaks_the_bridge_format(cp, handler_env, monkeypatch) -> None:
    """CONFIG_DELIVERY=fanout: the version goes to the bridge's device-commands topic, in the bridge's format."""
    from google.cloud import pubsub_v1

    registry, subscriber = handler_env["registry"], handler_env["subscriber"]
    suffix = uuid.uuid4().hex[:8]
    topic = pubsub_v1.PublisherClient().create_topic(name=f"projects/{PROJECT}/topics/fanout-{suffix}").name
    sub = subscriber.create_subscription(name=f"projects/{PROJECT}/subscriptions/fanout-{suffix}", topic=topic).name
    monkeypatch.setenv("CONFIG_DELIVERY", "fanout")
    monkeypatch.setenv("FANOUT_TOPIC", topic)
    cp.reset_deps()
    registry.create_device("valve-9")
    # Connected nowhere: the version is stored, nothing is published (the device reads it when it connects).
    cp.handle(cloud_event("9000", req(device_id="valve-9", config={"on": 0})))
    assert registry.get_config("valve-9").version == 2
    # Held by host-b: published for that host alone.
    from datetime import UTC, datetime, timedelta

    from iotbridge.bridge import fanout
    fanout.mark_connected(registry.client, registry.registry_id, "valve-9", "host-b", "s1",
                          datetime.now(UTC) + timedelta(hours=1))
    time.sleep(1.1)  # one config update per second per device
    cp.handle(cloud_event("9001", req(device_id="valve-9", config={"on": 1})))
    [ours] = pull_dead_letters(subscriber, sub, 1)
    assert ours.data == b'{"on":1}'
    assert dict(ours.attributes) == {"kind": "config", "deviceId": "valve-9", "version": "3", "hostId": "host-b"}

    # What the bridge's own publisher would send for the same version (it derives the topic from the prefix,
    # so a stand-in client captures the call): the same data and attributes.
    sent: dict = {}

    class Capture:
        def topic_path(self, project, name):  # noqa: ANN001, ANN201
            return f"projects/{project}/topics/{name}"

        def publish(self, topic, data, **attrs):  # noqa: ANN001, ANN201
            sent.update(data=data, attrs=attrs)

            class Done:
                def result(self, timeout=None):  # noqa: ANN001, ANN201
                    return "1"
            return Done()

    fanout.publish_config(cast(Any, Capture()), PROJECT, "iot", "valve-9", registry.get_config("valve-9"), "host-b")
    assert sent == {"data": ours.data, "attrs": dict(ours.attributes)}


@pytest.mark.emulator
def test_publisher_reuses_a_warm_connection_and_replaces_an_idle_one(cp, mosquitto) -> None:
    device = DeviceClient(mosquitto.host, mosquitto.port, "valve-idle")
    try:
        warm = cp.MqttPublisher(cp.MqttSettings(host=mosquitto.host, port=mosquitto.port, tls=False))
        warm.deliver(None, "valve-idle", 1, b"one")
        first = warm._client
        warm.deliver(None, "valve-idle", 2, b"two")
        assert warm._client is first
        idle = cp.MqttPublisher(cp.MqttSettings(host=mosquitto.host, port=mosquitto.port, tls=False,
                                                idle_reconnect_s=0.0))
        idle.deliver(None, "valve-idle", 3, b"three")
        before = idle._client
        idle.deliver(None, "valve-idle", 4, b"four")
        assert idle._client is not before and before is not None and not before.is_connected()
        assert [device.next().payload for _ in range(4)] == [b"one", b"two", b"three", b"four"]
        warm.close()
        idle.close()
    finally:
        device.close()

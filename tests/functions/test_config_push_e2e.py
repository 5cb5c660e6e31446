"""Config push function, level 3: functions-framework serving the packaged function over HTTP, fed by a push
subscription of the Pub/Sub emulator, with the Firestore emulator and a real Mosquitto; a device subscribed to
its config topic receives what an operator requested."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.functions.served import DeviceClient, Served, serve, start_broker
from tests.waiting import wait_for

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def served(pubsub_emulator, firestore_emulator, tmp_path_factory) -> Iterator[Served]:
    emulators = {**pubsub_emulator.env, **firestore_emulator.env}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in emulators.items():
            mp.setenv(k, v)
        with serve(emulators, tmp_path_factory.mktemp("config-push-e2e")) as s:
            yield s


def test_a_request_reaches_the_subscribed_device(served: Served) -> None:
    served.registry.create_device("thermo-1")
    device = DeviceClient("127.0.0.1", served.broker_port, "thermo-1")
    try:
        mid = served.publish({"device_id": "thermo-1", "config": {"setpoint": 21.5}})
        got = device.next(timeout=30)
        assert (got.topic, got.payload, got.qos) == ("/devices/thermo-1/config", b'{"setpoint":21.5}', 1)
    finally:
        device.close()
    cfg = served.registry.get_config("thermo-1")
    assert cfg is not None and cfg.version == 1 and cfg.data == b'{"setpoint":21.5}'
    delivered = wait_for("the function's delivery log",
                         lambda: [e for e in served.log_entries(mid) if e.get("outcome") == "delivered"], timeout=10)
    assert delivered[0]["deviceId"] == "thermo-1" and delivered[0]["version"] == 1
    assert delivered[0]["severity"] == "INFO" and delivered[0]["durationMs"] > 0
    # Configs may carry secrets of their own: sizes are logged, never the data.
    assert "setpoint" not in served.function.log_path.read_text()


def test_a_bad_request_is_acknowledged_and_dead_lettered_with_its_reason(served: Served) -> None:
    mid = served.publish({"device_id": "nobody-home", "config": {"x": 1}})
    letters: list = []

    def dead_lettered() -> bool:
        resp = served.subscriber.pull(subscription=served.dead_letters, max_messages=10, timeout=5)
        if resp.received_messages:
            served.subscriber.acknowledge(subscription=served.dead_letters,
                                          ack_ids=[m.ack_id for m in resp.received_messages])
            letters.extend(m.message for m in resp.received_messages)
        return any(m.attributes.get("sourceMessageId") == mid for m in letters)

    wait_for("the refused request on the dead-letter topic", dead_lettered, timeout=30, interval=0.2)
    letter = next(m for m in letters if m.attributes.get("sourceMessageId") == mid)
    assert letter.attributes["error"] == "unknown_device" and letter.attributes["origin"] == "e2e"
    assert json.loads(letter.data) == {"device_id": "nobody-home", "config": {"x": 1}}
    # Written by the function on the first delivery, not by the subscription after exhausting its attempts.
    assert "CloudPubSubDeadLetterSourceDeliveryCount" not in letter.attributes
    refused = served.log_entries(mid)
    assert [(e["outcome"], e["reason"]) for e in refused] == [("rejected", "unknown_device")]
    assert refused[0]["severity"] == "WARNING"


def test_broker_outage_is_retried_and_yields_one_version(served: Served) -> None:
    served.registry.create_device("thermo-2")
    served.broker.stop()
    mid = served.publish({"device_id": "thermo-2", "config": {"mode": "eco"}})
    # Each failed delivery answers 500; the subscription redelivers the same message id.
    wait_for("two failed deliveries while the broker is down",
             lambda: len([e for e in served.log_entries(mid) if e.get("outcome") == "retry"]),
             lambda v: v >= 2, timeout=60,
             interval=0.2)
    assert served.registry.get_device("thermo-2").config_version == 1

    served.broker = start_broker(served.broker_port, served.workdir)
    device = DeviceClient("127.0.0.1", served.broker_port, "thermo-2")
    try:
        got = device.next(timeout=60)  # retained: arrives whether the retry came before or after the subscribe
        assert got.payload == b'{"mode":"eco"}'
    finally:
        device.close()
    # The device may have its copy before the function logged the broker's PUBACK.
    wait_for("the delivery log", lambda: any(e["outcome"] == "delivered" for e in served.log_entries(mid)),
             timeout=10)
    attempts = served.log_entries(mid)
    assert [e["outcome"] for e in attempts].count("delivered") >= 1, attempts
    assert all(e["outcome"] in {"retry", "delivered"} for e in attempts), attempts
    assert {e["version"] for e in attempts if "version" in e} == {1}
    assert [v.version for v in served.registry.list_config_versions("thermo-2")] == [1]

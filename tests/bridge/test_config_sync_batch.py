"""The bridge service's config sync in a reconnect storm: sync requests waiting together in the config queue are read
from the registry (the Firestore emulator) in batches, yet applied in queue order, each acked once.

The worker runs in-process on a real registry; the broker side is a recorder (what the service published retained,
what it acked), and Pub/Sub is not involved in the sync path."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
from google.cloud.firestore_v1.services.firestore.client import FirestoreClient

from iotbridge import spec
from iotbridge.bridge import service as svc
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.registry import Registry, RegistrySettings

from .conftest import PROJECT, REGION


class Published:
    def wait_for_publish(self, timeout: float) -> None:
        return None

    def is_published(self) -> bool:
        return True


class BrokerRecorder:
    """Stands in for the service's MQTT client: records retained publishes per topic and acks per packet id."""

    def __init__(self) -> None:
        self.retained: dict[str, list[bytes]] = {}
        self.acks: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Published:
        assert retain and qos == 1
        self.retained.setdefault(topic, []).append(payload)
        return Published()

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)


class FanoutMessage:
    def __init__(self) -> None:
        self.outcome = ""

    def ack(self) -> None:
        self.outcome = "ack"

    def nack(self) -> None:
        self.outcome = "nack"


class NoPubSub:
    """The sync path publishes nothing to Pub/Sub: anything that tries fails the test."""

    def __init__(self) -> None:
        self.api = self

    def publish(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        raise AssertionError("the config sync published to Pub/Sub")

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"


@pytest.fixture
def lookups(monkeypatch) -> list[int]:
    """Firestore document lookups (BatchGetDocuments RPCs) made in this process, as bench.firestore_ops counts."""
    calls: list[int] = []
    real = FirestoreClient.batch_get_documents

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FirestoreClient, "batch_get_documents", counted)
    return calls


@pytest.fixture
def deployment(bridge_env) -> Registry:
    own = Registry(PROJECT, f"sync-{uuid.uuid4().hex[:10]}", REGION)
    own.ensure_registry(RegistrySettings())
    return own


def service(registry: Registry) -> tuple[svc.BridgeService, BrokerRecorder]:
    settings = BridgeSettings(project=PROJECT, region=REGION, registry_id=registry.registry_id, prefix="sync")
    bridge = svc.BridgeService(settings, registry=registry, password="x", publisher=cast(Any, NoPubSub()),
                               subscriber=cast(Any, NoPubSub()))
    recorder = BrokerRecorder()
    bridge.mqtt = cast(Any, recorder)
    return bridge, recorder


def run_queue(bridge: svc.BridgeService, items: list[svc.ConfigWork]) -> None:
    """Queue ``items`` first, then let the config worker run them all (a burst that waits in the queue)."""
    for item in items:
        bridge._config_work.put(item)
    bridge._config_work.put(None)
    worker = threading.Thread(target=bridge._config_loop, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "config worker did not finish its queue"


def sync(device_id: str, mid: int, **kw: bool) -> svc.ConfigWork:
    return (device_id, svc.SyncRequest(device_id, mid, 1, 0, **kw))


def config_topic(device_id: str) -> str:
    return spec.device_topic(device_id, spec.CONFIG)


def test_a_sync_burst_is_read_in_batches_across_registries(deployment, lookups):
    lab = Registry(PROJECT, f"lab-{uuid.uuid4().hex[:10]}", REGION, deployment=deployment.registry_id)
    lab.ensure_registry(RegistrySettings())
    own_ids = [f"own-{i}" for i in range(12)]
    lab_ids = [f"lab-{i}" for i in range(8)]
    for registry, ids in ((deployment, own_ids), (lab, lab_ids)):
        for device_id in ids:
            registry.create_device(device_id)
            registry.update_config(device_id, f"cfg {device_id}".encode())
    deployment.create_device("no-config")
    deployment.create_device("empty-config")
    deployment.update_config("empty-config", b"")
    requests = ([sync(d, i) for i, d in enumerate(own_ids + lab_ids)]
                + [sync("no-config", 100), sync("empty-config", 101), sync("never-created", 102),
                   sync("not/an-id", 103)])
    bridge, broker = service(deployment)
    lookups.clear()

    run_queue(bridge, requests)

    # One read of the device index, then per registry one of the devices and one of their configs: 5 lookups for
    # the 24 requests (one at a time, each is 3: the index, the device, its config).
    assert len(lookups) == 5, lookups
    assert broker.acks == list(range(len(own_ids + lab_ids))) + [100, 101, 102, 103]  # in queue order, once each
    for device_id in own_ids + lab_ids:
        assert broker.retained[config_topic(device_id)] == [f"cfg {device_id}".encode()]
    # No config, an empty one nobody subscribed to yet, an unknown device, a bad id: nothing published, still acked.
    assert set(broker.retained) == {config_topic(d) for d in own_ids + lab_ids}


def test_a_burst_larger_than_a_batch_is_read_in_several(deployment, lookups, monkeypatch):
    monkeypatch.setattr(svc, "SYNC_BATCH", 8)
    ids = [f"d-{i}" for i in range(11)]
    for device_id in ids:
        deployment.create_device(device_id)
        deployment.update_config(device_id, device_id.encode())
    bridge, broker = service(deployment)
    lookups.clear()

    run_queue(bridge, [sync(d, i) for i, d in enumerate(ids)])

    assert len(lookups) == 2 * 3  # two batches: index, devices, configs each
    assert broker.acks == list(range(len(ids)))  # in queue order, once each
    assert all(broker.retained[config_topic(d)] == [d.encode()] for d in ids)


def test_work_queued_between_two_syncs_of_a_device_keeps_its_place(deployment):
    """sync, then a config push (committed, its delivery queued), then a forced sync (``again``) of the same device:
    the second sync reads the registry after the push, so the device ends with the pushed config — not with what a
    read made together with the first sync would have found."""
    deployment.create_device("pump")
    deployment.update_config("pump", b"v1")
    deployment.create_device("valve")
    deployment.update_config("valve", b"valve v1")
    bridge, broker = service(deployment)
    delivery = FanoutMessage()

    def push_v2() -> None:
        pushed = deployment.update_config("pump", b"v2", min_interval_s=0)
        bridge._deliver_config("pump", pushed.version, pushed.data, delivery)

    gone = ("valve", lambda: bridge._forget_config("valve", 5, 1, 0))
    items: list[svc.ConfigWork] = [sync("pump", 1), sync("valve", 2), ("pump", push_v2), sync("pump", 3, again=True),
                                   gone, sync("valve", 6, again=True)]
    run_queue(bridge, items)

    assert broker.retained[config_topic("pump")] == [b"v1", b"v2", b"v2"]
    assert delivery.outcome == "ack"
    # The forgotten device's retained config was cleared, then republished by the sync queued after it.
    assert broker.retained[config_topic("valve")] == [b"valve v1", b"", b"valve v1"]
    assert broker.acks == [1, 2, 3, 5, 6]


def test_a_failed_read_fails_each_sync_of_its_batch_and_acks_each(deployment, monkeypatch):
    """As a single read that failed: every sync of the batch is logged as failed and still acked once; the worker
    goes on with the queue."""
    deployment.create_device("pump")
    deployment.update_config("pump", b"v1")
    bridge, broker = service(deployment)
    failing: list[Callable[..., Any]] = []

    def unavailable(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        failing.append(unavailable)
        raise ConnectionError("registry unavailable")

    monkeypatch.setattr(Registry, "get_configs", unavailable)
    logged: list[str] = []
    monkeypatch.setattr(svc.log, "error", lambda msg, *args, **kw: logged.append(msg % args))

    run_queue(bridge, [sync("pump", 1), sync("pump", 2), sync("valve", 3)])

    assert failing and broker.acks == [1, 2, 3]
    assert config_topic("pump") not in broker.retained
    assert sorted(logged) == sorted(f"config sync for {d} failed: registry unavailable"
                                    for d in ("pump", "pump", "valve"))


def test_the_service_broker_connection_does_not_hold_small_writes(stack):
    """TCP_NODELAY on the service's loopback connection: with Nagle, each config it publishes after acking a sync
    request waited for the broker's delayed ACK (about 40 ms), which held a storm's config sync to ~22/s."""
    settings = BridgeSettings(project=PROJECT, region=REGION, registry_id="nodelay", prefix="sync",
                              broker_host=stack.settings.broker_host, broker_port=stack.settings.broker_port,
                              host_id=f"nodelay-{uuid.uuid4().hex[:8]}")
    bridge = svc.BridgeService(settings, registry=cast(Any, None), password=stack.settings.secrets()["bridge"],
                               publisher=cast(Any, NoPubSub()), subscriber=cast(Any, NoPubSub()))
    bridge.mqtt.on_connect = None  # connected only to look at its socket: no subscriptions, nothing to ack
    bridge.mqtt.connect(settings.broker_host, settings.broker_port)
    try:
        sock = bridge.mqtt.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        bridge.mqtt.disconnect()


class Delivered(FanoutMessage):
    """A config version as this host's delivery subscription hands it over (attributes as fanout.publish_config
    sets them)."""

    def __init__(self, device_id: str, version: int, data: bytes, registry_id: str = "") -> None:
        super().__init__()
        self.attributes = spec.FanoutMessage(spec.FANOUT_KIND_CONFIG, device_id, version,
                                             registry_id=registry_id).attributes()
        self.data = data


def test_a_burst_of_config_deliveries_is_read_in_batches_and_applied_in_queue_order(deployment, lookups):
    """A fleet-wide config push: the deliveries waiting in the config queue (with a sync between them) are read
    together, one device index read and per registry one of the devices and one of their configs, instead of a
    registry read per delivery; each device still gets its latest config once, in queue order."""
    lab = Registry(PROJECT, f"lab-{uuid.uuid4().hex[:10]}", REGION, deployment=deployment.registry_id)
    lab.ensure_registry(RegistrySettings())
    own_ids, lab_ids = [f"own-{i}" for i in range(10)], [f"lab-{i}" for i in range(4)]
    pushed: dict[str, Any] = {}
    for registry, ids in ((deployment, own_ids), (lab, lab_ids)):
        for device_id in ids:
            registry.create_device(device_id)
            registry.update_config(device_id, b"v1")
            pushed[device_id] = registry.update_config(device_id, f"v2 {device_id}".encode(), min_interval_s=0)
    bridge, broker = service(deployment)
    messages = [Delivered(d, pushed[d].version, pushed[d].data, "" if d in own_ids else lab.registry_id)
                for d in own_ids + lab_ids]
    backlog = Delivered("own-0", pushed["own-0"].version - 1, b"v1")  # an older version, redelivered late
    unknown = Delivered("never-created", 1, b"x")
    lookups.clear()

    for message in messages[:5]:
        bridge._on_fanout(message)
    bridge._config_work.put(sync("own-1", 1))
    for message in [*messages[5:], backlog, unknown]:
        bridge._on_fanout(message)
    bridge._config_work.put(sync("own-2", 2, again=True))
    run_queue(bridge, [])

    # One read of the device index, then per registry one of the devices and one of their configs: 5 lookups for
    # the 18 deliveries and syncs (one at a time, each delivery of a device not yet cached was 3).
    assert len(lookups) == 5, lookups
    for device_id in own_ids + lab_ids:
        again = [pushed[device_id].data] if device_id == "own-2" else []
        assert broker.retained[config_topic(device_id)] == [pushed[device_id].data, *again], device_id
    assert set(broker.retained) == {config_topic(d) for d in own_ids + lab_ids}
    assert [m.outcome for m in [*messages, backlog, unknown]] == ["ack"] * (len(messages) + 2)
    assert broker.acks == [1, 2]


class Pending:
    """A publish the broker acknowledges only when the config worker waits for it, recording when."""

    def __init__(self, events: list[str], name: str, acknowledged: bool) -> None:
        self.events, self.name, self.acknowledged = events, name, acknowledged

    def wait_for_publish(self, timeout: float) -> None:
        self.events.append(f"wait {self.name}")

    def is_published(self) -> bool:
        return self.acknowledged


class SlowBroker(BrokerRecorder):
    """Records the order of publishes, waits for their acknowledgements and acks; ``lost`` devices' publishes are
    never acknowledged."""

    def __init__(self, lost: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.events: list[str] = []
        self.lost = lost

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any:  # noqa: ANN401
        super().publish(topic, payload, qos, retain)
        name = f"{topic.split('/')[2]}={payload.decode()}"
        self.events.append(f"publish {name}")
        return Pending(self.events, name, topic.split("/")[2] not in self.lost)

    def ack(self, mid: int, qos: int) -> None:
        super().ack(mid, qos)
        self.events.append(f"ack {mid}")


def test_a_batch_sends_its_configs_before_waiting_for_their_acknowledgements(deployment):
    """The broker gets a batch's configs back to back; the worker then waits for them in queue order and acks each
    request after its own config was acknowledged. A device in the batch twice (a sync, a delivery of the version
    the read found, a forced sync) gets its publishes in queue order: the same version, once plus the forced one."""
    for device_id in ("pump", "valve", "fan"):
        deployment.create_device(device_id)
        deployment.update_config(device_id, f"{device_id} v1".encode())
    bridge, _ = service(deployment)
    slow = SlowBroker()
    bridge.mqtt = cast(Any, slow)
    pushed = deployment.update_config("pump", b"pump v2", min_interval_s=0)
    delivery = Delivered("pump", pushed.version, pushed.data)
    bridge._config_work.put(sync("pump", 1))
    bridge._config_work.put(sync("valve", 2))
    bridge._on_fanout(delivery)
    run_queue(bridge, [sync("fan", 3), sync("pump", 4, again=True)])

    assert slow.events == ["publish pump=pump v2", "publish valve=valve v1", "publish fan=fan v1",
                           "publish pump=pump v2",
                           "wait pump=pump v2", "ack 1", "wait valve=valve v1", "ack 2", "wait fan=fan v1", "ack 3",
                           "wait pump=pump v2", "ack 4"]
    assert delivery.outcome == "ack"


def test_a_config_the_broker_does_not_acknowledge_fails_only_its_own_work(deployment, monkeypatch):
    """Its sync is still acked once and its delivery nacked (Pub/Sub redelivers it); the device no longer counts as
    published here, so its next sync publishes again; the other devices of the batch are done."""
    monkeypatch.setattr(svc, "PUBLISH_TIMEOUT_S", 0.1)
    for device_id in ("pump", "valve"):
        deployment.create_device(device_id)
        deployment.update_config(device_id, f"{device_id} v1".encode())
    bridge, _ = service(deployment)
    lost = SlowBroker(lost=frozenset({"pump"}))
    bridge.mqtt = cast(Any, lost)
    delivery = Delivered("pump", 1, b"pump v1")
    bridge._config_work.put(sync("pump", 1))
    bridge._on_fanout(delivery)
    run_queue(bridge, [sync("valve", 2)])

    assert lost.acks == [1, 2] and delivery.outcome == "nack"
    assert list(bridge._published_config) == ["valve"]
    assert bridge.stats["configs"] == 1

    bridge.mqtt = cast(Any, ok := SlowBroker())
    run_queue(bridge, [sync("pump", 3), sync("valve", 4)])
    assert ok.retained == {config_topic("pump"): [b"pump v1"]}  # valve's is there already
    assert ok.acks == [3, 4]

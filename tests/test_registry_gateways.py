"""Gateways and bindings in the device registry, against the real Firestore emulator."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest

from iotbridge.registry import DeviceNotFound, GatewayAuthMethod, GatewayConfig, InvalidBinding, Registry

PROJECT = "local-project"


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> Registry:
    emulator_env(firestore_emulator)
    return Registry(PROJECT, f"gw-{uuid.uuid4().hex[:8]}", "europe-west1")


def _gateway(registry: Registry, method: GatewayAuthMethod = "ASSOCIATION_ONLY") -> str:
    gid = f"gw-{uuid.uuid4().hex[:8]}"
    registry.create_device(gid, gateway_config=GatewayConfig("GATEWAY", method))
    return gid


def test_gateway_config_round_trips_and_defaults_to_non_gateway(registry):
    gid = _gateway(registry, "ASSOCIATION_AND_DEVICE_AUTH_TOKEN")
    gw = registry.get_device(gid)
    assert gw.gateway_config == GatewayConfig("GATEWAY", "ASSOCIATION_AND_DEVICE_AUTH_TOKEN")
    assert gw.gateway_config.is_gateway and gw.bound_gateways == ()
    registry.create_device("plain-device")
    assert registry.get_device("plain-device").gateway_config == GatewayConfig()


def test_unknown_gateway_type_or_method_is_refused():
    with pytest.raises(InvalidBinding):
        GatewayConfig(cast(Any, "ROUTER"))
    with pytest.raises(InvalidBinding):
        GatewayConfig("GATEWAY", cast(Any, "PASSWORD"))


def test_bind_list_check_unbind(registry):
    gid, other = _gateway(registry), _gateway(registry)
    for d in ("dev-a", "dev-b", "dev-c"):
        registry.create_device(d)
    registry.bind_device_to_gateway(gid, "dev-b")
    registry.bind_device_to_gateway(gid, "dev-a")
    registry.bind_device_to_gateway(gid, "dev-a")  # idempotent
    registry.bind_device_to_gateway(other, "dev-a")  # a device may be bound to several gateways
    assert [d.id for d in registry.devices_bound_to(gid)] == ["dev-a", "dev-b"]
    assert registry.get_device("dev-a").bound_gateways == (gid, other)
    assert registry.is_bound(gid, "dev-a") and not registry.is_bound(gid, "dev-c")
    assert not registry.is_bound(gid, "no-such-device")
    registry.unbind_device_from_gateway(gid, "dev-a")
    registry.unbind_device_from_gateway(gid, "dev-a")  # idempotent
    assert [d.id for d in registry.devices_bound_to(gid)] == ["dev-b"]
    assert registry.is_bound(other, "dev-a")


def test_bindings_iot_core_refused(registry):
    gid, gid2 = _gateway(registry), _gateway(registry)
    registry.create_device("not-a-gateway")
    registry.create_device("dev-x")
    with pytest.raises(InvalidBinding, match="not a gateway"):
        registry.bind_device_to_gateway("not-a-gateway", "dev-x")
    with pytest.raises(InvalidBinding, match="is a gateway"):
        registry.bind_device_to_gateway(gid, gid2)
    with pytest.raises(DeviceNotFound):
        registry.bind_device_to_gateway(gid, "missing-device")
    with pytest.raises(DeviceNotFound):
        registry.bind_device_to_gateway("missing-gateway", "dev-x")
    assert registry.get_device("dev-x").bound_gateways == ()


def test_gateway_access_is_recorded(registry, clock):
    gid = _gateway(registry)
    registry.create_device("dev-y")
    when = clock.now()
    registry.record_gateway_access("dev-y", gid, when)
    cfg = registry.get_device("dev-y").gateway_config
    assert cfg.last_accessed_gateway_id == gid and cfg.last_accessed_gateway_time == when
    assert not cfg.is_gateway

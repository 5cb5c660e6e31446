"""``iotctl simulate --gateway`` and ``--http``: the simulated fleet through one gateway, and on the HTTP bridge,
against the running host; every message acknowledged reaches Pub/Sub as the device's own."""

from __future__ import annotations

import uuid

import pytest

from iotbridge.simulate import Fleet

from .conftest import PROJECT, REGION

pytestmark = pytest.mark.emulator


def _fleet(stack, registry, tmp_path, mode) -> Fleet:
    return Fleet(project=PROJECT, region=REGION, registry=registry, host=stack.mqtt_host, port=stack.mqtt_port,
                 ca_certs=str(stack.ca_cert), key_dir=tmp_path / "keys", devices=3, prefix=f"s{uuid.uuid4().hex[:6]}",
                 mode=mode, http_url=stack.http_bridge_url)


@pytest.mark.parametrize("mode", ["gateway", "http"])
def test_fleet_modes_deliver_every_message(stack, registry, reader, tmp_path, mode):
    fleet = _fleet(stack, registry, tmp_path, mode)
    try:
        assert fleet.ensure_registered() == (4 if mode == "gateway" else 3)
        ids = [m.id for m in fleet.members]
        for d in ids:  # a config each, delivered on attach / polled: answered with a state, as the firmware does
            registry.update_config(d, b'{"fan": "auto"}')
        fleet.connect()
        result = fleet.run(rate=20, duration=1)
        assert (result.sent, result.acknowledged) == (20, 20)
        telemetry = reader.pull("telemetry", 20)
        assert sorted(m.attributes["deviceId"] for m in telemetry) == sorted(ids[i % 3] for i in range(20))
        gateways = {m.attributes.get("gatewayId") for m in telemetry}
        assert gateways == ({fleet.gateway_id} if mode == "gateway" else {None})
        states = reader.pull("state", 3, timeout=30)
        assert {m.attributes["deviceId"] for m in states} == set(ids)
    finally:
        fleet.close()

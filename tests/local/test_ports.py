"""``services.free_port``: the ports the local services are started on."""

from __future__ import annotations

import socket
from pathlib import Path

from iotbridge.local import services


def test_free_ports_lie_outside_the_ephemeral_range_and_are_not_handed_out_twice():
    """A port from the kernel's ephemeral range can be given to an outgoing connection between the pick and the
    service's bind ("address already in use", seen on a 6-host test tier); the ports handed out stay below it."""
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [services.free_port() for _ in range(200)]
    assert all(p < low for p in ports), [p for p in ports if p >= low][:5]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and each is bindable
        s.bind((services.LOOPBACK, ports[-1]))

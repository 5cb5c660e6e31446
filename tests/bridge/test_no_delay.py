"""No Nagle on a broker host's loopback TCP connections: each side of them has ``TCP_NODELAY``, looked up on the
running host's own sockets (the processes of the ``stack`` fixture, not a client made for the test).

With Nagle, a small write that follows another unacknowledged one waits for the peer's delayed ACK (about 40 ms on
Linux loopback): the bridge service acking a sync request and then publishing its config, the front publishing one
sync request after another, Mosquitto sending a PUBACK or a device's message right after another."""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iotbridge.bridge.front import Front
from iotbridge.bridge.settings import BridgeSettings
from iotbridge.local.broker_host import BridgeStack
from iotbridge.registry import Registry
from tests.aio import run_in_own_loop

from .conftest import PROJECT, REGION

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (new system calls share one table)


@contextmanager
def tcp_sockets(pid: int) -> Iterator[list[socket.socket]]:
    """Duplicates of process ``pid``'s TCP sockets (pidfd_getfd, Linux 5.6+: the test runs as the processes' user
    or root), closed on exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found: list[socket.socket] = []
    try:
        for fd_path in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if not os.readlink(fd_path).startswith("socket:"):
                    continue
            except FileNotFoundError:  # closed meanwhile
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd_path.name), 0)
            assert fd >= 0, f"pidfd_getfd of {pid}'s fd {fd_path.name}: {os.strerror(ctypes.get_errno())}"
            sock = socket.socket(fileno=fd)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                found.append(sock)
            else:
                sock.close()
        yield found
    finally:
        for sock in found:
            sock.close()
        os.close(pidfd)


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # a listening socket
        return False
    return True


def broker_connections(stack: BridgeStack, role: str) -> dict[tuple[str, int], int]:
    """The ``role`` process's TCP connections to the broker's loopback listener: its local address -> TCP_NODELAY."""
    broker = (stack.settings.broker_host, stack.settings.broker_port)
    deadline = time.monotonic() + 10
    while True:
        with tcp_sockets(stack.procs[role].proc.pid) as socks:
            found = {s.getsockname()[:2]: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                     for s in socks if _connected(s) and s.getpeername()[:2] == broker}
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)  # connected in the background (paho's connect_async)


def test_the_front_connections_to_the_broker_do_not_hold_small_writes(stack):
    """The front process's paho clients: its control connection (a sync request per CONNECT) and its HTTP bridge's
    (a device's HTTP publish after another)."""
    front = broker_connections(stack, "front")
    assert len(front) == 2, f"the front's control and HTTP bridge connections to the broker: {front}"
    assert set(front.values()) == {1}, front


def test_the_service_broker_connection_has_no_delay_on_the_running_host(stack):
    service = broker_connections(stack, "service")
    assert service and set(service.values()) == {1}, service


def test_mosquitto_does_not_hold_small_writes_to_its_loopback_clients(stack):
    """``set_tcp_nodelay true`` in the generated mosquitto.conf: the broker's end of the service's and the front's
    connections (its PUBACKs, the sync requests and device messages it hands the service) has TCP_NODELAY."""
    clients = {**broker_connections(stack, "front"), **broker_connections(stack, "service")}
    broker = (stack.settings.broker_host, stack.settings.broker_port)
    with tcp_sockets(stack.procs["mosquitto"].proc.pid) as socks:
        ends = {s.getpeername()[:2]: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for s in socks if _connected(s) and s.getsockname()[:2] == broker}
    assert set(clients) <= set(ends), (clients, ends)
    assert {peer: ends[peer] for peer in clients} == dict.fromkeys(clients, 1)


def test_device_sessions_on_the_unix_socket_connect_with_the_option_on(stack, devices):
    """The option is global; on the Unix socket (the front's device sessions) Mosquitto 2.0's setsockopt fails: the
    session still connects, and the broker logs a warning for it (the cost docs/broker-scaling.md states; if a newer
    Mosquitto stops logging it, say so there)."""
    device_id = devices.connected().identity.device_id
    log = stack.log_text("mosquitto")
    assert f"New client connected from {stack.settings.broker_socket}" in log and f" as {device_id} " in log
    assert "Unable to set TCP_NODELAY" in log


def test_a_device_session_over_loopback_tcp_has_no_delay(stack):
    """Without a Unix socket (``broker_socket`` empty) a device session reaches Mosquitto over loopback TCP; its
    relay is an asyncio stream, which sets TCP_NODELAY itself (a guard: nothing in the front sets it)."""
    settings = BridgeSettings(project=PROJECT, region=REGION, registry_id="nodelay", prefix="nodelay",
                              broker_host=stack.settings.broker_host, broker_port=stack.settings.broker_port)
    assert not settings.broker_socket
    front = Front(settings, Registry(PROJECT, "nodelay", REGION), ssl.create_default_context(), "unused")

    async def session_option() -> int:
        _, writer = await front.open_broker()
        try:
            return writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            writer.close()

    assert run_in_own_loop(session_option()) == 1

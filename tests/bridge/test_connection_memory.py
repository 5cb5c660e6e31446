"""What a connected device costs the front, checked by structure rather than by a memory figure (the machine's
noise would make one flaky; ``python -m bench.profile_front mem N`` and ``bench connections`` measure it):
its session reaches Mosquitto over the host's Unix socket (no ephemeral port, no TCP socket pair), it holds three
asyncio tasks (the connection's, one per relay direction; the expiry is a timer, the close a future), and its
per-session objects carry no instance dictionary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import socket
import threading
from asyncio import sslproto

import psutil
import pytest

from iotbridge.bridge import front, mqtt
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local import services
from tests.waiting import TimedOut, wait_for

from .conftest import PROJECT, REGION, REGISTRY

DEVICES = 4
TASKS_PER_SESSION = 3


async def _finish_tasks() -> None:
    """Cancel and await what is left of the loop's tasks (the front's loops after ``stop``)."""
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in left:
        t.cancel()
    await asyncio.gather(*left, return_exceptions=True)


def _broker_peers(path: str) -> int:
    """Transports of this process connected to the Unix socket at ``path``."""
    return sum(1 for o in gc.get_objects()
               if isinstance(o, asyncio.Transport) and o.get_extra_info("peername") == path)


@pytest.mark.emulator
def test_a_connected_device_costs_three_tasks_and_a_unix_socket_to_mosquitto(stack, devices, monkeypatch):
    monkeypatch.setattr(sslproto, "SSLProtocol", sslproto.SSLProtocol)  # the front replaces it; undone after
    # A front in this process (the stack's Mosquitto, registry and secrets), so that its tasks and transports can
    # be counted; devices connect to it from paho's threads.
    settings = dataclasses.replace(stack.settings, front_port=services.free_port(), health_port=0, http_port=0)
    assert settings.broker_socket, "the local host gives Mosquitto a Unix socket for the front"
    secrets = settings.secrets()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    fr = front.Front(settings, devices.registry, front.server_ssl_context(settings.tls_cert, settings.tls_key),
                     front_password=secrets["front"], control_password=secrets["bridge"])
    connected: list[Device] = []
    before = 0
    try:
        run(fr.start())
        before = run(tasks())
        for _ in range(DEVICES):
            device_id, key = devices.register()
            d = Device(DeviceIdentity(PROJECT, REGION, REGISTRY, device_id, key, "ES256"), "127.0.0.1",
                       settings.front_port, str(stack.ca_cert))
            d.connect()
            connected.append(d)
        wait_for("sessions", lambda: len(fr.sessions), lambda n: n == DEVICES, timeout=20)
        wait_for("the connects' own tasks to end", lambda: run(tasks()) - before,
                 lambda n: n <= DEVICES * TASKS_PER_SESSION, timeout=10)
        assert run(tasks()) - before == DEVICES * TASKS_PER_SESSION
        # Each session's broker connection is on Mosquitto's Unix socket, and a working one: a PINGREQ goes round.
        assert _broker_peers(settings.broker_socket) == DEVICES
        for d in connected:
            assert d.client.is_connected()
        session = next(iter(fr.sessions))
        assert not hasattr(session, "__dict__") and not hasattr(mqtt.Framer(1), "__dict__")
    finally:
        for d in connected:
            d.disconnect()
        with contextlib.suppress(TimedOut):  # the sessions' own clean-up (presence) before the front stops
            wait_for("the sessions to end", lambda: run(tasks()), lambda n: n <= before, timeout=10)
        run(fr.stop())
        run(_finish_tasks())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.emulator
def test_the_stacks_front_reaches_mosquitto_over_its_unix_socket(stack, devices):
    """The front process of a local host: more devices, no more TCP connections to Mosquitto's port (only the
    front's own control clients hold one), and Mosquitto sees the devices arrive on its Unix socket."""
    proc = psutil.Process(stack.procs["front"].proc.pid)

    def tcp_to_broker() -> int:
        port = stack.settings.broker_port
        return sum(1 for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port == port)

    before = tcp_to_broker()
    ids = []
    for _ in range(DEVICES):
        d = devices.connected()
        ids.append(d.identity.device_id)
    assert tcp_to_broker() == before
    log = stack.log_text("mosquitto")
    for device_id in ids:
        assert f"New client connected from {stack.settings.broker_socket}" in log and f" as {device_id} " in log


def test_a_connect_to_a_unix_socket_with_a_full_backlog_waits_for_room_instead_of_failing_quietly(tmp_path):
    """Beyond its listener's backlog a Unix socket refuses a non-blocking connect (EAGAIN) rather than queueing it;
    asyncio's own open_unix_connection then returns a socket that is not connected. The front's connect waits."""
    path = str(tmp_path / "b.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(2)  # and accepts nothing until the connects are under way
    listener.setblocking(False)

    async def main() -> list[str]:
        attempts = [asyncio.ensure_future(front.open_unix_stream(path, timeout=10)) for _ in range(8)]
        await asyncio.sleep(0.3)
        early = [t for t in attempts if t.done()]
        assert 0 < len(early) < len(attempts)  # the backlog took a few; the others wait for room
        accepted = []
        while not all(t.done() for t in attempts):
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        peers = []
        for t in attempts:
            _, writer = t.result()
            peers.append(writer.get_extra_info("socket").getpeername())  # OSError (ENOTCONN) if never connected
            writer.close()
        for conn in accepted:
            conn.close()
        return peers

    loop = asyncio.new_event_loop()  # not asyncio.run: see test_tls_read_buffer.py
    try:
        assert loop.run_until_complete(main()) == [path] * 8
    finally:
        loop.close()
        listener.close()


def test_a_unix_socket_connect_gives_up_after_its_timeout(tmp_path):
    path = str(tmp_path / "b.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)

    async def main() -> None:
        held = []
        with pytest.raises(TimeoutError, match="backlog full"):
            for _ in range(8):  # nothing is accepted: the backlog fills, then a connect waits and gives up
                held.append(await front.open_unix_stream(path, timeout=0.2))
        assert len(held) < 8
        for _, w in held:
            w.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        listener.close()


def test_the_unix_socket_setting_is_a_path_linux_can_bind_and_mosquitto_listens_on_it(tmp_path):
    from iotbridge.bridge.settings import (
        MAX_UNIX_SOCKET_PATH,
        BridgeSettings,
        mosquitto_config,
        new_secrets,
        write_secrets,
    )
    from iotbridge.local.broker_host import broker_socket_path

    write_secrets(tmp_path / "secrets.json", new_secrets())
    def settings(broker_socket: str = "") -> BridgeSettings:
        return BridgeSettings(project="p", region="r", registry_id="reg", prefix="pre",
                              secrets_file=str(tmp_path / "secrets.json"), broker_socket=broker_socket)

    with pytest.raises(ValueError, match=f"broker_socket must be at most {MAX_UNIX_SOCKET_PATH} bytes"):
        settings("/" + "x" * MAX_UNIX_SOCKET_PATH)
    assert "listener 0 " not in mosquitto_config(settings(), tmp_path / "a")
    both = mosquitto_config(settings(str(tmp_path / "b.sock")), tmp_path / "b")
    assert f"listener 0 {tmp_path / 'b.sock'}\n" in both and "listener 1883 127.0.0.1\n" in both
    # A host folder too deep for a socket address gets its socket in a short folder of its own.
    deep = tmp_path / ("d" * 120)
    path = broker_socket_path(deep)
    assert len(path.encode()) <= MAX_UNIX_SOCKET_PATH and path.endswith("/broker.sock")
    assert broker_socket_path(tmp_path) == str(tmp_path / "mosquitto" / "broker.sock")

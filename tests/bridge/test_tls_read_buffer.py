"""The front's TLS connections share one read buffer: an idle device does not hold a 32 KiB buffer of its own
(bench/connections.py measures the memory per connection), and the data of connections read in turn through
the shared buffer still arrives intact and apart."""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from pathlib import Path

import pytest

from iotbridge.bridge import front
from iotbridge.local.tls import generate_local_tls
from tests.aio import run_in_own_loop

CONNECTIONS = 5
CHUNKS = 40


def test_tls_connections_share_one_read_buffer_and_keep_their_data_apart(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sslproto, "SSLProtocol", sslproto.SSLProtocol)  # undone after the test
    tls = generate_local_tls(tmp_path)
    server_ctx = front.server_ssl_context(str(tls.server_cert), str(tls.server_key))
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    received: dict[int, bytearray] = {}
    buffers: list[object] = []

    async def main() -> None:
        front.share_tls_read_buffer()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await writer.start_tls(server_ctx)  # as the front does: plain TCP, then TLS per connection
            proto = getattr(writer.transport, "_ssl_protocol")  # noqa: B009 - asyncio's, not public
            buffers.append(getattr(proto, "_ssl_buffer"))  # noqa: B009
            first = await reader.readexactly(1)
            data = bytearray(first)
            while chunk := await reader.read(65536):
                data += chunk
            received[first[0]] = data
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
                   for _ in range(CONNECTIONS)]
        # Interleaved writes, each connection's bytes its own: records of all connections go through the one buffer.
        for n in range(CHUNKS):
            for i, (_, w) in enumerate(clients):
                w.write(bytes([i]) * (1000 + 97 * n + i))
                await w.drain()
        for _, w in clients:
            w.close()
            await w.wait_closed()
        for _ in range(200):
            if len(received) == CONNECTIONS:
                break
            await asyncio.sleep(0.05)
        server.close()

    run_in_own_loop(main())
    assert len(buffers) == CONNECTIONS and all(b is buffers[0] for b in buffers)
    for i in range(CONNECTIONS):
        assert received[i] == bytes([i]) * sum(1000 + 97 * n + i for n in range(CHUNKS))

"""A small asyncio TCP proxy for network faults between a client and Redis (no toxiproxy here).

``drop_reply_after(marker)``: the next reply after a request containing ``marker`` is swallowed and the
client connection closed -- the server executed the command, the client never hears back.
``blackhole``: accept connections but forward nothing (a partition).
"""

from __future__ import annotations

import asyncio
import contextlib

from eventflow.embedded import free_port


class FaultProxy:
    """127.0.0.1:port -> upstream, with injectable faults."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.drop_marker: bytes | None = None
        self.dropped = 0
        self.blackhole = False
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply_after(self, marker: bytes) -> None:
        """Arm: swallow the reply to the next request containing marker."""
        self.drop_marker = marker

    async def start(self) -> FaultProxy:
        """Listen."""
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        if self.blackhole:
            with contextlib.suppress(Exception):
                await reader.read()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers.add(up_writer)
        armed = asyncio.Event()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.drop_marker is not None and self.drop_marker in data:
                    self.drop_marker = None
                    armed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if armed.is_set():
                    self.dropped += 1
                    writer.close()
                    up_writer.close()
                    return
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(client_to_server(), server_to_client())
        for w in (writer, up_writer):
            w.close()
            self.writers.discard(w)

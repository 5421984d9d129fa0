"""A loopback TCP proxy a test can cut: ``pause()`` drops every connection and black-holes new
ones (accepted, never answered) until ``resume()``, like a link that goes dark."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``. ``start()``/``stop()``; ``stop()`` is safe twice."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.paused = False
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, sock=sock), self._loop).result(10)
        return self

    def pause(self) -> None:
        self._call(self._pause)

    def resume(self) -> None:
        self._call(self._resume)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._pause)
            if self._server is not None:
                self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _call(self, fn: Callable[[], Any]) -> None:
        async def run() -> None:
            fn()
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _pause(self) -> None:
        self.paused = True
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def _resume(self) -> None:
        self.paused = False
        for w in list(self._held):  # what was sent into the dark never arrives: the client sees a reset
            w.close()
        self._held.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.paused:
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
            self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

"""Request and response bodies without extra copies: the difference between a 40 MB step that takes the time of
the socket and one that takes several times that.

- :func:`read_body` fills one preallocated buffer from the request stream (Starlette's ``body()`` collects the
  chunks and joins them: a second full copy).
- :class:`BufferResponse` sends the safetensors header and the flat parameter buffer as they are (a ``Response``
  needs one joined ``bytes``).
- :class:`LargeBodyProtocol` is uvicorn's httptools protocol with a 4 MiB receive high-water mark instead of
  64 KiB, so a large upload arrives in a few dozen chunks rather than hundreds of pause/resume rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import BadRequest

SMALL_BODY = 1 << 16  # below this, Starlette's own body() is as fast
HIGH_WATER = 4 << 20


async def read_body(request: Request) -> bytes | bytearray:
    """The whole request body, read into one buffer sized by ``Content-Length`` when there is one."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) < SMALL_BODY:
        return await request.body()
    size = int(length)
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    async for chunk in request.stream():
        end = pos + len(chunk)
        if end > size:
            raise BadRequest(f"the body is longer than its Content-Length of {size} bytes")
        view[pos:end] = chunk
        pos = end
    if pos != size:
        raise BadRequest(f"the body ended after {pos} of its {size} bytes")
    return buf


class BufferResponse(Response):
    """A response whose body is a sequence of buffers (bytes or memoryviews), sent without joining them."""

    def __init__(
        self, parts: Sequence[bytes | memoryview], status_code: int, media_type: str, headers: dict[str, str]
    ) -> None:
        super().__init__(b"", status_code=status_code, media_type=media_type, headers=headers)
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.headers["content-length"] = str(sum(len(p) for p in self.parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})  # type: ignore[typeddict-item]
        if not self.parts:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LargeBodyProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, pausing the socket only past 4 MiB of unread body instead of 64 KiB."""

        def on_body(self, body: bytes) -> None:
            if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
                return
            self.cycle.body += body
            if len(self.cycle.body) > HIGH_WATER:
                self.flow.pause_reading()
            self.cycle.message_event.set()

    HTTP_PROTOCOL: type | str = LargeBodyProtocol
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]; fall back to uvicorn's choice
    HTTP_PROTOCOL = "auto"

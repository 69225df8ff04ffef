"""Request headers as the routes read them: by lower-case name, the first of repeated ones (as Starlette's
``Headers.get``), from a Starlette request or straight from an ASGI scope."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class HeaderMap(Protocol):
    """What the routes need of a request's headers (Starlette's ``Headers`` is one)."""

    def get(self, key: str, /) -> str | None: ...


class RawHeaders:
    """An ASGI scope's ``headers`` list as a :class:`HeaderMap`, for the step route that runs without a Starlette
    request (one dict built per request, then lookups by name)."""

    __slots__ = ("_by_name",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        by_name: dict[bytes, bytes] = {}
        for name, value in raw:
            by_name.setdefault(name, value)  # ASGI servers give names in lower case
        self._by_name = by_name

    def get(self, key: str, /) -> str | None:
        value = self._by_name.get(key.encode("latin-1"))
        return None if value is None else value.decode("latin-1")

"""Reading an ASGI request body whole, with a size limit: shared by the mock provider and the proxy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


class BodyTooLarge(Exception):
    """The request body is over the limit (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")
        self.limit = limit


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body; :class:`BodyTooLarge` past ``limit`` bytes, :class:`ClientGone` on disconnect."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge(limit)
        if not message.get("more_body", False):
            return bytes(body)

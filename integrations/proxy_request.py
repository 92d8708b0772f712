"""What the proxy takes from a client's request: headers to forward, who asks, and the body.

One pass over the ASGI headers sorts them: ``x-stigmergy-*`` (ours: agent,
priority, access token) are read and never forwarded; hop-by-hop headers and
those the upstream connection sets itself (host, content-length) are dropped;
``accept-encoding`` becomes ``identity`` so usage can be read from the bytes as
they pass. Everything else goes upstream unchanged, in order.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from stigmergy.integrations.httpx_transport import AGENT_HEADER, KEY_HEADERS, PRIORITY_HEADER, key_hash
from stigmergy.integrations.proxy_upstream import HOP_BY_HOP, Headers

TOKEN_HEADER = "x-stigmergy-token"
OUR_PREFIX = "x-stigmergy-"
#: Set by the upstream connection, or replaced: never copied from the client.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
#: The SDKs announce their timeouts (seconds); a wait in the gate stays well inside them.
TIMEOUT_HEADERS = ("x-stainless-read-timeout", "x-stainless-timeout")
AGENT_CHARS = 64

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


@dataclass(slots=True)
class Incoming:
    """A request's headers, sorted: what goes upstream and what the proxy itself needs."""

    forward: Headers
    agent: str | None = None
    priority: str | None = None
    token: str | None = None
    user_agent: str = ""
    anthropic_version: bool = False
    client_timeout: float | None = None
    credentials: list[tuple[str, str]] = field(default_factory=list)

    def agent_id(self) -> str:
        """The agent named by ``x-stigmergy-agent``, else a fingerprint of credential + user agent."""
        if self.agent:
            return "".join(c if c.isprintable() else "?" for c in self.agent.strip())[:AGENT_CHARS]
        return _fingerprint("\n".join(value for _, value in self.credentials) + "\n" + self.user_agent)

    def key(self) -> str:
        """The credential's short hash: requests with one key share its channel."""
        return _key(tuple(self.credentials)) if self.credentials else "-"

    def authorised(self, token: bytes | None) -> bool:
        """Whether the request carries the access token (always, when none is configured)."""
        if token is None:
            return True
        return self.token is not None and hmac.compare_digest(self.token.encode(), token)


# What sort_headers does with a header, by its lower-case name (any other: forwarded as is).
_AGENT, _PRIORITY, _TOKEN, _CONNECTION, _DROP, _KEY, _USER_AGENT, _ANTHROPIC, _TIMEOUT = range(9)
_ACTIONS: dict[bytes, int] = {
    **{name.encode(): _DROP for name in NOT_FORWARDED},
    b"connection": _CONNECTION,
    **{name.encode(): _KEY for name in KEY_HEADERS},
    b"user-agent": _USER_AGENT,
    b"anthropic-version": _ANTHROPIC,
    **{name.encode(): _TIMEOUT for name in TIMEOUT_HEADERS},
    AGENT_HEADER.encode(): _AGENT,
    PRIORITY_HEADER.encode(): _PRIORITY,
    TOKEN_HEADER.encode(): _TOKEN,
}
_OUR_PREFIX = OUR_PREFIX.encode()


def sort_headers(raw: Iterable[tuple[bytes, bytes]]) -> Incoming:
    """Sort ASGI request headers (lower-case byte names) in one pass."""
    forward: Headers = []
    incoming = Incoming(forward)
    dropped: set[str] = set()
    actions = _ACTIONS
    for raw_name, raw_value in raw:
        lower = raw_name.lower()
        action = actions.get(lower)
        if action is None:
            if not lower.startswith(_OUR_PREFIX):  # other x-stigmergy-* headers: ours, never forwarded
                forward.append((_name(raw_name, lower), raw_value.decode("latin-1")))
            continue
        if action == _DROP:
            continue
        value = raw_value.decode("latin-1")
        if action <= _TOKEN:
            if action == _AGENT:
                incoming.agent = value
            elif action == _PRIORITY:
                incoming.priority = value
            else:
                incoming.token = value
            continue
        if action == _CONNECTION:
            dropped.update(token.strip().lower() for token in value.split(","))
            continue
        name = lower.decode("latin-1")  # a known name: ASCII
        if action == _KEY:
            incoming.credentials.append((name, value))
        elif action == _USER_AGENT:
            incoming.user_agent = value
        elif action == _ANTHROPIC:
            incoming.anthropic_version = True
        elif incoming.client_timeout is None:  # _TIMEOUT: the first one announced
            incoming.client_timeout = _seconds(value)
        forward.append((name, value))
    if dropped:
        forward[:] = [(name, value) for name, value in forward if name not in dropped]
    forward.append(("accept-encoding", "identity"))
    return incoming


def _name(raw: bytes, lower: bytes) -> str:
    """The name as a lower-case str: ``raw.decode("latin-1").lower()``, quicker for ASCII names.

    Every name sort_headers knows is ASCII, and no non-ASCII latin-1 letter lowers to ASCII,
    so matching on bytes-lowered names finds exactly what matching on str-lowered ones did.
    """
    return lower.decode("latin-1") if lower.isascii() else raw.decode("latin-1").lower()


@functools.lru_cache(maxsize=1024)
def _fingerprint(secret: str) -> str:
    """An anonymous agent's name: a hash of its credentials and user agent (cached: one per client)."""
    return "anon-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1024)
def _key(credentials: tuple[tuple[str, str], ...]) -> str:
    """The credential's short hash (cached: a proxy sees few keys)."""
    joined: dict[str, str] = {}  # repeated headers joined as httpx.Headers does, without building one
    for name, value in credentials:
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return key_hash(joined)


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < math.inf else None

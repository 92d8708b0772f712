"""What the proxy takes from a client's request: headers to forward, who asks, and the body.

One pass over the ASGI headers sorts them: ``x-stigmergy-*`` (ours: agent,
priority, access token) are read and never forwarded; hop-by-hop headers and
those the upstream connection sets itself (host, content-length) are dropped;
``accept-encoding`` becomes ``identity`` so usage can be read from the bytes as
they pass. Everything else goes upstream unchanged, in order.
"""

from __future__ import annotations

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
        secret = "\n".join(value for _, value in self.credentials) + "\n" + self.user_agent
        return "anon-" + hashlib.sha256(secret.encode()).hexdigest()[:12]

    def key(self) -> str:
        """The credential's short hash: requests with one key share its channel."""
        joined: dict[str, str] = {}  # repeated headers joined as httpx.Headers does, without building one
        for name, value in self.credentials:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        return key_hash(joined) if joined else "-"

    def authorised(self, token: bytes | None) -> bool:
        """Whether the request carries the access token (always, when none is configured)."""
        if token is None:
            return True
        return self.token is not None and hmac.compare_digest(self.token.encode(), token)


def sort_headers(raw: Iterable[tuple[bytes, bytes]]) -> Incoming:
    """Sort ASGI request headers (lower-case byte names) in one pass."""
    forward: Headers = []
    incoming = Incoming(forward)
    dropped: set[str] = set()
    for raw_name, raw_value in raw:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name.startswith(OUR_PREFIX):
            if name == AGENT_HEADER:
                incoming.agent = value
            elif name == PRIORITY_HEADER:
                incoming.priority = value
            elif name == TOKEN_HEADER:
                incoming.token = value
            continue
        if name in NOT_FORWARDED:
            if name == "connection":
                dropped.update(token.strip().lower() for token in value.split(","))
            continue
        if name in KEY_HEADERS:
            incoming.credentials.append((name, value))
        elif name == "user-agent":
            incoming.user_agent = value
        elif name == "anthropic-version":
            incoming.anthropic_version = True
        elif name in TIMEOUT_HEADERS and incoming.client_timeout is None:
            incoming.client_timeout = _seconds(value)
        forward.append((name, value))
    if dropped:
        forward[:] = [(name, value) for name, value in forward if name not in dropped]
    forward.append(("accept-encoding", "identity"))
    return incoming


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < math.inf else None

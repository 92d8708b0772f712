"""Answers the proxy gives itself, in the error shape of the client's provider.

An SDK parses a proxy's refusal as it would the provider's own error, so its
message reaches the user; ``x-stigmergy-error`` says the proxy answered, not
the upstream. Refusals of the gate are 429s with ``retry-after`` and
``retry-after-ms`` (which every official SDK honours up to 60 s) and, when
waiting cannot help (a spent budget, a quota gone for the day),
``x-should-retry: false``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal

from stigmergy.mock_api import retry_after_headers

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Kind = Literal["rate_limit", "auth", "invalid", "too_large", "not_found", "upstream", "timeout"]

#: kind -> (Anthropic error type, OpenAI type, OpenAI code, Gemini status)
_SHAPES: dict[Kind, tuple[str, str, str | None, str]] = {
    "rate_limit": ("rate_limit_error", "rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    "auth": ("authentication_error", "invalid_request_error", "invalid_access_token", "UNAUTHENTICATED"),
    "invalid": ("invalid_request_error", "invalid_request_error", None, "INVALID_ARGUMENT"),
    "too_large": ("request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"),
    "not_found": ("not_found_error", "invalid_request_error", "not_found", "NOT_FOUND"),
    "upstream": ("api_error", "server_error", "upstream_unreachable", "UNAVAILABLE"),
    "timeout": ("api_error", "server_error", "upstream_timeout", "DEADLINE_EXCEEDED"),
}


def error_body(provider: str, status: int, kind: Kind, message: str) -> dict[str, Any]:
    """``message`` as ``provider``'s error JSON."""
    anthropic, openai_type, code, gemini = _SHAPES[kind]
    if provider == "anthropic":
        return {"type": "error", "error": {"type": anthropic, "message": message}}
    if provider == "gemini":
        return {"error": {"code": status, "message": message, "status": gemini}}
    if provider == "ollama":
        return {"error": message}
    return {"error": {"message": message, "type": openai_type, "param": None, "code": code}}


async def send_error(
    send: Send,
    provider: str,
    status: int,
    kind: Kind,
    message: str,
    *,
    reason: str,
    extra: Sequence[tuple[str, str]] = (),
) -> None:
    """A complete JSON error response from the proxy itself."""
    body = json.dumps(error_body(provider, status, kind, message)).encode()
    headers = [("x-stigmergy-error", reason), *extra]
    await send_bytes(send, body, "application/json", status=status, extra=headers)


async def send_refusal(
    send: Send, provider: str, message: str, *, reason: str, retry_after: float, retryable: bool
) -> None:
    """A 429 from the gate: come back in ``retry_after`` seconds (or, if not ``retryable``, not at all)."""
    extra = retry_after_headers(retry_after)
    if not retryable:
        extra.append(("x-should-retry", "false"))
    await send_error(send, provider, 429, "rate_limit", message, reason=reason, extra=extra)


async def send_json(send: Send, value: Any, *, status: int = 200) -> None:
    await send_bytes(send, json.dumps(value).encode(), "application/json", status=status)


async def send_bytes(
    send: Send, body: bytes, content_type: str, *, status: int = 200, extra: Sequence[tuple[str, str]] = ()
) -> None:
    """A complete response in one go."""
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode("latin-1")) for name, value in extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})

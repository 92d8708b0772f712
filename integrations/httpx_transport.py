"""StigmergyTransport: the official SDKs, paced by the field, with no proxy hop.

    gate = Gate()
    client = AsyncOpenAI(
        max_retries=0,  # the transport retries, at the moments the upstream allows
        http_client=httpx2.AsyncClient(transport=StigmergyTransport(gate=gate, agent_id="planner")),
    )

It works under ``httpx`` clients and under ``httpx2`` ones (what the current openai
and anthropic SDKs take): responses are built by the library of the request.

Every request waits in the gate for its turn, its response's status and rate-limit
headers are deposited as signals, and its usage is read from the body (JSON or SSE)
as it streams past, so its token spend is reconciled exactly. 429/529/5xx answers
and transport errors (resets, timeouts) are retried inside the transport, each
after the hold the upstream asked for; the SDK sees only the final answer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

import httpx

from stigmergy.gate import Cost, Gate, Route, Ticket
from stigmergy.ratelimits import detect_provider, parse_response
from stigmergy.usage import Usage, UsageMeter

logger = logging.getLogger(__name__)

AGENT_HEADER = "x-stigmergy-agent"
PRIORITY_HEADER = "x-stigmergy-priority"
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
RETRIED = ("quota", "overloaded", "transient")


def key_hash(headers: Mapping[str, str]) -> str:
    """Which credential a request uses, as a short hash: channels per key, and keys never stored."""
    for name in KEY_HEADERS:
        if value := headers.get(name):
            key = value.removeprefix("Bearer ").strip()  # the same key, however it is sent
            return hashlib.sha256(key.encode()).hexdigest()[:12]
    return "-"


def describe(body: bytes, default_output: int) -> tuple[str, Cost]:
    """The model and a cost estimate (body bytes / 4, plus the output cap) from a JSON body.

    The prompt is nearly all of a request's body: its size in bytes stands for the
    prompt's characters without encoding the prompt again (a guess either way, until
    the answer's usage corrects it).
    """
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    model = payload.get("model")
    output = (
        payload.get("max_tokens") or payload.get("max_completion_tokens") or payload.get("max_output_tokens")
    )
    if not isinstance(output, int) or isinstance(output, bool) or output < 0:
        output = default_output
    return (model if isinstance(model, str) and model else "-"), Cost(len(body) / 4, float(output))


def provider_of(request: httpx.Request) -> str:
    if request.url.path.endswith("/messages") and "anthropic-version" in request.headers:
        return "anthropic"
    return detect_provider(str(request.url))


def _library(request: Any) -> ModuleType:
    """``httpx`` or ``httpx2``: whichever the request (and so the client) comes from."""
    return sys.modules[type(request).__module__.partition(".")[0]]


class MeteredBody:
    """Passes the body through untouched, timing the first byte and reading usage on the way."""

    def __init__(self, inner: Any, gate: Gate, ticket: Ticket, started: float) -> None:
        self._inner, self._gate, self._ticket, self._started = inner, gate, ticket, started
        self._meter = UsageMeter()
        self._ttft: float | None = None
        self._finished = False

    @property
    def usage(self) -> Usage:
        """The usage read so far (complete once the body ended)."""
        return self._meter.usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if self._ttft is None:
                self._ttft = self._gate.now() - self._started
            self._meter.feed(chunk)
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        usage = self._meter.close()
        cost = self._ticket.cost
        if usage.reported:
            inputs = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
            await self._gate.finish(
                self._ticket, input_tokens=inputs, output_tokens=usage.output_tokens, ttft=self._ttft
            )
        else:  # an interrupted stream: keep the estimate as spent
            await self._gate.finish(
                self._ticket,
                input_tokens=cost.input_tokens,
                output_tokens=cost.output_tokens,
                ttft=self._ttft,
            )


@functools.cache
def _metered_stream(lib: ModuleType) -> type[MeteredBody]:
    """A metering stream that is the library's own AsyncByteStream (its client checks)."""
    return type("MeteredStream", (MeteredBody, lib.AsyncByteStream), {})


class StigmergyTransport(httpx.AsyncBaseTransport):
    """Wraps another transport (default: httpx's own) and runs every request through a :class:`Gate`.

    ``agent_id`` and ``priority`` apply unless a request carries ``x-stigmergy-agent``
    / ``x-stigmergy-priority`` headers (removed before forwarding). ``max_retries``
    counts retries of 429, 529, 5xx answers and transport errors.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        gate: Gate | None = None,
        agent_id: str = "default",
        priority: float = 0.5,
        max_retries: int = 8,
        default_max_tokens: int = 1024,
    ) -> None:
        self._inner = transport
        self._own: dict[str, Any] = {}  # without one: each request library's own transport, made on first use
        self.gate = gate if gate is not None else Gate()
        self.agent_id = agent_id
        self.priority = priority
        self.max_retries = max_retries
        self.default_max_tokens = default_max_tokens
        self.attempts = 0  # requests sent upstream, retries included

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lib = _library(request)
        inner: Any = self._inner
        if inner is None:
            inner = self._own.get(lib.__name__) or self._own.setdefault(
                lib.__name__, lib.AsyncHTTPTransport()
            )
        transport_errors = (httpx.TransportError, lib.TransportError)
        agent_id = request.headers.pop(AGENT_HEADER, None) or self.agent_id
        priority = parse_priority(request.headers.pop(PRIORITY_HEADER, None), self.priority)
        request.headers["accept-encoding"] = "identity"  # usage is read from the bytes as they pass
        body = await request.aread()
        model, cost = describe(body, self.default_max_tokens)
        route = Route(
            f"{request.url.scheme}://{request.url.netloc.decode()}", key_hash(request.headers), model
        )
        provider = provider_of(request)
        retries = self.max_retries if isinstance(request.stream, lib.ByteStream) else 0
        for attempt in range(retries + 1):
            last = attempt == retries
            ticket = await self.gate.acquire(agent_id, route, priority, cost)
            started = self.gate.now()
            try:
                self.attempts += 1
                response = await inner.handle_async_request(request)
            except transport_errors as exc:
                self.gate.release(ticket)
                await self.gate.report_error(route)
                logger.info("%s: %s (attempt %d)", route.region, type(exc).__name__, attempt + 1)
                if last:
                    raise
                continue
            except BaseException:
                self.gate.release(ticket)
                raise
            if response.status_code < 400:
                info = parse_response(
                    provider, response.status_code, response.headers, None, now=self.gate.wall()
                )
                await self.gate.observe(route, info)
                return lib.Response(  # type: ignore[no-any-return]
                    response.status_code,
                    headers=response.headers,
                    stream=_metered_stream(lib)(response.stream, self.gate, ticket, started),
                    extensions=response.extensions,
                    request=request,
                )
            try:
                error_body = await response.aread()
            finally:
                await response.aclose()
                self.gate.release(ticket)
            info = parse_response(
                provider, response.status_code, response.headers, error_body, now=self.gate.wall()
            )
            await self.gate.observe(route, info)
            if info.outcome not in RETRIED or last:
                return lib.Response(  # type: ignore[no-any-return]
                    response.status_code,
                    headers=response.headers,
                    content=error_body,
                    extensions=response.extensions,
                    request=request,
                )
            logger.info(
                "%s: %d %s (attempt %d), retrying",
                route.region,
                response.status_code,
                info.outcome,
                attempt + 1,
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        for transport in [self._inner, *self._own.values()]:
            if transport is not None:
                await transport.aclose()


def parse_priority(value: Any, default: float) -> float:
    """A priority header's value in [0, 1]; the default for anything unreadable."""
    try:
        priority = float(value) if value is not None else default
    except ValueError:
        return default
    return min(1.0, max(0.0, priority)) if priority == priority else default

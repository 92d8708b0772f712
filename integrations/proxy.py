"""``stigmergy proxy``: a transparent LLM API proxy that paces every request through the field.

Agents change only their base URL (``ANTHROPIC_BASE_URL=http://127.0.0.1:8765``,
``OPENAI_BASE_URL=http://127.0.0.1:8765/v1``); the proxy forwards each request to
the one configured upstream once the :class:`~stigmergy.gate.Gate` admits it, and
deposits what the upstream answered (rate-limit headers, 429s, overloads, latency,
usage) back into the field, where every waiting request feels it.

- The request goes upstream as sent (method, path, query, body, headers) less
  hop-by-hop and ``x-stigmergy-*`` headers; the answer comes back with its status and
  headers, the body relayed chunk by chunk as it arrives, usage read on the way.
- 429/529/5xx answers, resets and timeouts are retried in place, after the hold the
  upstream asked for, but only while nothing has reached the client: the first
  chunk of a success is read before its status line is sent.
- A refusal of the gate (budget spent, quota gone, waited too long) is a 429 with
  ``retry-after`` / ``retry-after-ms``; a client that disconnects cancels its wait or
  its upstream request at once.

:func:`create_proxy_app` builds the ASGI app; ``stigmergy.integrations.proxy_server``
serves it. The parts live in ``proxy_*`` modules beside this one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from stigmergy.asgi import BodyTooLarge, ClientGone, read_body
from stigmergy.backends.urls import backend_from_url
from stigmergy.budgets import TokenBudgets
from stigmergy.clock import AcceleratedClock, Clock
from stigmergy.errors import AdmissionError, AdmissionTimeoutError, BudgetExceededError, QuotaExhaustedError
from stigmergy.gate import Cost, Gate, Route, Ticket, gate_field
from stigmergy.integrations.httpx_transport import RETRIED, MeteredBody, describe, parse_priority, provider_of
from stigmergy.integrations.proxy_config import ProxyConfig
from stigmergy.integrations.proxy_metrics import ProxyMetrics, RequestRecord, prometheus, redact_query
from stigmergy.integrations.proxy_request import Incoming, sort_headers
from stigmergy.integrations.proxy_responses import Kind, Send, send_bytes, send_error, send_json, send_refusal
from stigmergy.integrations.proxy_upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamBody,
    UpstreamResponse,
    finish,
    forwarded_response_headers,
    read_error_body,
)
from stigmergy.ratelimits import RateLimitInfo, parse_response
from stigmergy.usage import Usage

__all__ = ["ProxyApp", "ProxyConfig", "create_proxy_app"]

logger = logging.getLogger("stigmergy.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

OPERATIONS = "/_stigmergy/"
#: A request waits in the gate for at most this share of the timeout its SDK announced,
#: then gets a 429 with retry-after instead of timing out.
WAIT_SHARE = 0.75
#: A spent budget does not refill by itself; the SDKs are told not to retry (x-should-retry: false).
BUDGET_RETRY_AFTER = 60.0
#: What nginx logs for a client that closed its request.
CLIENT_CLOSED = 499
#: A scope extension of ``ProxyProtocol``: ``{"callbacks": [...]}``, a list the app puts
#: callbacks in, called when the client disconnects before its answer is complete. It
#: spares a watcher task per request (waiting in ``receive()``), which cost about a fifth
#: of the proxy's own CPU per request.
DISCONNECT_EXTENSION = "stigmergy.http.disconnect"


@dataclass(slots=True)
class Call:
    """One request on its way through the proxy, and what became of it."""

    method: str
    target: str  # path and query, as sent
    incoming: Incoming
    body: bytes
    provider: str
    agent: str
    priority: float
    route: Route
    cost: Cost
    arrived: float  # perf_counter
    status: int = 0
    outcome: str = "ok"
    attempts: int = 0
    waited: float = 0.0  # seconds in the gate
    upstream: float = 0.0  # seconds waiting for the upstream's status and first chunk
    first_byte: float | None = None  # perf_counter when the status line went to the client
    complete: bool = False
    usage: Usage | None = None

    def record(self, path: str, query: str) -> RequestRecord:
        done = time.perf_counter()
        usage = self.usage or Usage()
        return RequestRecord(
            agent=self.agent,
            channel=self.route.region,
            method=self.method,
            path=path + ("?" + redact_query(query) if query else ""),
            status=self.status,
            outcome=self.outcome,
            attempts=self.attempts,
            wait_ms=round(1000 * self.waited, 3),
            overhead_ms=self.overhead_ms(),
            duration_ms=round(1000 * (done - self.arrived), 3),
            input_tokens=usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
        )

    def overhead_ms(self) -> float | None:
        """The proxy's own time before the status line went out (not waiting, not upstream)."""
        if self.first_byte is None:
            return None
        return round(1000 * max(0.0, self.first_byte - self.arrived - self.waited - self.upstream), 3)

    def count(self, metrics: ProxyMetrics, path: str, query: bytes) -> None:
        """Count the finished request; its log line (and the record behind it) only if INFO is on."""
        if logger.isEnabledFor(logging.INFO):
            metrics.record(self.record(path, query.decode("latin-1")))
            return
        usage = self.usage
        metrics.count(
            self.status,
            self.outcome,
            round(1000 * self.waited, 3),
            self.overhead_ms(),
            0 if usage is None else usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
            0 if usage is None else usage.output_tokens,
        )


@functools.lru_cache(maxsize=1024)
def _provider(url: str, anthropic_version: bool) -> str:
    """The transport's rule (Anthropic's ``/messages`` by its version header, else by URL), cached."""
    headers = {"anthropic-version": "-"} if anthropic_version else {}
    return provider_of(httpx.Request("POST", url, headers=headers))


@functools.cache
def _cancel_scope() -> type[anyio.CancelScope]:
    """The running backend's CancelScope class (asyncio's: the proxy runs on asyncio only).

    ``anyio.CancelScope()`` looks the backend up on every call (sniffio, a few microseconds);
    the class it returns is the same every time, so the proxy looks it up once.
    """
    return type(anyio.CancelScope())


class ProxyApp:
    """The proxy as an ASGI 3 app: forwards to ``config.upstream`` through a gate.

    ``clock`` drives the gate (an :class:`AcceleratedClock` shared with a mock upstream
    makes minute-long windows pass in seconds in tests). Call :meth:`aclose` (or let
    the server's lifespan shutdown do it) to close the upstream session and the field.
    """

    def __init__(self, config: ProxyConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        budgets = None
        if config.agent_budget is not None or config.total_budget is not None:
            budgets = TokenBudgets(per_agent=config.agent_budget, total=config.total_budget)
        self.gate = Gate(
            gate_field(backend_from_url(config.redis)) if config.redis else None,
            threshold=config.wake_threshold,
            max_in_flight=config.max_in_flight,
            max_wait=config.max_wait,
            limits=config.limits,
            latency_target=config.latency_target,
            budgets=budgets,
            clock=clock,
        )
        self.metrics = ProxyMetrics()
        self.upstream = Upstream(config)
        self._speed = clock.speed if isinstance(clock, AcceleratedClock) else 1.0
        self._token = config.access_token.encode() if config.access_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def aclose(self) -> None:
        """Close the upstream connections and the field."""
        await self.upstream.aclose()
        await self.gate.field.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            kind = (await receive())["type"]
            if kind == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _provider_of(self, path: str, incoming: Incoming) -> str:
        return self.config.provider or _provider(self.upstream.base + path, incoming.anthropic_version)

    # -- one request ------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        raw_path: bytes = scope.get("raw_path") or path.encode()
        query: bytes = scope.get("query_string", b"")
        if method == "CONNECT" or not raw_path.startswith(b"/"):
            message = f"this proxy forwards to {self.upstream.base} only: no CONNECT, no absolute URIs"
            await send_error(
                send, self.config.provider_name, 400, "invalid", message, reason="foreign-target"
            )
            return
        incoming = sort_headers(scope["headers"])
        provider = self._provider_of(path, incoming)
        if not incoming.authorised(self._token):
            message = "missing or wrong x-stigmergy-token: this proxy requires its access token"
            await send_error(send, provider, 401, "auth", message, reason="access-token")
            return
        if path.startswith(OPERATIONS):
            await self._operations(method, path, send, provider)
            return
        try:
            body = await read_body(receive, self.config.max_body_bytes)
        except ClientGone:
            return
        except BodyTooLarge as exc:
            message = f"the request body exceeds the proxy's limit of {exc.limit} bytes"
            await send_error(send, provider, 413, "too_large", message, reason="body-too-large")
            return
        model, cost = describe(body, self.config.default_max_tokens)
        target = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        call = Call(
            method,
            target,
            incoming,
            body,
            provider,
            incoming.agent_id(),
            parse_priority(incoming.priority, 0.5),
            Route(self.upstream.base, incoming.key(), model),
            cost,
            arrived,
        )
        self.metrics.in_flight += 1
        try:
            with _cancel_scope()() as cancel:
                hooks = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
                if hooks is not None:  # the server calls us when the client goes: no watcher
                    hooks["callbacks"].append(functools.partial(self._disconnected, call, cancel))
                    await self._forward(call, send)
                    return
                # A bare task for the watcher, not a task group: this runs for every request, and
                # the proxy runs on asyncio only (uvicorn, its upstream connections). Cancelled
                # unfinished is fine: it only ever waits in receive().
                watcher = asyncio.ensure_future(self._watch_disconnect(receive, call, cancel))
                try:
                    await self._forward(call, send)
                finally:
                    watcher.cancel()
        finally:
            self.metrics.in_flight -= 1
            call.count(self.metrics, path, query)

    @classmethod
    async def _watch_disconnect(cls, receive: Receive, call: Call, scope: anyio.CancelScope) -> None:
        """Wait for the client to go (on a server without :data:`DISCONNECT_EXTENSION`)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        cls._disconnected(call, scope)

    @staticmethod
    def _disconnected(call: Call, scope: anyio.CancelScope) -> None:
        """Cancel the request the moment its client goes: its wait, or its upstream request."""
        if not call.complete:
            call.status, call.outcome = CLIENT_CLOSED, "disconnected"
            scope.cancel()

    async def _forward(self, call: Call, send: Send) -> None:
        retries = self.config.max_retries
        for attempt in range(retries + 1):
            try:
                ticket = await self._admit(call)
            except AdmissionError as exc:
                await self._refuse(call, send, exc)
                return
            try:
                if await self._attempt(call, ticket, send, last=attempt == retries):
                    return
            finally:
                self.gate.release(ticket)  # a no-op unless the attempt ended without releasing it
            self.metrics.retries += 1

    async def _admit(self, call: Call) -> Ticket:
        """Wait for the gate, at most :data:`WAIT_SHARE` of the client's timeout."""
        timeout = call.incoming.client_timeout
        limit = WAIT_SHARE * timeout if timeout else None
        started = time.perf_counter()
        try:
            if limit is None:  # no deadline announced: no cancel scope on the way in and out
                return await self.gate.acquire(call.agent, call.route, call.priority, call.cost)
            with anyio.fail_after(limit):
                return await self.gate.acquire(call.agent, call.route, call.priority, call.cost)
        except TimeoutError as exc:
            if isinstance(exc, AdmissionError):
                raise
            raise AdmissionTimeoutError(
                f"waited {limit:.1f}s for {call.route.region}, {WAIT_SHARE:.0%} of the client's timeout"
            ) from None
        finally:
            call.waited += time.perf_counter() - started

    async def _attempt(self, call: Call, ticket: Ticket, send: Send, *, last: bool) -> bool:
        """Send once; True when the client has its answer, False to try again."""
        call.attempts += 1
        sent, started = time.perf_counter(), self.gate.now()
        try:
            response = await self.upstream.send(call.method, call.target, call.incoming.forward, call.body)
        except UPSTREAM_ERRORS as exc:
            return await self._failed(call, ticket, send, exc, sent, last=last)
        try:
            try:
                if response.status >= 400:
                    head, whole = await read_error_body(response)
                else:
                    head, whole = await response.readany(), False
            except UPSTREAM_ERRORS as exc:
                return await self._failed(call, ticket, send, exc, sent, last=last)
            call.upstream += time.perf_counter() - sent
            body = UpstreamBody(response, head)
            error = head if whole else None
            info = parse_response(
                call.provider, response.status, response.headers, error, now=self.gate.wall()
            )
            if response.status >= 400:
                self.gate.release(ticket)
                await self.gate.observe(call.route, info)
                if whole and not last and self._retry(info):
                    logger.info("%s: %d %s, retrying", call.route.region, response.status, info.outcome)
                    return False
                await self._relay(call, send, response, body)
                return True
            await self.gate.observe(call.route, info)
            metered = MeteredBody(body, self.gate, ticket, started)
            await self._relay(call, send, response, metered)
            call.usage = metered.usage
            return True
        finally:
            finish(response)

    async def _failed(
        self, call: Call, ticket: Ticket, send: Send, exc: BaseException, sent: float, *, last: bool
    ) -> bool:
        """No answer (refused, reset, timed out): pause the channel; retry, or tell the client if last."""
        call.upstream += time.perf_counter() - sent
        self.gate.release(ticket)
        await self.gate.report_error(call.route)
        logger.info("%s: %s (attempt %d)", call.route.region, type(exc).__name__, call.attempts)
        if last:
            await self._unreachable(call, send, exc)
        return last

    def _retry(self, info: RateLimitInfo) -> bool:
        """Retry in place if the upstream says so, and not after a deadline beyond ``max_backoff``."""
        if info.outcome not in RETRIED:
            return False
        return (
            info.retry_at is None
            or (info.retry_at - self.gate.wall()) / self._speed <= self.config.max_backoff
        )

    async def _relay(
        self, call: Call, send: Send, response: UpstreamResponse, body: UpstreamBody | MeteredBody
    ) -> None:
        """Status, headers, then the body chunk by chunk; the upstream response is closed in any case."""
        try:
            headers = forwarded_response_headers(response.raw_headers)
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            call.status, call.first_byte = response.status, time.perf_counter()
            try:
                async for chunk in body:
                    last = response.at_eof()  # then the body ends with this message: one send less
                    call.complete = last
                    await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            except UPSTREAM_ERRORS as exc:
                # Too late to retry: leave the response unfinished, so the client sees a broken
                # connection rather than a clean end to a truncated body.
                call.outcome = "broken_stream"
                logger.warning(
                    "%s: the upstream broke off the body: %s", call.route.region, type(exc).__name__
                )
                return
            if not call.complete:
                call.complete = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with _cancel_scope()(shield=True):
                await body.aclose()

    async def _refuse(self, call: Call, send: Send, exc: AdmissionError) -> None:
        """The gate will not forward: a 429 saying when to come back (or not to)."""
        if isinstance(exc, BudgetExceededError):
            reason, retry_after, retryable = "budget", BUDGET_RETRY_AFTER, False
        elif isinstance(exc, QuotaExhaustedError):
            until = exc.until if exc.until is not None else self.gate.wall() + 3600.0
            reason, retry_after, retryable = "quota", (until - self.gate.wall()) / self._speed, False
        else:
            explanation = await self.gate.explain(call.route)
            wait = explanation.next_admission_in or explanation.reading.hold or 1.0
            reason, retry_after, retryable = "wait", wait / self._speed, True
        call.status, call.outcome = 429, "refused"
        await send_refusal(
            send, call.provider, str(exc), reason=reason, retry_after=retry_after, retryable=retryable
        )

    async def _unreachable(self, call: Call, send: Send, exc: BaseException) -> None:
        timeout = isinstance(exc, TimeoutError)
        call.status, call.outcome = (504 if timeout else 502), "upstream_error"
        what = "did not answer in time" if timeout else f"could not be reached ({type(exc).__name__})"
        message = f"the upstream {self.upstream.base} {what} after {call.attempts} attempts"
        kind: Kind = "timeout" if timeout else "upstream"
        await send_error(send, call.provider, call.status, kind, message, reason="upstream-unreachable")

    # -- operations ---------------------------------------------------------------------------

    async def _operations(self, method: str, path: str, send: Send, provider: str) -> None:
        """``/_stigmergy/health``, ``/_stigmergy/metrics`` (JSON) and ``/_stigmergy/prometheus``."""
        name = path.removeprefix(OPERATIONS)
        if method != "GET" or name not in ("health", "metrics", "prometheus"):
            message = f"no {method} {path}: try GET {OPERATIONS}health, metrics or prometheus"
            await send_error(send, provider, 404, "not_found", message, reason="not-found")
            return
        if name == "health":
            await send_json(send, {"status": "ok", "upstream": self.upstream.base, "provider": provider})
            return
        snapshot = await self.metrics.snapshot(self.gate, self.upstream.base, self.config.provider_name)
        if name == "metrics":
            await send_json(send, snapshot)
        else:
            text = prometheus(snapshot).encode()
            await send_bytes(send, text, "text/plain; version=0.0.4; charset=utf-8")


def create_proxy_app(config: ProxyConfig, *, clock: Clock | None = None) -> ProxyApp:
    """The proxy as an ASGI app for ``config`` (see :class:`ProxyApp`)."""
    return ProxyApp(config, clock=clock)

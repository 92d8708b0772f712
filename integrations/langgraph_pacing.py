"""Model calls paced by the runtime's gate, for adapters that see calls but not HTTP.

Framework hooks (LangChain's rate limiter and callbacks, CrewAI's ``BaseLLM``) see
a model call start, end with usage, or fail with an SDK exception, never the
response itself. :class:`Pacer` turns those into the gate's signals: a call waits
for admission on its route, its usage reconciles the token windows, its time to
first token feeds the latency pressure, and an error's status and headers (read
from the exception, as the SDKs attach the HTTP response) become holds and back-off.

Framework-neutral: the LangGraph and CrewAI adapters both build on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from stigmergy.gate import Cost, Gate, Route, Ticket
from stigmergy.integrations.langgraph_runtime import FieldRuntime
from stigmergy.ratelimits import Outcome, detect_provider, parse_response

#: Outcomes after which a call may be tried again once the gate admits it.
RETRIED: tuple[Outcome, ...] = ("quota", "overloaded", "transient")
_TRANSPORT_WORDS = ("connection", "timeout", "timedout")


@dataclass(eq=False, slots=True)
class ModelCall:
    """One admitted model call: its gate ticket, and when it was admitted and its first token came."""

    ticket: Ticket
    admitted: float
    first_token: float | None = None


class Pacer:
    """One agent's model calls on one route, admitted by the shared gate from any thread or loop.

    ``route`` names the channel (a :class:`~stigmergy.gate.Route`, or its upstream
    as a string); ``cost`` is the per-call estimate reserved in the token windows
    until the real usage arrives. ``provider`` selects the rate-limit header
    dialect (default: detected from the route's upstream).
    """

    def __init__(
        self,
        agent_id: str,
        route: Route | str = "llm",
        *,
        priority: float = 0.5,
        cost: Cost | None = None,
        provider: str | None = None,
        runtime: FieldRuntime | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.route = Route(route) if isinstance(route, str) else route
        self.priority = priority
        self.cost = cost or Cost()
        self.provider = provider or detect_provider(self.route.upstream)
        self.runtime = runtime if runtime is not None else FieldRuntime.default()

    @property
    def gate(self) -> Gate:
        return self.runtime.gate

    async def aadmit(self, cost: Cost | None = None, agent_id: str | None = None) -> ModelCall:
        """Wait for admission without blocking the caller's loop (``cost``: this call's estimate)."""
        args = (agent_id or self.agent_id, self.route, self.priority, cost or self.cost)
        return ModelCall(await self.runtime.acall(self.gate.acquire, *args), self.gate.now())

    def admit(self, cost: Cost | None = None, agent_id: str | None = None) -> ModelCall:
        """Wait for admission, blocking this thread (refused on a thread that runs an event loop)."""
        args = (agent_id or self.agent_id, self.route, self.priority, cost or self.cost)
        return ModelCall(self.runtime.call(self.gate.acquire, *args), self.gate.now())

    def first_token(self, call: ModelCall) -> None:
        if call.first_token is None:
            call.first_token = self.gate.now()

    def succeeded(
        self,
        call: ModelCall,
        *,
        input_tokens: float | None = None,
        output_tokens: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> concurrent.futures.Future[None]:
        """Deposit a finished call: its usage (else the estimate), time to first token, any headers."""
        ttft = (call.first_token if call.first_token is not None else self.gate.now()) - call.admitted
        estimate = call.ticket.cost
        inputs = estimate.input_tokens if input_tokens is None else input_tokens
        outputs = estimate.output_tokens if output_tokens is None else output_tokens
        return self.runtime.submit(self._succeeded, call.ticket, inputs, outputs, ttft, headers)

    async def _succeeded(
        self, ticket: Ticket, inputs: float, outputs: float, ttft: float, headers: Mapping[str, str] | None
    ) -> None:
        if headers:
            info = parse_response(self.provider, 200, headers, None, now=self.gate.wall())
            await self.gate.observe(self.route, info)
        await self.gate.finish(ticket, input_tokens=inputs, output_tokens=outputs, ttft=ttft)

    def failed(
        self, call: ModelCall | None, error: BaseException
    ) -> concurrent.futures.Future[Outcome | None]:
        """Deposit a failed call: what its HTTP status and headers say, or a transport error's pause.

        The future's result is the outcome (``quota``, ``overloaded``, ``transient``,
        ...), or None for an error that did not come from the upstream.
        """
        return self.runtime.submit(self._failed, None if call is None else call.ticket, error)

    async def afailed(self, call: ModelCall | None, error: BaseException) -> Outcome | None:
        return await asyncio.wrap_future(self.failed(call, error))

    async def _failed(self, ticket: Ticket | None, error: BaseException) -> Outcome | None:
        try:
            answer = http_answer(error)
            if answer is not None:
                status, headers, body = answer
                info = parse_response(self.provider, status, headers, body, now=self.gate.wall())
                await self.gate.observe(self.route, info)
                return info.outcome
            if is_transport_error(error):
                await self.gate.report_error(self.route)
                return "transient"
            return None
        finally:
            if ticket is not None:
                self.gate.release(ticket)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_answer(error: BaseException) -> tuple[int, Mapping[str, str], bytes | None] | None:
    """The HTTP status, headers and body an SDK error carries (openai, anthropic, httpx), if any."""
    for exc in _chain(error):
        response = getattr(exc, "response", None)
        status = getattr(exc, "status_code", None)
        if not isinstance(status, int):
            status = getattr(response, "status_code", None)
        if isinstance(status, int) and not isinstance(status, bool):
            headers = getattr(response, "headers", None)
            return status, headers if isinstance(headers, Mapping) else {}, _body(exc, response)
    return None


def _body(exc: BaseException, response: Any) -> bytes | None:
    try:
        content = getattr(response, "content", None)
    except httpx.ResponseNotRead:
        content = None
    if isinstance(content, bytes):
        return content
    body = getattr(exc, "body", None)  # the SDKs keep the parsed error body
    return json.dumps(body).encode() if isinstance(body, dict) else None


def is_transport_error(error: BaseException) -> bool:
    """A reset, refused connection or timeout: the request may never have reached the upstream."""
    for exc in _chain(error):
        if isinstance(exc, TimeoutError | ConnectionError | httpx.TransportError):
            return True
        if any(word in type(exc).__name__.lower() for word in _TRANSPORT_WORDS):
            return True
    return False

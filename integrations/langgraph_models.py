"""LangChain chat models paced by the shared field: a rate limiter and its callback handler.

``BaseChatModel(rate_limiter=...)`` calls the limiter before every model call but
tells it nothing about the call and has no release hook, so the limiter comes with
a callback handler (:attr:`StigmergyRateLimiter.callback`) that sees the rest:

    limiter = StigmergyRateLimiter("writer", Route("https://api.openai.com", model="gpt-4o-mini"))
    model = ChatOpenAI(model="gpt-4o-mini", rate_limiter=limiter, callbacks=[limiter.callback])

The handler runs inline, so when a call starts it leaves a slot in the call's
context with a cost estimate from the prompt; the limiter's wait in the gate
(:meth:`~StigmergyRateLimiter.aacquire`) takes that slot, and the call's end or
error, matched by run id, settles it: usage reconciles the token windows, time to
first token feeds the latency pressure, a 429's or 529's status and headers (the
SDK exception carries the HTTP response) hold the channel. ``ChatOpenAI(...,
include_response_headers=True)`` also lets successful calls report the upstream's
limits. Calls the handler could not match (a batch of prompts in one call) settle
in arrival order, which is exact as every ticket of one limiter costs the same.
"""

from __future__ import annotations

import collections
import contextvars
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from stigmergy.gate import Cost, Route
from stigmergy.integrations.langgraph_pacing import ModelCall, Pacer
from stigmergy.integrations.langgraph_runtime import FieldRuntime, extra_required

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.outputs import LLMResult
    from langchain_core.rate_limiters import BaseRateLimiter
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise extra_required("langgraph", exc) from exc

#: Output tokens reserved for a call whose parameters name no maximum.
DEFAULT_MAX_TOKENS = 1024
#: How long a non-blocking ``acquire(blocking=False)`` may wait for the gate, in seconds.
NONBLOCKING_WAIT = 0.05


@dataclass(eq=False, slots=True)
class _Slot:
    """A model call between its start (the handler) and its admission (the limiter)."""

    limiter: StigmergyRateLimiter
    cost: Cost
    call: ModelCall | None = None


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("stigmergy_model_call", default=None)


class StigmergyRateLimiter(BaseRateLimiter):
    """A LangChain rate limiter whose every acquisition waits in the shared gate.

    ``agent_id`` and ``route`` name who calls and which channel (upstream, key,
    model); ``cost`` is the estimate used when the handler is not attached.
    Attach :attr:`callback` to the same model, or usage, latency and errors are
    never deposited and tickets stay in flight.

    :meth:`aacquire` waits without blocking the loop. :meth:`acquire` (sync model
    calls) blocks its thread while it waits, so it refuses, with a RuntimeError, to
    run on a thread that runs an event loop: call the model with ``ainvoke`` there.
    LangGraph runs sync nodes in worker threads, where ``invoke`` is fine.
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
        self.pacer = Pacer(agent_id, route, priority=priority, cost=cost, provider=provider, runtime=runtime)
        self.callback = StigmergyCallbackHandler(self)
        self._unmatched: collections.deque[ModelCall] = collections.deque()

    def acquire(self, *, blocking: bool = True) -> bool:
        """Wait in the gate, blocking this thread (refused on an event loop's thread)."""
        slot = self._slot()
        if blocking:
            self._place(slot, self.pacer.admit(slot.cost if slot else None))
            return True
        return self.pacer.runtime.call(self._try, slot)

    async def aacquire(self, *, blocking: bool = True) -> bool:
        """Wait in the gate without blocking the loop."""
        slot = self._slot()
        if blocking:
            self._place(slot, await self.pacer.aadmit(slot.cost if slot else None))
            return True
        return await self.pacer.runtime.acall(self._try, slot)

    async def _try(self, slot: _Slot | None) -> bool:
        """``blocking=False``: admitted only if the gate lets the call go within NONBLOCKING_WAIT."""
        with anyio.move_on_after(NONBLOCKING_WAIT):
            self._place(slot, await self.pacer.aadmit(slot.cost if slot else None))
            return True
        return False

    def _slot(self) -> _Slot | None:
        slot = _SLOT.get()
        return slot if slot is not None and slot.limiter is self and slot.call is None else None

    def _place(self, slot: _Slot | None, call: ModelCall) -> None:
        if slot is not None:
            slot.call = call
        else:
            self._unmatched.append(call)

    def take(self, slot: _Slot | None) -> ModelCall | None:
        """The admitted call a finished run settles: its own, else the oldest unmatched one."""
        if slot is not None and slot.call is not None:
            return slot.call
        try:
            return self._unmatched.popleft()
        except IndexError:
            return None


class StigmergyCallbackHandler(BaseCallbackHandler):
    """Settles its limiter's calls: usage, time to first token, 429/529 and transport errors.

    Runs inline (``run_inline``), never blocking: deposits go to the runtime's loop.
    """

    run_inline = True
    raise_error = False

    def __init__(self, limiter: StigmergyRateLimiter) -> None:
        self.limiter = limiter
        self._slots: dict[uuid.UUID, _Slot] = {}

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self._start(run_id, messages, kwargs)

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: uuid.UUID, **kwargs: Any
    ) -> None:
        self._start(run_id, prompts, kwargs)

    def _start(self, run_id: uuid.UUID, prompt: Any, kwargs: Mapping[str, Any]) -> None:
        slot = _Slot(self.limiter, estimate(prompt, kwargs.get("invocation_params") or {}))
        self._slots[run_id] = slot
        _SLOT.set(slot)  # inline: the limiter, called next in this context, finds it

    def on_llm_new_token(self, token: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        slot = self._slots.get(run_id)
        if slot is not None and slot.call is not None:
            self.limiter.pacer.first_token(slot.call)

    def on_llm_end(self, response: LLMResult, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        call = self.limiter.take(self._slots.pop(run_id, None))
        if call is not None:
            inputs, outputs, headers = usage_of(response)
            self.limiter.pacer.succeeded(call, input_tokens=inputs, output_tokens=outputs, headers=headers)

    def on_llm_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.limiter.pacer.failed(self.limiter.take(self._slots.pop(run_id, None)), error)


def estimate(prompt: Any, params: Mapping[str, Any]) -> Cost:
    """A call's cost estimate: prompt characters / 4, and its output cap (or DEFAULT_MAX_TOKENS)."""
    text = json.dumps(prompt, default=lambda m: getattr(m, "content", str(m)))
    cap = params.get("max_tokens") or params.get("max_completion_tokens") or params.get("max_output_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        cap = DEFAULT_MAX_TOKENS
    return Cost(len(text) / 4, float(cap))


def usage_of(response: LLMResult) -> tuple[float | None, float | None, Mapping[str, str] | None]:
    """Input and output tokens (None when not reported) and any response headers of a finished call."""
    inputs = outputs = None
    headers = None
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            usage = getattr(message, "usage_metadata", None)
            if usage:
                inputs = (inputs or 0) + usage.get("input_tokens", 0)
                outputs = (outputs or 0) + usage.get("output_tokens", 0)
            found = (getattr(message, "response_metadata", None) or {}).get("headers")
            headers = found if isinstance(found, Mapping) else headers
    if inputs is None and response.llm_output:
        token_usage = response.llm_output.get("token_usage") or {}
        if token_usage:
            inputs = token_usage.get("prompt_tokens")
            outputs = token_usage.get("completion_tokens")
    return inputs, outputs, headers

"""A mock LLM provider: OpenAI- and Anthropic-shaped, rate-limited and faulty on purpose.

It is the upstream of our tests, demo and benchmarks. The real ``openai`` and
``anthropic`` SDKs talk to it in-process (``httpx.ASGITransport(MockLLMAPI(config))``)
or over TCP (:func:`serve_mock`, ``stigmergy mock-api``). It is a plain ASGI 3 app
that needs only the core dependencies; serving it over TCP needs uvicorn.

Endpoints: ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` (Anthropic),
both streamed (SSE) or not; ``GET /_stats`` (:class:`MockStats` as JSON) and
``POST /_reset`` (back to a fresh start: stats zeroed, buckets full, RNG reseeded).

Tokens, deterministically:

* input = ceil(characters / 4) over every text in ``system`` and ``messages``
  (string contents and ``{"type": "text"}`` blocks), the estimate providers use at admission;
* output = min(max_tokens, ``config.output_tokens``), one word per token; OpenAI's
  ``max_tokens`` / ``max_completion_tokens`` may be absent (cap = ``output_tokens``),
  Anthropic's is required.

Rate limits are token buckets refilled continuously (``limit`` per 60 s; RPD per day),
charged at admission as the providers do: 1 request, the input estimate (ITPM),
``max_tokens`` (OTPM) and input + ``max_tokens`` (TPM). When a request ends, the output
it did not generate (``max_tokens`` minus what it served) goes back to the OTPM and TPM
buckets, as Anthropic reconciles OTPM. A request is admitted only if every bucket can pay;
otherwise 429 with ``retry-after`` / ``retry-after-ms`` for the slowest bucket, and if
the charge exceeds a bucket's whole capacity, a 429 with ``x-should-retry: false``.

Faults and latency come from ``random.Random(config.seed)``: per well-formed model call,
in arrival order, a fault draw, a spike draw and (if ``ttft`` > 0) a lognormal time to
first token, so one seed and one request sequence give one run. Faults are 502 (a
gateway's text page, no rate-limit headers), overloaded (Anthropic 529
``overloaded_error``, OpenAI 503), neither charged to the quota, and connection resets,
which happen after admission and the time to first token. Over :func:`serve_mock` or
the CLI a reset is a real TCP RST (SO_LINGER 0, then abort): the client's ``recv`` fails
with ECONNRESET, which httpx raises as ``httpx.ReadError`` and the SDKs as
``APIConnectionError``. In-process the app raises :class:`MockConnectionReset`, an
``httpx.ReadError``. Calls over ``max_concurrency`` are answered overloaded at once, never
queued. A client that disconnects stops its reply at once and counts as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx

from stigmergy.asgi import BodyTooLarge, ClientGone, read_body
from stigmergy.errors import ConfigurationError

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "MockConfig",
    "MockConnectionReset",
    "MockLLMAPI",
    "MockStats",
    "TokenBucket",
    "TokenTotals",
    "api_key_id",
    "count_input_tokens",
    "go_duration",
    "rfc3339",
    "run_mock_api",
    "serve_mock",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Fault = Literal["bad_gateway", "overloaded", "reset"]

WORDS = ("the", "field", "paces", "every", "call", "so", "no", "agent", "waits", "long")
MINUTE, DAY = 60.0, 86_400.0


class MockConnectionReset(httpx.ReadError):
    """Raised in-process where a real server would reset the connection: a transport error to httpx."""


def _validate(config: MockConfig) -> None:
    """Reject settings that cannot work, naming the field and the fix."""
    for name in ("rpm", "rpd", "tpm", "itpm", "otpm", "max_concurrency"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigurationError(
                f"MockConfig.{name} must be a positive integer, or None for unlimited; got {value!r}"
            )
    if not _is_int(config.output_tokens) or config.output_tokens < 1:
        raise ConfigurationError(
            f"MockConfig.output_tokens must be an integer >= 1; got {config.output_tokens!r}"
        )
    if not _is_int(config.seed):
        raise ConfigurationError(f"MockConfig.seed must be an integer; got {config.seed!r}")
    for name in ("p502", "p529", "p_reset", "p_spike"):
        value = getattr(config, name)
        if not (_is_number(value) and 0.0 <= value <= 1.0):
            raise ConfigurationError(f"MockConfig.{name} is a probability in [0, 1]; got {value!r}")
    if config.p502 + config.p529 + config.p_reset > 1.0:
        raise ConfigurationError("MockConfig.p502 + p529 + p_reset must not exceed 1 (one fault per call)")
    for name in ("ttft", "ttft_sigma", "token_delay"):
        value = getattr(config, name)
        if not (_is_number(value) and 0.0 <= value < math.inf):
            raise ConfigurationError(
                f"MockConfig.{name} must be a finite number of seconds >= 0; got {value!r}"
            )
    if not (_is_number(config.spike_multiplier) and 1.0 <= config.spike_multiplier < math.inf):
        raise ConfigurationError(f"MockConfig.spike_multiplier must be >= 1; got {config.spike_multiplier!r}")
    if not _is_int(config.max_body_bytes) or config.max_body_bytes < 1:
        raise ConfigurationError(f"MockConfig.max_body_bytes must be >= 1; got {config.max_body_bytes!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class MockConfig:
    """How the mock provider limits, fails and paces; None limits are unlimited."""

    rpm: int | None = None  # requests per minute
    rpd: int | None = None  # requests per day
    tpm: int | None = None  # input + output tokens per minute (OpenAI's TPM)
    itpm: int | None = None  # input tokens per minute (Anthropic)
    otpm: int | None = None  # output tokens per minute (Anthropic)
    output_tokens: int = 16  # tokens generated per reply, capped by the request's max_tokens
    p502: float = 0.0  # probability of a 502 bad gateway
    p529: float = 0.0  # probability of overloaded (529 Anthropic, 503 OpenAI)
    p_reset: float = 0.0  # probability of a connection reset
    ttft: float = 0.0  # median seconds to the first token
    ttft_sigma: float = 0.0  # lognormal shape of the time to first token (0: always ttft)
    token_delay: float = 0.0  # seconds per generated token
    p_spike: float = 0.0  # probability that a call is slow...
    spike_multiplier: float = 10.0  # ...by this factor on all of its latency
    max_concurrency: int | None = None  # calls served at once; more are answered overloaded
    seed: int = 0
    max_body_bytes: int = 10_000_000  # larger request bodies get 413

    def __post_init__(self) -> None:
        _validate(self)


# --- rate limits -------------------------------------------------------------------------


class TokenBucket:
    """``limit`` units, refilled continuously at ``limit / period`` per second."""

    def __init__(self, limit: int, period: float, now: float) -> None:
        self.limit, self.rate = limit, limit / period
        self._level, self._at = float(limit), now

    def _refill(self, now: float) -> None:
        self._level = min(float(self.limit), self._level + max(0.0, now - self._at) * self.rate)
        self._at = max(self._at, now)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0 now, inf never: it exceeds the capacity)."""
        self._refill(now)
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self._level - 1e-9) / self.rate)  # 1e-9: float dust is no shortfall

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level = min(float(self.limit), self._level + amount)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self._level + 1e-9))

    def used(self, now: float) -> float:
        """The share of the capacity spent and not yet refilled, in [0, 1]."""
        self._refill(now)
        return min(1.0, max(0.0, 1.0 - self._level / self.limit))

    def until_full(self, now: float) -> float:
        """What providers call "reset": seconds until the bucket is full again."""
        self._refill(now)
        return (self.limit - self._level) / self.rate


@dataclass(frozen=True)
class Dimension:
    """One limit: its bucket's name, the config field that sets it, its window and its unit."""

    name: str
    setting: str
    period: float
    unit: str


DIMENSIONS = (
    Dimension("requests", "rpm", MINUTE, "requests per minute"),
    Dimension("requests_per_day", "rpd", DAY, "requests per day"),
    Dimension("tokens", "tpm", MINUTE, "tokens per minute"),
    Dimension("input_tokens", "itpm", MINUTE, "input tokens per minute"),
    Dimension("output_tokens", "otpm", MINUTE, "output tokens per minute"),
)


@dataclass(frozen=True)
class Blocked:
    """Why a call was not admitted: the bucket that cannot pay, and for how long."""

    dimension: Dimension
    limit: int
    wait: float
    requested: float


class RateLimits:
    """Every configured bucket; a call is admitted only when all of them can pay."""

    def __init__(self, config: MockConfig, now: float) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.dimensions: dict[str, Dimension] = {}
        for dim in DIMENSIONS:
            limit = getattr(config, dim.setting)
            if limit is not None:
                self.buckets[dim.name] = TokenBucket(limit, dim.period, now)
                self.dimensions[dim.name] = dim

    def admit(self, charges: Mapping[str, float], now: float) -> Blocked | None:
        """Charge every bucket, or none and say which one blocks longest."""
        waits = [
            Blocked(self.dimensions[name], bucket.limit, bucket.wait(charges[name], now), charges[name])
            for name, bucket in self.buckets.items()
        ]
        worst = max(waits, key=lambda b: b.wait, default=None)
        if worst is not None and worst.wait > 0:
            return worst
        for name, bucket in self.buckets.items():
            bucket.take(charges[name], now)
        return None

    def give_back(self, unused_output: int, now: float) -> None:
        """Return output a call reserved but did not generate."""
        for name in ("tokens", "output_tokens"):
            if name in self.buckets:
                self.buckets[name].give_back(unused_output, now)


def go_duration(seconds: float) -> str:
    """A Go ``time.Duration`` string as OpenAI sends: ``12ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    ms = _ceil_ms(seconds)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def rfc3339(epoch: float) -> str:
    """An RFC 3339 UTC timestamp, rounded up to the second, as Anthropic sends resets."""
    return datetime.fromtimestamp(math.ceil(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ceil_ms(seconds: float) -> int:
    """Milliseconds, rounded up (a client told to wait never comes back early)."""
    return max(0, math.ceil(round(seconds * 1000, 6)))


def retry_after_headers(wait: float) -> list[tuple[str, str]]:
    """``retry-after`` in whole seconds (rounded up) and ``retry-after-ms``, which the SDKs read first."""
    return [("retry-after", str(max(1, math.ceil(round(wait, 6))))), ("retry-after-ms", str(_ceil_ms(wait)))]


# --- requests ----------------------------------------------------------------------------


class BadRequest(Exception):
    """A malformed call: answered 400 (413 when too large) in the provider's error shape."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.kind = "request_too_large" if status == 413 else "invalid_request_error"


@dataclass(frozen=True)
class Call:
    """One model call as the mock understands it."""

    model: str
    stream: bool
    include_usage: bool
    input_tokens: int
    max_output: int  # what admission reserves
    output_tokens: int  # what the reply generates
    truncated: bool  # max_tokens cut the reply short
    key_id: str

    def charges(self) -> dict[str, float]:
        """What each bucket pays at admission."""
        return {
            "requests": 1,
            "requests_per_day": 1,
            "tokens": self.input_tokens + self.max_output,
            "input_tokens": self.input_tokens,
            "output_tokens": self.max_output,
        }


def prompt_characters(payload: Mapping[str, Any]) -> int:
    """Characters of every text in ``system`` and ``messages`` (strings and text blocks)."""
    parts: list[Any] = [payload.get("system")]
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts += [m.get("content") for m in messages if isinstance(m, dict)]
    return sum(_text_length(part) for part in parts)


def _text_length(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(b["text"]) for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return 0


def count_input_tokens(payload: Mapping[str, Any]) -> int:
    """The mock's input-token count for a request body: ceil(characters / 4)."""
    return math.ceil(prompt_characters(payload) / 4)


def api_key_id(key: str) -> str:
    """How stats name an API key: a short SHA-256, so keys are never stored or shown."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _request_key(headers: Mapping[str, str]) -> str:
    key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return api_key_id(key) if key else "-"


def _parse_call(payload: Any, headers: Mapping[str, str], config: MockConfig, cap_required: bool) -> Call:
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    model, messages = payload.get("model"), payload.get("messages")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a non-empty string is required")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    cap = next(
        (payload[k] for k in ("max_tokens", "max_completion_tokens") if payload.get(k) is not None), None
    )
    if cap is None and cap_required:
        raise BadRequest("max_tokens: Field required")
    cap = config.output_tokens if cap is None else cap
    if not _is_int(cap) or cap < 1:
        raise BadRequest(f"max_tokens: must be an integer >= 1; got {cap!r}")
    options = payload.get("stream_options")
    return Call(
        model=model,
        stream=payload.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        input_tokens=count_input_tokens(payload),
        max_output=cap,
        output_tokens=min(cap, config.output_tokens),
        truncated=cap < config.output_tokens,
        key_id=_request_key(headers),
    )


def reply_words(count: int) -> list[str]:
    """The generated text, one word per token, each after the first with its leading space."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(count)]


# --- provider dialects -------------------------------------------------------------------

Frames = Iterator[tuple[bytes, bool]]  # SSE frames, each flagged when it carries a token


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Dialect:
    """What differs between providers: paths, bodies, streams, error shapes and headers."""

    path: str
    cap_required: bool
    overloaded_status: int
    overloaded_kind: str
    overloaded_message: str

    def parse(self, payload: Any, headers: Mapping[str, str], config: MockConfig) -> Call:
        return _parse_call(payload, headers, config, self.cap_required)

    def error(self, kind: str, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def overloaded(self) -> dict[str, Any]:
        return self.error(self.overloaded_kind, self.overloaded_message)

    def rate_limit_error(self, blocked: Blocked, call: Call) -> dict[str, Any]:
        raise NotImplementedError

    def headers(self, limits: RateLimits, now: float, wall: float, request_id: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def body(self, call: Call, ident: str, created: int) -> dict[str, Any]:
        raise NotImplementedError

    def frames(self, call: Call, ident: str, created: int) -> Frames:
        raise NotImplementedError


class OpenAIDialect(Dialect):
    """``/v1/chat/completions``: ``x-ratelimit-*`` headers with Go-duration resets."""

    path = "/v1/chat/completions"
    cap_required = False
    overloaded_status = 503
    overloaded_kind = "server_error"
    overloaded_message = "The server is overloaded or not ready yet."

    def error(self, kind: str, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def rate_limit_error(self, blocked: Blocked, call: Call) -> dict[str, Any]:
        kind = "requests" if blocked.dimension.name.startswith("requests") else "tokens"
        what = f"{call.model} on {blocked.dimension.unit}: Limit {blocked.limit}, "
        what += f"Requested {blocked.requested:g}."
        message = (
            f"Request too large for {what}"
            if math.isinf(blocked.wait)
            else f"Rate limit reached for {what} Please try again in {go_duration(blocked.wait)}."
        )
        return {"error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}}

    def headers(self, limits: RateLimits, now: float, wall: float, request_id: str) -> list[tuple[str, str]]:
        out = [("x-request-id", request_id)]
        for suffix, name in (("requests", "requests"), ("tokens", "tokens")):
            if bucket := limits.buckets.get(name):
                out += [
                    (f"x-ratelimit-limit-{suffix}", str(bucket.limit)),
                    (f"x-ratelimit-remaining-{suffix}", str(bucket.remaining(now))),
                    (f"x-ratelimit-reset-{suffix}", go_duration(bucket.until_full(now))),
                ]
        return out

    def body(self, call: Call, ident: str, created: int) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(reply_words(call.output_tokens)), "refusal": None}
        return {
            **self._envelope(ident, created, call, "chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(call)}],
            "usage": self._usage(call),
        }

    def frames(self, call: Call, ident: str, created: int) -> Frames:
        extra = {"usage": None} if call.include_usage else {}
        chunk = self._envelope(ident, created, call, "chat.completion.chunk") | extra

        def choice(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return _sse_data(chunk | {"choices": choices})

        yield choice({"role": "assistant", "content": ""}), False
        for word in reply_words(call.output_tokens):
            yield choice({"content": word}), True
        yield choice({}, _finish(call)), False
        if call.include_usage:
            yield _sse_data(chunk | {"choices": [], "usage": self._usage(call)}), False
        yield b"data: [DONE]\n\n", False

    @staticmethod
    def _envelope(ident: str, created: int, call: Call, kind: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{ident}", "object": kind, "created": created, "model": call.model}

    @staticmethod
    def _usage(call: Call) -> dict[str, int]:
        total = call.input_tokens + call.output_tokens
        return {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "total_tokens": total,
        }


class AnthropicDialect(Dialect):
    """``/v1/messages``: ``anthropic-ratelimit-*`` headers with RFC 3339 resets."""

    path = "/v1/messages"
    cap_required = True
    overloaded_status = 529
    overloaded_kind = "overloaded_error"
    overloaded_message = "Overloaded"

    def error(self, kind: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def rate_limit_error(self, blocked: Blocked, call: Call) -> dict[str, Any]:
        message = (
            "This request would exceed the rate limit for your organization of "
            f"{blocked.limit} {blocked.dimension.unit}."
        )
        return self.error("rate_limit_error", message)

    def headers(self, limits: RateLimits, now: float, wall: float, request_id: str) -> list[tuple[str, str]]:
        out = [("request-id", request_id)]
        token_buckets = [
            limits.buckets[n] for n in ("tokens", "input_tokens", "output_tokens") if n in limits.buckets
        ]
        tightest = min(token_buckets, key=lambda b: b.remaining(now), default=None)
        for suffix, bucket in (
            ("requests", limits.buckets.get("requests")),
            ("tokens", tightest),
            ("input-tokens", limits.buckets.get("input_tokens")),
            ("output-tokens", limits.buckets.get("output_tokens")),
        ):
            if bucket is not None:
                out += [
                    (f"anthropic-ratelimit-{suffix}-limit", str(bucket.limit)),
                    (f"anthropic-ratelimit-{suffix}-remaining", str(bucket.remaining(now))),
                    (f"anthropic-ratelimit-{suffix}-reset", rfc3339(wall + bucket.until_full(now))),
                ]
        return out

    def body(self, call: Call, ident: str, created: int) -> dict[str, Any]:
        text = "".join(reply_words(call.output_tokens))
        return self._message(call, ident) | {
            "content": [{"type": "text", "text": text}],
            "stop_reason": _stop_reason(call),
            "usage": self._usage(call.input_tokens, call.output_tokens),
        }

    def frames(self, call: Call, ident: str, created: int) -> Frames:
        start = self._message(call, ident) | {
            "content": [],
            "stop_reason": None,
            "usage": self._usage(call.input_tokens, 0),
        }
        yield _sse_event("message_start", {"message": start}), False
        yield (
            _sse_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            False,
        )
        yield _sse_event("ping", {}), False
        for word in reply_words(call.output_tokens):
            yield (
                _sse_event(
                    "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}}
                ),
                True,
            )
        yield _sse_event("content_block_stop", {"index": 0}), False
        delta = {"stop_reason": _stop_reason(call), "stop_sequence": None}
        yield (
            _sse_event("message_delta", {"delta": delta, "usage": {"output_tokens": call.output_tokens}}),
            False,
        )
        yield _sse_event("message_stop", {}), False

    @staticmethod
    def _message(call: Call, ident: str) -> dict[str, Any]:
        return {
            "id": f"msg_{ident}",
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "stop_sequence": None,
        }

    @staticmethod
    def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }


def _finish(call: Call) -> str:
    return "length" if call.truncated else "stop"


def _stop_reason(call: Call) -> str:
    return "max_tokens" if call.truncated else "end_turn"


def _sse_data(value: Any) -> bytes:
    return b"data: " + _json(value) + b"\n\n"


def _sse_event(kind: str, value: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + _sse_data({"type": kind, **value})


# --- stats -------------------------------------------------------------------------------


@dataclass
class TokenTotals:
    """Completed calls and the tokens they were served."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, call: Call) -> None:
        self.requests += 1
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens


@dataclass
class MockStats:
    """What the mock has seen since it started or was reset.

    ``by_status`` counts status lines sent (a cancelled stream counts as 200 there);
    token totals count only calls served to the end (``completed``), streamed or not.
    """

    attempts: int = 0  # model calls received, well-formed or not
    retried: int = 0  # attempts an SDK marked as retries (x-stainless-retry-count > 0)
    by_status: dict[int, int] = field(default_factory=dict)
    completed: int = 0
    rate_limited: int = 0  # 429s
    bad_gateway: int = 0  # 502s
    overloaded: int = 0  # 529s (Anthropic) and 503s (OpenAI), over_concurrency included
    over_concurrency: int = 0
    resets: int = 0
    cancelled: int = 0  # clients that went away before their reply was complete
    in_flight: int = 0
    max_in_flight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    by_key: dict[str, TokenTotals] = field(default_factory=dict)  # by api_key_id()
    by_model: dict[str, TokenTotals] = field(default_factory=dict)

    def record(self, call: Call) -> None:
        """A call served to the end: count it and its tokens, overall, per key and per model."""
        self.completed += 1
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.by_key.setdefault(call.key_id, TokenTotals()).add(call)
        self.by_model.setdefault(call.model, TokenTotals()).add(call)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["by_status"] = {str(status): n for status, n in sorted(self.by_status.items())}
        return data


# --- the ASGI app ------------------------------------------------------------------------

DIALECTS: dict[str, Dialect] = {d.path: d for d in (OpenAIDialect(), AnthropicDialect())}


@dataclass(frozen=True)
class Draw:
    """The seeded fate of one call: its fault, if any, and its latency."""

    fault: Fault | None
    ttft: float
    token_delay: float


@dataclass
class Progress:
    """How far an admitted call got."""

    generated: int = 0
    cancelled: bool = False


class Exchange:
    """One HTTP response: sends ASGI messages and remembers how far it got."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.complete = False

    async def start(self, status: int, headers: list[tuple[str, str]], content_type: str) -> None:
        self.status = status
        raw = [(b"content-type", content_type.encode())] + [(k.encode(), v.encode()) for k, v in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = False) -> None:
        self.complete = not more  # before sending: the disconnect that follows the last byte is no cancel
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> None:
        await self.start(status, headers or [], "application/json")
        await self.body(_json(value))


async def _read_json(receive: Receive, limit: int) -> Any:
    try:
        body = await read_body(receive, limit)
    except BodyTooLarge as exc:
        raise BadRequest(str(exc), status=413) from None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from exc


async def _watch_disconnect(
    receive: Receive, exchange: Exchange, progress: Progress, scope: anyio.CancelScope
) -> None:
    """Cancel the reply the moment its client disconnects, as a real provider stops generating."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not exchange.complete:
        progress.cancelled = True
        scope.cancel()


def _on_asyncio() -> bool:
    """Whether the app runs on asyncio (not trio, through anyio)."""
    try:
        asyncio.current_task()
    except RuntimeError:
        return False
    return True


async def _lifespan(receive: Receive, send: Send) -> None:
    """Accept startup and shutdown, so any ASGI server can host the app."""
    while True:
        kind = (await receive())["type"]
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _request_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class MockLLMAPI:
    """The mock provider as an ASGI 3 app; see the module docstring for what it does.

    ``clock`` (monotonic seconds) drives the buckets, ``wall_clock`` (epoch seconds) the
    RFC 3339 resets and ``created`` stamps, and ``sleep`` the latency: inject them for
    deterministic tests. ``reset_connection(scope)`` is set by :func:`serve_mock` and the
    CLI to reset the TCP connection behind ``scope``; without it a reset raises
    :class:`MockConnectionReset`.
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.reset_connection: Callable[[Scope], bool] | None = None
        self._clock, self._wall, self._sleep = clock, wall_clock, sleep
        self._stats = MockStats()
        self.reset()

    @property
    def stats(self) -> MockStats:
        """The live counters (``GET /_stats`` serves them as JSON)."""
        return self._stats

    def used(self) -> float:
        """How much of its fullest rate-limit window the API has used now (0 without limits)."""
        now = self._clock()
        return max((bucket.used(now) for bucket in self._limits.buckets.values()), default=0.0)

    def reset(self) -> None:
        """Start over: stats zeroed, buckets full, RNG reseeded; calls in flight still finish."""
        in_flight = self._stats.in_flight
        self._stats = MockStats(in_flight=in_flight, max_in_flight=in_flight)
        self._limits = RateLimits(self.config, self._clock())
        self._rng = random.Random(self.config.seed)
        self._calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        exchange = Exchange(send)
        method, path = scope["method"], scope["path"]
        if (dialect := DIALECTS.get(path)) and method == "POST":
            await self._model_call(dialect, scope, receive, exchange)
        elif (method, path) == ("GET", "/_stats"):
            await exchange.json(200, self._stats.as_json())
        elif (method, path) == ("POST", "/_reset"):
            self.reset()
            await exchange.json(200, {"reset": True})
        else:
            await exchange.json(
                404, {"error": {"type": "not_found_error", "message": f"no route {method} {path}"}}
            )

    async def _model_call(self, dialect: Dialect, scope: Scope, receive: Receive, exchange: Exchange) -> None:
        self._stats.attempts += 1
        headers = _request_headers(scope)
        if headers.get("x-stainless-retry-count", "0").strip() not in ("", "0"):
            self._stats.retried += 1
        self._calls += 1
        request_id = f"req_{self.config.seed & 0xFFFFFFFF:08x}{self._calls:024x}"
        try:
            await self._handle(dialect, scope, receive, exchange, headers, request_id)
        finally:
            if exchange.status is not None:  # counted where a reset() in between would count it too
                by_status = self._stats.by_status
                by_status[exchange.status] = by_status.get(exchange.status, 0) + 1

    async def _handle(
        self,
        dialect: Dialect,
        scope: Scope,
        receive: Receive,
        exchange: Exchange,
        headers: dict[str, str],
        request_id: str,
    ) -> None:
        """Parse, draw the call's fate, then answer: fault, overloaded, 429, or admitted."""
        try:
            call = dialect.parse(await _read_json(receive, self.config.max_body_bytes), headers, self.config)
        except ClientGone:
            self._stats.cancelled += 1
            return
        except BadRequest as exc:
            body = dialect.error(exc.kind, str(exc))
            await exchange.json(exc.status, body, self._limit_headers(dialect, request_id))
            return
        draw = self._draw()
        if draw.fault == "bad_gateway":
            self._stats.bad_gateway += 1
            await exchange.start(502, [], "text/plain; charset=utf-8")
            await exchange.body(b"502 Bad Gateway")
        elif draw.fault == "overloaded" or self._over_concurrency():
            self._stats.overloaded += 1
            await exchange.json(
                dialect.overloaded_status, dialect.overloaded(), self._limit_headers(dialect, request_id)
            )
        elif blocked := self._limits.admit(call.charges(), self._clock()):
            await self._rate_limited(dialect, call, blocked, exchange, request_id)
        else:
            await self._admitted(dialect, call, draw, scope, receive, exchange, request_id)

    def _draw(self) -> Draw:
        """Draw fault, spike and latency from the seeded RNG, in that order."""
        c, rng = self.config, self._rng
        fault_roll, spike_roll = rng.random(), rng.random()
        fault: Fault | None = None
        if fault_roll < c.p502:
            fault = "bad_gateway"
        elif fault_roll < c.p502 + c.p529:
            fault = "overloaded"
        elif fault_roll < c.p502 + c.p529 + c.p_reset:
            fault = "reset"
        slow = c.spike_multiplier if spike_roll < c.p_spike else 1.0
        ttft = rng.lognormvariate(math.log(c.ttft), c.ttft_sigma) if c.ttft > 0 else 0.0
        return Draw(fault, ttft * slow, c.token_delay * slow)

    def _over_concurrency(self) -> bool:
        cap = self.config.max_concurrency
        if cap is None or self._stats.in_flight < cap:
            return False
        self._stats.over_concurrency += 1
        return True

    def _limit_headers(self, dialect: Dialect, request_id: str) -> list[tuple[str, str]]:
        return dialect.headers(self._limits, self._clock(), self._wall(), request_id)

    async def _rate_limited(
        self, dialect: Dialect, call: Call, blocked: Blocked, exchange: Exchange, request_id: str
    ) -> None:
        self._stats.rate_limited += 1
        headers = self._limit_headers(dialect, request_id)
        if math.isinf(blocked.wait):  # larger than the bucket: waiting cannot help
            headers.append(("x-should-retry", "false"))
        else:
            headers += retry_after_headers(blocked.wait)
        await exchange.json(429, dialect.rate_limit_error(blocked, call), headers)

    async def _admitted(
        self,
        dialect: Dialect,
        call: Call,
        draw: Draw,
        scope: Scope,
        receive: Receive,
        exchange: Exchange,
        request_id: str,
    ) -> None:
        """Serve an admitted call, then settle its stats and return the output it did not use."""
        self._stats.in_flight += 1
        self._stats.max_in_flight = max(self._stats.max_in_flight, self._stats.in_flight)
        progress = Progress()
        try:
            if _on_asyncio():
                # The common case (uvicorn, httpx on asyncio): a bare task for the watcher costs a
                # fraction of a task group, and it only ever waits in receive(), so it can be
                # cancelled without being awaited.
                with anyio.CancelScope() as cancel:
                    watcher = asyncio.ensure_future(_watch_disconnect(receive, exchange, progress, cancel))
                    try:
                        await self._serve(dialect, call, draw, exchange, request_id, progress)
                    finally:
                        watcher.cancel()
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_watch_disconnect, receive, exchange, progress, tg.cancel_scope)
                    await self._serve(dialect, call, draw, exchange, request_id, progress)
                    tg.cancel_scope.cancel()
        finally:
            self._stats.in_flight -= 1
            self._limits.give_back(call.max_output - progress.generated, self._clock())
        if progress.cancelled:
            self._stats.cancelled += 1
        elif draw.fault == "reset":
            await self._reset(scope, receive)
        else:
            self._stats.record(call)

    async def _serve(
        self,
        dialect: Dialect,
        call: Call,
        draw: Draw,
        exchange: Exchange,
        request_id: str,
        progress: Progress,
    ) -> None:
        """The time to first token, then the reply (none for a reset: the caller drops the connection)."""
        await self._sleep(draw.ttft)
        if draw.fault != "reset":
            await self._reply(dialect, call, draw, exchange, request_id, progress)

    async def _reply(
        self,
        dialect: Dialect,
        call: Call,
        draw: Draw,
        exchange: Exchange,
        request_id: str,
        progress: Progress,
    ) -> None:
        ident, created = request_id.removeprefix("req_"), int(self._wall())
        if not call.stream:
            await self._sleep(draw.token_delay * call.output_tokens)
            progress.generated = call.output_tokens
            await exchange.json(
                200, dialect.body(call, ident, created), self._limit_headers(dialect, request_id)
            )
            return
        headers = [*self._limit_headers(dialect, request_id), ("cache-control", "no-cache")]
        await exchange.start(200, headers, "text/event-stream; charset=utf-8")
        for frame, carries_token in dialect.frames(call, ident, created):
            if carries_token:
                await self._sleep(draw.token_delay)
                progress.generated += 1
            await exchange.body(frame, more=True)
        await exchange.body(b"")

    async def _reset(self, scope: Scope, receive: Receive) -> None:
        """Drop the connection without a response: an RST over TCP, a transport error in-process."""
        self._stats.resets += 1
        if self.reset_connection is None or not self.reset_connection(scope):
            raise MockConnectionReset("[Errno 104] Connection reset by peer (mock fault)")
        while (await receive())["type"] != "http.disconnect":
            pass


# --- serving over TCP --------------------------------------------------------------------

UVICORN_MISSING = "serving the mock API over TCP needs uvicorn: pip install 'stigmergy-field[proxy]'"


class UvicornConnectionResetter:
    """Resets the TCP connection behind an ASGI scope: SO_LINGER 0, then abort, sends an RST."""

    def __init__(self, server: uvicorn.Server) -> None:
        self._server = server

    def __call__(self, scope: Scope) -> bool:
        client = scope.get("client")
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if client is None or transport is None or getattr(connection, "client", None) != client:
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return True
        return False


def _uvicorn_server(api: MockLLMAPI, capture_signals: bool) -> uvicorn.Server:
    """A uvicorn server for ``api`` whose resets are real; it leaves signals alone unless asked."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(UVICORN_MISSING) from exc

    class InLoopServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the host program owns Ctrl-C

    config = uvicorn.Config(
        api,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        log_config=uvicorn.config.LOGGING_CONFIG if capture_signals else None,
    )
    server = uvicorn.Server(config) if capture_signals else InLoopServer(config)
    api.reset_connection = UvicornConnectionResetter(server)
    return server


def _listen(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio only turns on TCP_NODELAY for sockets that say they are TCP,
    # and without it every small response waits ~40 ms for the peer's delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # now, not when uvicorn gets to it: the banner says "connect" before that
    except OSError:
        sock.close()
        raise
    return sock


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serve_mock(
    app: MockConfig | MockLLMAPI | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the mock on a real uvicorn server inside the running asyncio loop; yields its base URL.

    ``port=0`` picks a free port. Give a :class:`MockLLMAPI` to read ``app.stats`` or
    inject a clock; a :class:`MockConfig` (or nothing) gets a fresh app. The server runs
    as a plain asyncio task (uvicorn needs asyncio), so errors in the ``with`` body come
    out as themselves, not wrapped in an exception group.
    """
    api = app if isinstance(app, MockLLMAPI) else MockLLMAPI(app)
    server = _uvicorn_server(api, capture_signals=False)
    sock = _listen(host, port)
    serving = asyncio.ensure_future(server.serve([sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # startup failed: raise why
            await asyncio.sleep(0.005)
        yield _base_url(sock)
    finally:
        server.should_exit = True
        await serving


def run_mock_api(settings: Mapping[str, Any], host: str = "127.0.0.1", port: int = 8900) -> int:
    """``stigmergy mock-api``: serve until Ctrl-C; returns an exit code (2: bad settings or no uvicorn)."""
    try:
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"--port must be in 0-65535; got {port}")
        api = MockLLMAPI(MockConfig(**settings))
        server = _uvicorn_server(api, capture_signals=True)
    except (ConfigurationError, ImportError) as exc:
        print(f"stigmergy mock-api: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"stigmergy mock-api: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    _print_banner(api.config, _base_url(sock))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve([sock]))
    print("stigmergy mock-api: stopped", flush=True)
    return 0


def _print_banner(config: MockConfig, url: str) -> None:
    limits = " ".join(f"{d.setting}={getattr(config, d.setting) or 'unlimited'}" for d in DIMENSIONS)
    faults = f"502 {config.p502:.1%}, overloaded {config.p529:.1%}, resets {config.p_reset:.1%}"
    lines = (
        f"stigmergy mock-api: a mock LLM provider on {url}",
        f'  OpenAI SDK:     AsyncOpenAI(base_url="{url}/v1", api_key="any")',
        f'  Anthropic SDK:  AsyncAnthropic(base_url="{url}", api_key="any")',
        f"  stats:          GET {url}/_stats   (POST {url}/_reset starts over)",
        f"  limits: {limits}; faults: {faults}; seed {config.seed}",
        "Ctrl-C stops it.",
    )
    print("\n".join(lines), flush=True)

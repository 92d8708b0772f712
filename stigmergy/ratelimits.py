"""What an LLM API's response says about its rate limits, normalised across providers.

Each provider reports the same few facts differently: Go durations (OpenAI, Groq),
RFC 3339 timestamps (Anthropic), plain seconds (Azure), epoch seconds or
milliseconds (OpenRouter), a JSON error body (Gemini), or nothing at all (Ollama).
:func:`parse_response` turns one response's status, headers and error body into a
:class:`RateLimitInfo`: the windows it reported as :class:`Quota` objects with
*absolute* deadlines, when to retry, and an :data:`Outcome` that says how to react.

Everything here is pure (no I/O, no clock: the caller passes ``now``). What the
upstream sends is never trusted to be well formed: a malformed value is dropped
with a ``logger.debug`` line and never raises, because a bad header must not break
the request that carried it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from stigmergy.errors import ConfigurationError

logger = logging.getLogger(__name__)

Dimension = Literal["rpm", "rpd", "tpm", "tpd", "itpm", "otpm"]

#: How to react to a response:
#:
#: - ``ok``: not an error (2xx, 3xx).
#: - ``quota``: a 429 on a short (per-minute) window: inhibit until the deadline, then retry.
#: - ``daily_quota``: a 429 on a per-day quota, or one that asks to wait an hour or more: fail fast.
#: - ``overloaded``: the provider is overloaded for everyone (529, ``overloaded_error``, an
#:   overload 503, any Ollama 503): back off globally; it says nothing about our quota.
#: - ``transient``: 408, 500, 502, other 503s, 504 and other 5xx: a short pause, then retry.
#: - ``fatal``: 402, OpenAI's ``insufficient_quota`` 429 and other 4xx: retrying cannot help.
Outcome = Literal["ok", "quota", "daily_quota", "overloaded", "transient", "fatal"]

Provider = Literal[
    "anthropic", "openai", "azure", "gemini", "ollama", "openrouter", "groq", "openai-compatible"
]
PROVIDERS: tuple[str, ...] = get_args(Provider)

#: 9999-12-31T23:59:59Z, the last instant a datetime can hold: later deadlines are malformed.
MAX_EPOCH = 253402300799.0
#: Smaller numbers are not epoch timestamps (2001-09-09).
MIN_EPOCH = 1e9
#: Larger epochs are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
EPOCH_MS_FROM = 1e11
#: A 429 that asks to wait this long (seconds) or longer is a daily (or longer) quota.
LONG_WAIT = 3600.0
#: Error bodies are small; a larger one is not parsed.
MAX_BODY = 1 << 20
REASON_CHARS = 200

_DECIMAL = re.compile(r"\d+(?:\.\d*)?|\.\d+", re.ASCII)
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
_GO_DURATION = re.compile(rf"(?:{_GO_PART.pattern})+", re.ASCII)
_DAILY = re.compile(r"per[-_ ]?day|daily", re.IGNORECASE)
_OVERLOADED = re.compile(r"overload|server busy|over capacity", re.IGNORECASE)
#: Waits stated in an error message: Azure's "retry after 86400 seconds", OpenAI's and
#: Groq's "Please try again in 2m59.56s".
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+) seconds?", re.IGNORECASE | re.ASCII)
_TRY_AGAIN_TEXT = re.compile(rf"try again in ({_GO_DURATION.pattern})", re.IGNORECASE | re.ASCII)

_OPENAI_DIMENSIONS: dict[str, Dimension] = {"requests": "rpm", "tokens": "tpm"}
_GROQ_DIMENSIONS: dict[str, Dimension] = {"requests": "rpd", "tokens": "tpm"}  # Groq's requests are per day
_ANTHROPIC_DIMENSIONS: dict[str, Dimension] = {
    "requests": "rpm",
    "tokens": "tpm",
    "input-tokens": "itpm",
    "output-tokens": "otpm",
}
_HOSTS: tuple[tuple[str, Provider], ...] = (
    ("api.anthropic.com", "anthropic"),
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure"),
    ("cognitiveservices.azure.com", "azure"),
    ("generativelanguage.googleapis.com", "gemini"),
    ("openrouter.ai", "openrouter"),
    ("api.groq.com", "groq"),
)
OLLAMA_PORT = 11434


@dataclass(frozen=True, slots=True)
class Quota:
    """One rate-limit window the upstream told us about.

    ``reset_at`` is an absolute deadline in epoch seconds (wall clock): when the
    window is full again. Any field the upstream did not send (or sent malformed)
    is None.
    """

    dimension: Dimension
    limit: float | None
    remaining: float | None
    reset_at: float | None


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """Everything one response said about rate limits, with deadlines in epoch seconds."""

    provider: str
    status: int
    outcome: Outcome
    quotas: tuple[Quota, ...]
    #: From retry-after-ms, retry-after, Gemini's RetryInfo, a wait stated in the error
    #: message or (on a 429) OpenRouter's X-RateLimit-Reset, in that order of precedence.
    retry_at: float | None
    #: Short human text from the error body: the quotaId or error type, and the message.
    reason: str | None = None


# -- value parsers: pure, None for anything malformed ----------------------------------------


def parse_decimal(value: str) -> float | None:
    """A count or a number of seconds: a finite, non-negative decimal such as ``42`` or ``149984.0``.

    Signs, exponents, ``nan``, ``inf``, digit separators and non-ASCII digits are all
    malformed: no provider sends them, so they signal a broken value.
    """
    value = value.strip()
    if not _DECIMAL.fullmatch(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_go_duration(value: str) -> float | None:
    """Seconds in a Go duration (``1s``, ``6m0s``, ``12ms``, ``1h2m3.5s``), as OpenAI and Groq send.

    Every number needs a unit (``0`` alone excepted), as in Go's ``time.ParseDuration``;
    negative durations are malformed: a reset cannot lie in the past.
    """
    value = value.strip()
    if value == "0":
        return 0.0
    if not _GO_DURATION.fullmatch(value):
        return None
    seconds = sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_PART.findall(value))
    return seconds if math.isfinite(seconds) else None


def parse_rfc3339(value: str) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (Anthropic's resets); one without a UTC offset is malformed."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def parse_epoch(value: str) -> float | None:
    """Epoch seconds from an epoch in seconds or milliseconds, told apart by magnitude.

    Values of at least 1e11 are milliseconds; results before 2001 or after the year
    9999 are malformed (a small number is a duration, not an epoch).
    """
    number = parse_decimal(value)
    if number is None:
        return None
    if number >= EPOCH_MS_FROM:
        number /= 1000.0
    return number if MIN_EPOCH <= number <= MAX_EPOCH else None


def parse_retry_after(value: str, now: float) -> float | None:
    """The absolute deadline of a ``Retry-After``: seconds from ``now`` or an HTTP-date.

    Fractional seconds are accepted. An HTTP-date in the past is returned as is (it
    means: retry now); one without a zone is taken as UTC, as HTTP-dates always are.
    """
    seconds = parse_decimal(value)
    if seconds is not None:
        return _after(now, seconds)
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def parse_reset(value: str, now: float) -> float | None:
    """The absolute deadline of a reset from an unknown OpenAI-compatible server, whatever its style.

    A Go duration or a number of seconds is counted from ``now``, unless the number
    is large enough to be an epoch (see :func:`parse_epoch`).
    """
    seconds = parse_go_duration(value)
    if seconds is None:
        seconds = parse_decimal(value)
        if seconds is not None and seconds >= MIN_EPOCH:
            return parse_epoch(value)
    return _after(now, seconds)


def _after(now: float, seconds: float | None) -> float | None:
    """``now + seconds``, or None when there are no seconds or the deadline is past the year 9999."""
    if seconds is None:
        return None
    deadline = now + seconds
    return deadline if deadline <= MAX_EPOCH else None


# -- provider detection -------------------------------------------------------------------------


def detect_provider(url: str) -> Provider:
    """Which provider an upstream base URL belongs to, by host (and port, for Ollama).

    A host matches its domain or any subdomain of it (``eu.api.openai.com``);
    anything unrecognised, malformed URLs included, is ``openai-compatible``.
    """
    try:
        parts = urlsplit(url if "://" in url else f"//{url}")
        host = parts.hostname or ""
    except ValueError:
        return "openai-compatible"
    for domain, provider in _HOSTS:
        if host == domain or host.endswith(f".{domain}"):
            return provider
    try:
        port = parts.port
    except ValueError:
        port = None
    if port == OLLAMA_PORT or host.split(".")[0] == "ollama":
        return "ollama"
    return "openai-compatible"


# -- parse_response -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Response:
    """One response being parsed: lower-cased headers, the error object, and the malformed-value log."""

    provider: str
    status: int
    now: float
    headers: dict[str, str]
    text: str = ""  # the error body, decoded
    error: Mapping[str, Any] | None = None  # its "error" object

    def read(
        self, name: str, parse: Callable[[str], float | None], headers: Mapping[str, str] | None = None
    ) -> float | None:
        """Parse header ``name`` (of ``headers``, default the response's) if present."""
        raw = (self.headers if headers is None else headers).get(name)
        return None if raw is None else self.parse(name, raw, parse)

    def parse(self, what: str, raw: str, parse: Callable[[str], float | None]) -> float | None:
        """``parse(raw)``; a value it rejects is logged and ignored."""
        value = parse(raw)
        if value is None:
            logger.debug("%s: ignoring unusable %s: %r", self.provider, what, raw[:100])
        return value

    def deadline(self, parse: Callable[[str], float | None]) -> Callable[[str], float | None]:
        """A parser of seconds turned into one of absolute deadlines."""
        return lambda value: _after(self.now, parse(value))


def parse_response(
    provider: str,
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes | str | None = None,
    *,
    now: float,
) -> RateLimitInfo:
    """Read the rate-limit state and outcome of one response from ``provider``.

    ``headers`` is a mapping (a dict, ``httpx.Headers``) or a list of pairs; names
    are matched case-insensitively. ``body`` is read only on errors (status >= 400);
    a 200 carrying an error in its SSE stream is not detected here. ``now`` is the
    wall clock in epoch seconds, from which relative resets are counted.

    Raises only for a non-int ``status`` (TypeError) or an unknown ``provider``
    (:class:`ConfigurationError`); whatever the upstream sent never raises.
    """
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"status must be an int, got {status!r}")
    if provider not in PROVIDERS:
        raise ConfigurationError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    response = _Response(provider, status, now, _lower_case(headers))
    if status >= 400 and body:
        response.text, response.error = _error_body(provider, body)
    quotas: list[Quota] = []
    retry_at = _retry_after(response)
    if provider in ("openai", "groq"):
        dimensions = _GROQ_DIMENSIONS if provider == "groq" else _OPENAI_DIMENSIONS
        quotas = _openai_style(response, dimensions, response.deadline(parse_go_duration))
    elif provider == "openai-compatible":
        quotas = _openai_style(response, _OPENAI_DIMENSIONS, lambda value: parse_reset(value, now))
    elif provider == "azure":
        quotas = _azure(response)
    elif provider == "anthropic":
        quotas = _anthropic(response)
    elif provider == "openrouter":
        quotas, reset_at = _openrouter(response)
        if status == 429 and retry_at is None:
            retry_at = reset_at
    elif provider == "gemini":
        quotas, delay_at = _gemini(response)
        retry_at = retry_at if retry_at is not None else delay_at
    outcome = _classify(response, quotas, retry_at)
    return RateLimitInfo(provider, status, outcome, tuple(quotas), retry_at, _reason(response))


def _lower_case(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers by lower-case name; of repeated names in a list of pairs, the first wins."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lowered: dict[str, str] = {}
    for name, value in pairs:
        lowered.setdefault(name.lower(), value)
    return lowered


def _error_body(provider: str, body: bytes | str) -> tuple[str, Mapping[str, Any] | None]:
    """The decoded error body and its ``error`` object (None when the body is not a JSON error)."""
    if len(body) > MAX_BODY:
        logger.debug("%s: error body of %d bytes not parsed", provider, len(body))
        return "", None
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        logger.debug("%s: error body is not JSON: %r", provider, text[:100])
        return text, None
    if isinstance(payload, list) and payload:  # Gemini's streaming endpoints wrap the error in an array
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, str):  # Ollama: {"error": "server busy, ..."}
        return text, {"message": error}
    return text, error if isinstance(error, dict) else None


def _retry_after(response: _Response) -> float | None:
    """``retry-after-ms`` (which takes precedence), ``retry-after``, or a wait stated in the error message."""
    retry_at = response.read("retry-after-ms", response.deadline(_milliseconds))
    if retry_at is None:
        retry_at = response.read("retry-after", lambda v: parse_retry_after(v, response.now))
    message = _text(response.error, "message")
    if retry_at is None and message:
        if match := _RETRY_AFTER_TEXT.search(message):
            retry_at = _after(response.now, float(match[1]))
        elif match := _TRY_AGAIN_TEXT.search(message):
            retry_at = _after(response.now, parse_go_duration(match[1]))
    return retry_at


def _milliseconds(value: str) -> float | None:
    """Seconds in a count of milliseconds (``retry-after-ms``)."""
    milliseconds = parse_decimal(value)
    return None if milliseconds is None else milliseconds / 1000.0


def _openai_style(
    response: _Response, dimensions: Mapping[str, Dimension], reset: Callable[[str], float | None]
) -> list[Quota]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (OpenAI, Groq, compatible servers)."""
    return _quotas(
        (
            dimension,
            response.read(f"x-ratelimit-limit-{kind}", parse_decimal),
            response.read(f"x-ratelimit-remaining-{kind}", parse_decimal),
            response.read(f"x-ratelimit-reset-{kind}", reset),
        )
        for kind, dimension in dimensions.items()
    )


def _azure(response: _Response) -> list[Quota]:
    """Azure's OpenAI-style headers, with plain-seconds resets and the Responses API's placeholders.

    ``-1`` is malformed like any negative value. ``0`` is a placeholder in a limit and
    a reset (neither can be zero) and in a remaining count, except on a 429: there it
    is believed, as the window really is empty.
    """

    def nonzero(value: str) -> float | None:
        return parse_decimal(value) or None

    remaining = parse_decimal if response.status == 429 else nonzero
    reset = response.deadline(nonzero)
    quotas = []
    for kind, dimension in _OPENAI_DIMENSIONS.items():
        reset_at = response.read(f"x-ratelimit-reset-{kind}", reset)
        if reset_at is None and kind == "tokens":
            reset_at = response.read("x-rate-limit-reset-tokens", reset)  # sic: the extra hyphen
        quotas.append(
            (
                dimension,
                response.read(f"x-ratelimit-limit-{kind}", nonzero),
                response.read(f"x-ratelimit-remaining-{kind}", remaining),
                reset_at,
            )
        )
    return _quotas(quotas)


def _anthropic(response: _Response) -> list[Quota]:
    """``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*``, resets in RFC 3339."""
    return _quotas(
        (
            dimension,
            response.read(f"anthropic-ratelimit-{kind}-limit", parse_decimal),
            response.read(f"anthropic-ratelimit-{kind}-remaining", parse_decimal),
            response.read(f"anthropic-ratelimit-{kind}-reset", parse_rfc3339),
        )
        for kind, dimension in _ANTHROPIC_DIMENSIONS.items()
    )


def _openrouter(response: _Response) -> tuple[list[Quota], float | None]:
    """``X-RateLimit-{Limit,Remaining,Reset}``, from the headers or the error's ``metadata.headers``.

    The window is per day when the error says so (``free-models-per-day``), else per minute.
    Returns the quotas and the reset deadline.
    """
    metadata = response.error.get("metadata") if response.error else None
    nested = metadata.get("headers") if isinstance(metadata, dict) else None
    headers = {
        name.lower(): str(value)
        for name, value in (nested.items() if isinstance(nested, dict) else ())
        if isinstance(name, str) and isinstance(value, str | int | float) and not isinstance(value, bool)
    }
    headers.update(response.headers)  # the response's own headers win over the body's copy
    reset_at = response.read("x-ratelimit-reset", parse_epoch, headers)
    dimension: Dimension = "rpd" if response.status == 429 and _DAILY.search(response.text) else "rpm"
    quotas = _quotas(
        [
            (
                dimension,
                response.read("x-ratelimit-limit", parse_decimal, headers),
                response.read("x-ratelimit-remaining", parse_decimal, headers),
                reset_at,
            )
        ]
    )
    return quotas, reset_at


def _gemini(response: _Response) -> tuple[list[Quota], float | None]:
    """The 429 body's ``google.rpc.QuotaFailure`` violations (as exhausted quotas) and ``RetryInfo`` delay."""
    details = response.error.get("details") if response.error else None
    by_dimension: dict[Dimension, Quota] = {}
    retry_at = None
    for detail in details if isinstance(details, list) else ():
        kind = _text(detail, "@type")
        if kind.endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str):
                retry_at = response.parse("retryDelay", delay, response.deadline(parse_go_duration))
        elif kind.endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else ():
                dimension = _gemini_dimension(_text(violation, "quotaId"))
                if dimension is None or dimension in by_dimension:
                    continue
                value = _text(violation, "quotaValue")  # int64 values are strings in JSON
                limit = response.parse("quotaValue", value, parse_decimal) if value else None
                by_dimension[dimension] = Quota(dimension, limit, 0.0, None)
    return list(by_dimension.values()), retry_at


def _gemini_dimension(quota_id: str) -> Dimension | None:
    """The window of a quota id: ``GenerateRequestsPerDayPerProjectPerModel-FreeTier`` → rpd."""
    quota_id = quota_id.lower()
    per_day = "perday" in quota_id
    if not per_day and "perminute" not in quota_id:
        return None
    if "inputtokens" in quota_id:
        return "tpd" if per_day else "itpm"  # Gemini's token quotas count input tokens
    if "tokens" in quota_id:
        return "tpd" if per_day else "tpm"
    if "requests" in quota_id:
        return "rpd" if per_day else "rpm"
    return None


def _gemini_quota_ids(error: Mapping[str, Any] | None) -> list[str]:
    """Every ``quotaId`` in the error's ``google.rpc.QuotaFailure`` violations."""
    details = error.get("details") if error else None
    ids = []
    for detail in details if isinstance(details, list) else ():
        violations = detail.get("violations") if isinstance(detail, dict) else None
        ids += [_text(v, "quotaId") for v in (violations if isinstance(violations, list) else ())]
    return [quota_id for quota_id in ids if quota_id]


def _quotas(rows: Iterable[tuple[Dimension, float | None, float | None, float | None]]) -> list[Quota]:
    """The windows the upstream said anything about."""
    return [Quota(*row) for row in rows if row[1:] != (None, None, None)]


def _classify(response: _Response, quotas: list[Quota], retry_at: float | None) -> Outcome:
    """The outcome by status, refined by the error body (see :data:`Outcome`)."""
    status, error = response.status, response.error
    if status < 400:
        return "ok" if status >= 200 else "fatal"
    if status == 429:
        if "insufficient_quota" in (_text(error, "code"), _text(error, "type")):
            return "fatal"  # OpenAI: out of credit, not out of rate
        return "daily_quota" if _is_daily(response, quotas, retry_at) else "quota"
    if status >= 500:
        overloaded = status == 529 or _text(error, "type") == "overloaded_error"
        if status == 503 and (response.provider == "ollama" or _OVERLOADED.search(response.text)):
            overloaded = True
        return "overloaded" if overloaded else "transient"
    return "transient" if status == 408 else "fatal"


def _is_daily(response: _Response, quotas: list[Quota], retry_at: float | None) -> bool:
    """A 429 is on a daily quota if the error says so, a per-day window is empty, or the wait is long."""
    quota_ids = _gemini_quota_ids(response.error) if response.provider == "gemini" else []
    if quota_ids:  # Gemini's message text is generic; its quota ids are precise
        said_daily = any("perday" in quota_id.lower() for quota_id in quota_ids)
    else:
        said_daily = bool(_DAILY.search(response.text))
    empty_day = any(q.dimension in ("rpd", "tpd") and q.remaining == 0 for q in quotas)
    long_wait = retry_at is not None and retry_at - response.now >= LONG_WAIT
    return said_daily or empty_day or long_wait


def _reason(response: _Response) -> str | None:
    """A short label for the error: Gemini's quota ids, else the error type or code, with the message."""
    error = response.error
    if error is None:
        return None
    code = _text(error, "code")
    label = (
        ", ".join(_gemini_quota_ids(error))
        or _text(error, "type")
        or (code if not code.isdigit() else "")
        or _text(error, "status")
    )
    reason = ": ".join(part for part in (label, " ".join(_text(error, "message").split())) if part)
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    return reason or None


def _text(obj: Any, key: str) -> str:
    """``obj[key]`` if ``obj`` is a dict and that is a string, else ``""``: upstream JSON is untrusted."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, str) else ""

"""Rate-limit parsing: real header and body samples per provider, malformed values, outcomes, fuzzing."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, get_args

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmergy.errors import ConfigurationError
from stigmergy.ratelimits import (
    MAX_BODY,
    MAX_EPOCH,
    PROVIDERS,
    Outcome,
    Quota,
    RateLimitInfo,
    detect_provider,
    parse_decimal,
    parse_epoch,
    parse_go_duration,
    parse_reset,
    parse_response,
    parse_retry_after,
    parse_rfc3339,
)

NOW = 1741305540.0  # 2025-03-06T23:59:00Z, a minute before OpenRouter's daily reset below
RESET = 1741305600.0  # 2025-03-07T00:00:00Z
HTTP_DATE = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
LOGGER = "stigmergy.ratelimits"


def parse(provider: str, status: int, headers: dict[str, str], body: Any = None) -> RateLimitInfo:
    """parse_response at NOW; a dict or list body is sent as JSON bytes."""
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    return parse_response(provider, status, headers, body, now=NOW)


def gemini_429(*violations: tuple[str, str], retry_delay: str | None = None) -> dict[str, Any]:
    """A Gemini 429 body as the API sends it: QuotaFailure violations, Help, RetryInfo."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
                    "quotaValue": value,
                }
                for quota_id, value in violations
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {"description": "Learn more", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}
            ],
        },
    ]
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    message = "You exceeded your current quota, please check your plan and billing details."
    return {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", "details": details}}


PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
PER_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
OPENROUTER_PER_DAY = {
    "error": {
        "message": "Rate limit exceeded: free-models-per-day. "
        "Add 10 credits to unlock 1000 free model requests per day",
        "code": 429,
        "metadata": {
            "headers": {
                "X-RateLimit-Limit": "50",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1741305600000",
            },
            "provider_name": None,
        },
    },
    "user_id": "user_2x",
}
AZURE_DAILY_MESSAGE = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have "
    "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 86400 seconds."
)

# (id, provider, status, headers, body, quotas, retry_at, outcome)
SAMPLES: list[tuple[str, str, int, dict[str, str], Any, list[Quota], float | None, Outcome]] = [
    (
        "openai-200",
        "openai",
        200,
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        None,
        [Quota("rpm", 60, 59, NOW + 1), Quota("tpm", 150000, 149984, NOW + 360)],
        None,
        "ok",
    ),
    (
        "openai-429-retry-after-ms-wins",
        "openai",
        429,
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1h2m3.5s",
            "x-ratelimit-reset-tokens": "12ms",
            "retry-after-ms": "1500",
            "retry-after": "20",
        },
        {
            "error": {
                "message": "Rate limit reached for gpt-4o on requests per min (RPM)",
                "code": "rate_limit_exceeded",
            }
        },
        [Quota("rpm", None, 0, NOW + 3723.5), Quota("tpm", None, None, NOW + 0.012)],
        NOW + 1.5,
        "quota",
    ),
    (
        "groq-200-requests-are-per-day",
        "groq",
        200,
        {
            "x-ratelimit-limit-requests": "14400",
            "x-ratelimit-limit-tokens": "18000",
            "x-ratelimit-remaining-requests": "14370",
            "x-ratelimit-remaining-tokens": "17997",
            "x-ratelimit-reset-requests": "2m59.56s",
            "x-ratelimit-reset-tokens": "7.66s",
        },
        None,
        [Quota("rpd", 14400, 14370, NOW + 179.56), Quota("tpm", 18000, 17997, NOW + 7.66)],
        None,
        "ok",
    ),
    (
        "groq-429-rpd-exhausted",
        "groq",
        429,
        {"x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "0", "retry-after": "7"},
        None,
        [Quota("rpd", 1000, 0, None)],
        NOW + 7,
        "daily_quota",
    ),
    (
        "groq-429-tpm",
        "groq",
        429,
        {"x-ratelimit-remaining-requests": "999", "x-ratelimit-remaining-tokens": "0", "retry-after": "2"},
        {
            "error": {
                "message": "Rate limit reached for model `llama-3.3-70b-versatile` "
                "on tokens per minute (TPM): Limit 6000, Used 5990, Requested 200. Please try again in 1.9s.",
                "type": "tokens",
                "code": "rate_limit_exceeded",
            }
        },
        [Quota("rpd", None, 999, None), Quota("tpm", None, 0, None)],
        NOW + 2,
        "quota",
    ),
    (
        "anthropic-200",
        "anthropic",
        200,
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2025-03-06T23:59:01Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "38000",
            "anthropic-ratelimit-tokens-reset": "2025-03-06T23:59:33Z",
            "anthropic-ratelimit-input-tokens-limit": "30000",
            "anthropic-ratelimit-input-tokens-remaining": "29000",
            "anthropic-ratelimit-input-tokens-reset": "2025-03-06T23:59:02.5+00:00",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
            "anthropic-ratelimit-output-tokens-reset": "2025-03-07T00:59:33+01:00",
        },
        None,
        [
            Quota("rpm", 50, 49, NOW + 1),
            Quota("tpm", 40000, 38000, NOW + 33),
            Quota("itpm", 30000, 29000, NOW + 2.5),
            Quota("otpm", 8000, 7000, NOW + 33),
        ],
        None,
        "ok",
    ),
    (
        "anthropic-429",
        "anthropic",
        429,
        {"retry-after": "33", "anthropic-ratelimit-input-tokens-remaining": "0"},
        {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded"},
        },
        [Quota("itpm", None, 0, None)],
        NOW + 33,
        "quota",
    ),
    (
        "anthropic-529",
        "anthropic",
        529,
        {},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        [],
        None,
        "overloaded",
    ),
    (
        "azure-200",
        "azure",
        200,
        {"x-ratelimit-remaining-requests": "99", "x-ratelimit-remaining-tokens": "119000"},
        None,
        [Quota("rpm", None, 99, None), Quota("tpm", None, 119000, None)],
        None,
        "ok",
    ),
    (
        "azure-429-extra-hyphen",
        "azure",
        429,
        {
            "x-ratelimit-remaining-tokens": "0",
            "x-rate-limit-reset-tokens": "2",
            "retry-after-ms": "1500",
            "retry-after": "2",
        },
        None,
        [Quota("tpm", None, 0, NOW + 2)],
        NOW + 1.5,
        "quota",
    ),
    (
        "azure-responses-placeholders",
        "azure",
        200,
        {
            "x-ratelimit-remaining-requests": "-1",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-limit-tokens": "0",
        },
        None,
        [],
        None,
        "ok",
    ),
    (
        "azure-429-86400-seconds",
        "azure",
        429,
        {"retry-after": "86400"},
        {"error": {"code": "429", "message": AZURE_DAILY_MESSAGE}},
        [],
        NOW + 86400,
        "daily_quota",
    ),
    (
        "azure-429-wait-only-in-message",
        "azure",
        429,
        {},
        {"error": {"code": "429", "message": AZURE_DAILY_MESSAGE}},
        [],
        NOW + 86400,
        "daily_quota",
    ),
    (
        "openrouter-429-per-day-ms-in-body",
        "openrouter",
        429,
        {},
        OPENROUTER_PER_DAY,
        [Quota("rpd", 50, 0, RESET)],
        RESET,
        "daily_quota",
    ),
    (
        "openrouter-429-per-minute-seconds",
        "openrouter",
        429,
        {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1741305600"},
        {"error": {"message": "Rate limit exceeded: free-models-per-min.", "code": 429}},
        [Quota("rpm", 20, 0, RESET)],
        RESET,
        "quota",
    ),
    (
        "openrouter-402",
        "openrouter",
        402,
        {},
        {"error": {"message": "This request requires more credits, or fewer max_tokens.", "code": 402}},
        [],
        None,
        "fatal",
    ),
    (
        "gemini-429-per-minute",
        "gemini",
        429,
        {},
        gemini_429((PER_MINUTE, "15"), retry_delay="22s"),
        [Quota("rpm", 15, 0, None)],
        NOW + 22,
        "quota",
    ),
    (
        "gemini-429-per-day",
        "gemini",
        429,
        {},
        gemini_429((PER_DAY, "50"), retry_delay="1.5s"),
        [Quota("rpd", 50, 0, None)],
        NOW + 1.5,
        "daily_quota",
    ),
    (
        "gemini-429-minute-and-day-in-an-array",
        "gemini",
        429,
        {},
        [
            gemini_429(
                ("GenerateContentInputTokensPerModelPerMinute-FreeTier", "250000"),
                (PER_MINUTE, "10"),
                (PER_DAY, "250"),
            )
        ],
        [Quota("itpm", 250000, 0, None), Quota("rpm", 10, 0, None), Quota("rpd", 250, 0, None)],
        None,
        "daily_quota",
    ),
    (
        "ollama-503-server-busy",
        "ollama",
        503,
        {},
        {"error": "server busy, please try again.  maximum pending requests exceeded"},
        [],
        None,
        "overloaded",
    ),
    (
        "http-date-retry-after",
        "openai-compatible",
        503,
        {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
        None,
        [],
        HTTP_DATE,
        "transient",
    ),
    (
        "compatible-reset-seconds-and-epoch",
        "openai-compatible",
        200,
        {
            "x-ratelimit-reset-requests": "60",
            "x-ratelimit-reset-tokens": "1741305600",
            "x-ratelimit-limit-tokens": "1e5",
        },
        None,
        [Quota("rpm", None, None, NOW + 60), Quota("tpm", None, None, RESET)],
        None,
        "ok",
    ),
]


@pytest.mark.parametrize(
    ("provider", "status", "headers", "body", "quotas", "retry_at", "outcome"),
    [pytest.param(*row[1:], id=row[0]) for row in SAMPLES],
)
def test_real_samples(
    provider: str,
    status: int,
    headers: dict[str, str],
    body: Any,
    quotas: list[Quota],
    retry_at: float | None,
    outcome: Outcome,
) -> None:
    info = parse(provider, status, headers, body)
    assert (info.provider, info.status, info.outcome) == (provider, status, outcome)
    # deadlines up to float rounding (NOW + 0.012 and the like)
    assert [(q.dimension, q.limit, q.remaining) for q in info.quotas] == [
        (q.dimension, q.limit, q.remaining) for q in quotas
    ]
    assert [q.reset_at for q in info.quotas] == pytest.approx([q.reset_at for q in quotas])
    assert info.retry_at == pytest.approx(retry_at)


def test_reasons_name_the_quota_or_error_type() -> None:
    gemini = parse("gemini", 429, {}, gemini_429((PER_DAY, "50")))
    assert gemini.reason is not None and gemini.reason.startswith(
        f"{PER_DAY}: You exceeded your current quota"
    )
    anthropic = parse(
        "anthropic",
        529,
        {},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert anthropic.reason == "overloaded_error: Overloaded"
    ollama = parse(
        "ollama", 503, {}, {"error": "server busy, please try again.  maximum pending requests exceeded"}
    )
    assert ollama.reason == "server busy, please try again. maximum pending requests exceeded"
    azure = parse("azure", 429, {}, {"error": {"code": "429", "message": AZURE_DAILY_MESSAGE}})
    assert (
        azure.reason is not None and azure.reason.startswith("Requests to the") and len(azure.reason) <= 200
    )
    assert parse("openai", 429, {}).reason is None


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Remaining-Tokens": "5", "Retry-After": "3"},
        httpx.Headers({"x-ratelimit-remaining-tokens": "5", "RETRY-AFTER": "3"}),
        [
            ("X-RATELIMIT-REMAINING-TOKENS", "5"),
            ("retry-after", "3"),
            ("Retry-After", "99"),
        ],  # the first wins
    ],
    ids=["dict", "httpx", "pairs"],
)
def test_header_names_are_case_insensitive(headers: Any) -> None:
    info = parse_response("openai", 429, headers, now=NOW)
    assert info.quotas == (Quota("tpm", None, 5, None),)
    assert info.retry_at == NOW + 3


def test_wait_stated_only_in_the_message() -> None:
    body = {
        "error": {
            "message": "Rate limit reached ... Please try again in 2m59.56s.",
            "code": "rate_limit_exceeded",
        }
    }
    assert parse("groq", 429, {}, body).retry_at == pytest.approx(NOW + 179.56)


# -- the value parsers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("2m59.56s", 179.56),
        ("7.66s", 7.66),
        ("0", 0.0),
        ("300us", 0.0003),
        ("2µs", 2e-6),
        (".5s", 0.5),
        (" 22s ", 22.0),
        ("149984.0", None),
        ("5", None),
        ("-5s", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("1e309s", None),
        ("1h 2m", None),
        ("1d", None),
        ("s", None),
        ("9" * 400 + "h", None),
    ],
)
def test_parse_go_duration(value: str, seconds: float | None) -> None:
    assert parse_go_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("42", 42.0),
        ("149984.0", 149984.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("abc", None),
        ("-5", None),
        ("1e309", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        ("1_000", None),
        ("١٢", None),
        ("9" * 400, None),
    ],
)
def test_parse_decimal(value: str, number: float | None) -> None:
    assert parse_decimal(value) == number


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2024-06-18T18:05:33Z", 1718733933.0),
        ("2024-06-18T20:05:33+02:00", 1718733933.0),
        ("2024-06-18T18:05:33.5Z", 1718733933.5),
        ("2024-06-18T18:05:33", None),  # no offset
        ("2024-06-18", None),
        ("abc", None),
        ("", None),
    ],
)
def test_parse_rfc3339(value: str, epoch: float | None) -> None:
    assert parse_rfc3339(value) == epoch


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("1741305600000", RESET),  # milliseconds
        ("1741305600", RESET),  # seconds
        ("1741305600.5", RESET + 0.5),
        ("60", None),  # a duration, not an epoch
        ("99999999999999999999", None),  # past the year 9999 even as milliseconds
        ("1e309", None),
        ("-1741305600", None),
    ],
)
def test_parse_epoch(value: str, epoch: float | None) -> None:
    assert parse_epoch(value) == epoch


@pytest.mark.parametrize(
    ("value", "deadline"),
    [
        ("30", NOW + 30),
        ("1.5", NOW + 1.5),
        ("0", NOW),
        ("Wed, 21 Oct 2015 07:28:00 GMT", HTTP_DATE),
        ("Wed, 21 Oct 2015 07:28:00 -0000", HTTP_DATE),  # no zone: HTTP-dates are UTC
        ("-5", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("1e309", None),
        ("9" * 400, None),
        ("Wed, 21 Oct 2015 25:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str, deadline: float | None) -> None:
    assert parse_retry_after(value, NOW) == deadline


@pytest.mark.parametrize(
    ("value", "deadline"),
    [("6m0s", NOW + 360), ("60", NOW + 60), ("1741305600", RESET), ("1741305600000", RESET), ("abc", None)],
)
def test_parse_reset(value: str, deadline: float | None) -> None:
    assert parse_reset(value, NOW) == deadline


# -- malformed values are ignored, with a debug line --------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-5", "1e309", "149984.0", "", "nan", "inf", "5"])
def test_malformed_go_duration_reset_is_ignored_and_logged(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    info = parse("openai", 200, {"x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": value})
    assert info.quotas == (Quota("tpm", None, 10, None),)
    assert any(
        "x-ratelimit-reset-tokens" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
    )


@pytest.mark.parametrize("value", ["abc", "-5", "1e309", "", "nan", "inf"])
def test_malformed_counts_and_retry_after_are_ignored_and_logged(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    headers = {
        "anthropic-ratelimit-requests-limit": value,
        "anthropic-ratelimit-requests-remaining": "3",
        "anthropic-ratelimit-tokens-reset": value,
        "retry-after-ms": value,
        "retry-after": value,
    }
    info = parse("anthropic", 429, headers)
    assert info.quotas == (Quota("rpm", None, 3, None),)
    assert info.retry_at is None
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    for name in ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-tokens-reset", "retry-after-ms"):
        assert name in logged


def test_decimal_counts_are_accepted() -> None:
    info = parse("openai", 200, {"x-ratelimit-remaining-tokens": "149984.0"})
    assert info.quotas == (Quota("tpm", None, 149984.0, None),)


def test_azure_zero_is_a_placeholder_except_remaining_on_a_429(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    zeros = {
        "x-ratelimit-limit-tokens": "0",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "0",
    }
    assert parse("azure", 200, zeros).quotas == ()
    assert "x-ratelimit-remaining-tokens" in caplog.text
    assert parse("azure", 429, zeros).quotas == (Quota("tpm", None, 0, None),)


def test_openrouter_small_reset_is_not_an_epoch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    info = parse("openrouter", 429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "60"})
    assert info.quotas == (Quota("rpm", None, 0, None),)
    assert info.retry_at is None and "x-ratelimit-reset" in caplog.text


def test_gemini_malformed_retry_delay_and_quota_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    info = parse("gemini", 429, {}, gemini_429((PER_MINUTE, "-15"), retry_delay="soon"))
    assert info.quotas == (Quota("rpm", None, 0, None),)
    assert info.retry_at is None
    assert "retryDelay" in caplog.text and "quotaValue" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00not utf-8",
        b"[" * 100_000,  # deeper than the JSON parser recurses
        b'{"error": {"details": [1, {"@type": 5}, {"@type": "google.rpc.QuotaFailure", "violations": [7]}]}}',
        b'[{"error": ["not", "an", "object"]}]',
        b"[]",
        b"12",
        b'{"error": {"message": "retry after 99999999999999999999999999999 seconds"}}',
        b'{"error": {"metadata": {"headers": {"X-RateLimit-Reset": true, "X-RateLimit-Limit": 50}}}}',
        b"x" * (MAX_BODY + 1),
        "a str body",
        "",
    ],
)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hostile_bodies_never_raise(provider: str, body: bytes | str) -> None:
    for status in (429, 503):
        info = parse_response(provider, status, {}, body, now=NOW)
        assert info.outcome in get_args(Outcome)


# -- status classification ----------------------------------------------------------------------


OVERLOADED_503 = {
    "error": {"message": "The engine is currently overloaded, please try again later", "type": "server_error"}
}


@pytest.mark.parametrize(
    ("provider", "status", "headers", "body", "outcome"),
    [
        ("openai", 200, {}, None, "ok"),
        ("anthropic", 200, {}, b"event: error\ndata: {}", "ok"),  # SSE errors in a 200 are not read here
        ("openrouter", 200, {}, None, "ok"),
        ("openai", 304, {}, None, "ok"),
        ("openai", 429, {}, None, "quota"),
        ("anthropic", 429, {}, None, "quota"),
        ("gemini", 429, {}, None, "quota"),
        ("openai", 429, {"retry-after": "3599"}, None, "quota"),
        ("openai", 429, {"retry-after": "3600"}, None, "daily_quota"),
        (
            "openai",
            429,
            {},
            {"error": {"message": "... on requests per day (RPD): Limit 200, Used 200"}},
            "daily_quota",
        ),
        (
            "openai",
            429,
            {},
            {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
            "fatal",
        ),
        ("gemini", 429, {}, gemini_429((PER_DAY, "50"), retry_delay="22s"), "daily_quota"),
        ("gemini", 429, {}, gemini_429((PER_MINUTE, "15"), retry_delay="22s"), "quota"),
        ("openrouter", 429, {}, OPENROUTER_PER_DAY, "daily_quota"),
        (
            "openrouter",
            429,
            {},
            {"error": {"message": "Rate limit exceeded: free-models-per-day-high-balance."}},
            "daily_quota",
        ),
        (
            "openrouter",
            429,
            {},
            {"error": {"metadata": {"limit_source": "openrouter_free_tier_daily"}}},
            "daily_quota",
        ),
        ("anthropic", 529, {}, None, "overloaded"),
        ("openai", 529, {}, None, "overloaded"),
        ("anthropic", 500, {}, {"type": "error", "error": {"type": "overloaded_error"}}, "overloaded"),
        ("ollama", 503, {}, None, "overloaded"),
        (
            "ollama",
            503,
            {},
            "server busy, please try again.  maximum pending requests exceeded",
            "overloaded",
        ),
        ("openai", 503, {}, OVERLOADED_503, "overloaded"),
        (
            "gemini",
            503,
            {},
            {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
            "overloaded",
        ),
        ("openai", 503, {}, None, "transient"),
        ("azure", 503, {}, {"error": {"message": "Service Unavailable"}}, "transient"),
        ("groq", 503, {}, None, "transient"),
        ("openai", 500, {}, None, "transient"),
        ("anthropic", 502, {}, None, "transient"),
        ("gemini", 504, {}, None, "transient"),
        ("openai-compatible", 408, {}, None, "transient"),
        ("openrouter", 402, {}, None, "fatal"),
        ("openai", 400, {}, None, "fatal"),
        ("anthropic", 401, {}, None, "fatal"),
        ("gemini", 403, {}, None, "fatal"),
        ("ollama", 404, {}, None, "fatal"),
        ("anthropic", 413, {}, None, "fatal"),
        ("groq", 422, {}, None, "fatal"),
    ],
)
def test_status_classification(
    provider: str, status: int, headers: dict[str, str], body: Any, outcome: Outcome
) -> None:
    assert parse(provider, status, headers, body).outcome == outcome


def test_only_a_bad_provider_or_status_raises() -> None:
    with pytest.raises(ConfigurationError, match="unknown provider 'mistral'"):
        parse_response("mistral", 200, {}, now=NOW)
    for status in ("429", 429.0, True):
        with pytest.raises(TypeError, match="status"):
            parse_response("openai", status, {}, now=NOW)  # type: ignore[arg-type]


# -- detect_provider ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "provider"),
    [
        ("https://api.anthropic.com", "anthropic"),
        ("https://api.anthropic.com/v1/messages", "anthropic"),
        ("https://api.openai.com/v1", "openai"),
        ("https://eu.api.openai.com/v1", "openai"),
        ("https://my-resource.openai.azure.com/openai/deployments/gpt-4o", "azure"),
        ("https://my-resource.cognitiveservices.azure.com/", "azure"),
        ("https://generativelanguage.googleapis.com/v1beta/openai/", "gemini"),
        ("http://localhost:11434/v1", "ollama"),
        ("http://127.0.0.1:11434", "ollama"),
        ("http://ollama:8080/v1", "ollama"),
        ("localhost:11434", "ollama"),
        ("https://openrouter.ai/api/v1", "openrouter"),
        ("https://API.GROQ.COM/openai/v1", "groq"),
        ("http://localhost:8000/v1", "openai-compatible"),
        ("https://api.together.xyz/v1", "openai-compatible"),
        ("https://api.openai.com.evil.example/v1", "openai-compatible"),
        ("https://notopenrouter.ai/v1", "openai-compatible"),
        ("http://[::1", "openai-compatible"),
        ("http://host:port/v1", "openai-compatible"),
        ("", "openai-compatible"),
    ],
)
def test_detect_provider(url: str, provider: str) -> None:
    assert detect_provider(url) == provider


def test_providers_lists_every_detectable_provider() -> None:
    assert set(PROVIDERS) == {
        "anthropic",
        "openai",
        "azure",
        "gemini",
        "ollama",
        "openrouter",
        "groq",
        "openai-compatible",
    }


# -- fuzzing ------------------------------------------------------------------------------------

HEADER_NAMES = [
    "retry-after",
    "retry-after-ms",
    "x-rate-limit-reset-tokens",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    *(
        f"x-ratelimit-{field}-{kind}"
        for field in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    ),
    *(
        f"anthropic-ratelimit-{kind}-{field}"
        for kind in ("requests", "tokens", "input-tokens", "output-tokens")
        for field in ("limit", "remaining", "reset")
    ),
]
JSON_KEYS = st.text(max_size=5) | st.sampled_from(
    [
        "error",
        "details",
        "@type",
        "retryDelay",
        "violations",
        "quotaId",
        "quotaValue",
        "metadata",
        "headers",
        "message",
        "type",
        "code",
        "status",
    ]
)
JSON_TEXT = st.text(max_size=20) | st.sampled_from(
    [
        PER_DAY,
        PER_MINUTE,
        "22s",
        "overloaded_error",
        "insufficient_quota",
        "retry after 9 seconds",
        "try again in 1m2s",
        "google.rpc.RetryInfo",
        "type.googleapis.com/google.rpc.QuotaFailure",
        "X-RateLimit-Reset",
        "1741305600000",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=20,
)
VALUES = st.text(max_size=30) | st.sampled_from(["1e309", "nan", "-1", "0", "1.5", "6m0s", "1741305600000"])
VALUES_OR_JSON = VALUES | JSON
VIOLATION = st.fixed_dictionaries({"quotaId": JSON_TEXT | JSON, "quotaValue": VALUES_OR_JSON})
ERROR_OBJECT = st.fixed_dictionaries(
    {},
    optional={
        "details": st.lists(
            st.fixed_dictionaries(
                {
                    "@type": st.sampled_from(
                        ["type.googleapis.com/google.rpc.RetryInfo", "google.rpc.QuotaFailure"]
                    )
                },
                optional={"retryDelay": VALUES_OR_JSON, "violations": st.lists(VIOLATION, max_size=3) | JSON},
            ),
            max_size=3,
        ),
        "metadata": st.fixed_dictionaries(
            {
                "headers": st.dictionaries(
                    st.sampled_from(["X-RateLimit-Reset", "X-RateLimit-Limit"]), VALUES_OR_JSON
                )
            }
        ),
        "message": VALUES_OR_JSON,
        "type": st.sampled_from(["overloaded_error", "insufficient_quota"]) | JSON,
        "code": VALUES_OR_JSON,
    },
)
#: Bodies shaped like the providers' errors, with arbitrary values where they put theirs.
ERROR_BODY = (ERROR_OBJECT | st.text(max_size=30)).map(lambda error: json.dumps({"error": error}).encode())
STATUSES = st.sampled_from([200, 400, 402, 408, 429, 500, 503, 529]) | st.integers(0, 999)


@settings(max_examples=250, deadline=None)
@given(
    provider=st.sampled_from(PROVIDERS),
    status=STATUSES,
    headers=st.dictionaries(st.sampled_from(HEADER_NAMES) | st.text(max_size=10), VALUES, max_size=8),
    body=st.none()
    | st.binary(max_size=200)
    | st.text(max_size=200)
    | JSON.map(lambda v: json.dumps(v).encode())
    | ERROR_BODY,
)
def test_fuzzed_responses_never_raise(
    provider: str, status: int, headers: dict[str, str], body: bytes | str | None
) -> None:
    info = parse_response(provider, status, headers, body, now=NOW)
    assert info.outcome in get_args(Outcome)
    deadlines = [info.retry_at, *(q.reset_at for q in info.quotas)]
    assert all(d is None or (math.isfinite(d) and d <= MAX_EPOCH) for d in deadlines)
    counts = [n for q in info.quotas for n in (q.limit, q.remaining)]
    assert all(n is None or (math.isfinite(n) and n >= 0) for n in counts)


@settings(max_examples=200, deadline=None)
@given(value=VALUES)
def test_fuzzed_values_never_raise(value: str) -> None:
    for result in (
        parse_decimal(value),
        parse_go_duration(value),
        parse_rfc3339(value),
        parse_epoch(value),
        parse_retry_after(value, NOW),
        parse_reset(value, NOW),
    ):
        assert result is None or math.isfinite(result)
    assert detect_provider(value) in PROVIDERS

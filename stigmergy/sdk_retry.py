"""The official SDKs' default retry policy, re-implemented on any clock.

The demo and ``bench/scenarios.py`` compare the field against agents that call the
API directly the way the openai/anthropic SDKs do (Stainless-generated, read from
their wheels: two retries for 408/409/429/5xx and connection errors, ``x-should-retry``
overriding the status rule, ``retry-after-ms`` then ``retry-after`` honoured when
0 < delay <= 60 s, else ``min(0.5 * 2**n, 8)`` s with up to 25% jitter). It sleeps
through the caller's ``sleep``, so an :class:`~stigmergy.clock.AcceleratedClock`
speeds up the baseline exactly as it speeds up the mock and the gate.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import httpx

RETRYABLE = frozenset({408, 409, 429})
#: The SDKs' default: two retries, so three attempts.
DEFAULT_RETRIES = 2


def sdk_delay(response: httpx.Response | None, attempt: int, rng: random.Random) -> float:
    """The openai/anthropic SDKs' wait before retry ``attempt`` (0-based)."""
    if response is not None:
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                delay = float(response.headers.get(name, "")) * scale
            except ValueError:
                continue
            if 0 < delay <= 60:
                return delay
    return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * rng.random())


def should_retry(response: httpx.Response) -> bool:
    """The SDKs' rule for an error answer: the server's ``x-should-retry``, else the status code."""
    told = response.headers.get("x-should-retry", "").strip().lower()
    if told in ("true", "false"):
        return bool(told == "true")
    return response.status_code in RETRYABLE or response.status_code >= 500


async def sdk_call(
    send: Callable[[], Awaitable[httpx.Response]],
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    retries: int = DEFAULT_RETRIES,
) -> bool:
    """Send until a success (True) or the retries are spent (False); ``send`` does one attempt."""
    for attempt in range(retries + 1):
        response: httpx.Response | None = None
        try:
            response = await send()
        except httpx.TransportError:
            pass
        else:
            if response.status_code < 400:
                return True
            if not should_retry(response):
                return False
        if attempt == retries:
            return False
        await sleep(sdk_delay(response, attempt, rng))
    return False

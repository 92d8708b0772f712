"""Clients of the official SDKs whatever their HTTP library: openai 3 and anthropic 2 take
``httpx2`` clients, openai 2 (which crewai pins) takes ``httpx`` ones."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

from anthropic import AsyncAnthropic
from openai import AsyncOpenAI


def http_library(sdk_client: type) -> ModuleType:
    """``httpx`` or ``httpx2``: the library whose AsyncClient ``sdk_client`` accepts."""
    annotation = str(inspect.signature(sdk_client.__init__).parameters["http_client"].annotation)  # type: ignore[misc]
    return importlib.import_module("httpx2" if "httpx2" in annotation else "httpx")


def asgi(sdk_client: type, app: Any) -> Any:
    """An in-process transport to ``app`` in the SDK's HTTP library."""
    return http_library(sdk_client).ASGITransport(app=app)


def openai_client(base_url: str, transport: Any, **options: Any) -> AsyncOpenAI:
    http = http_library(AsyncOpenAI).AsyncClient(transport=transport)
    return AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0, http_client=http, **options
    )


def anthropic_client(base_url: str, transport: Any, **options: Any) -> AsyncAnthropic:
    http = http_library(AsyncAnthropic).AsyncClient(transport=transport)
    return AsyncAnthropic(base_url=base_url, api_key="sk-test", max_retries=0, http_client=http, **options)

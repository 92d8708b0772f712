"""Token usage, read from responses as they pass: JSON bodies, SSE streams and NDJSON.

A :class:`UsageMeter` is fed the bytes of one response in whatever chunks they
arrive; it splits events on line boundaries (so an event cut across two chunks is
still read whole) and keeps the usage the provider reported:

- OpenAI chat completions: ``usage`` on the body, or on the final stream chunk
  (``stream_options.include_usage``).
- Anthropic messages: ``message_start.message.usage`` (input and cache tokens) and
  ``message_delta.usage.output_tokens``, which is cumulative: the last one wins.
- Ollama's native API: the final NDJSON object's ``prompt_eval_count`` / ``eval_count``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: A line longer than this is not usage-bearing metadata; it is skipped, not buffered.
MAX_LINE = 1 << 20


@dataclass(slots=True)
class Usage:
    """Tokens one response consumed, as the provider counted them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reported: bool = False  # False: the response carried no usage (an interrupted stream, say)

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class UsageMeter:
    """Reads usage from a response body fed in arbitrary chunks; never raises on bad input."""

    def __init__(self) -> None:
        self.usage = Usage()
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the body."""
        self._buffer += chunk
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
            else:
                self._line(line)
        if len(self._buffer) > MAX_LINE:
            self._buffer.clear()
            self._skipping = True

    def close(self) -> Usage:
        """The body ended: read what is left (a JSON body has no trailing newline) and return the usage."""
        if self._buffer and not self._skipping:
            self._line(bytes(self._buffer))
        self._buffer.clear()
        return self.usage

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            return  # SSE "event:"/"id:" lines, comments, [DONE], blank lines
        try:
            event = json.loads(line)
        except ValueError:
            logger.debug("usage: skipping a line that is not JSON (%d bytes)", len(line))
            return
        if isinstance(event, dict):
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._anthropic(event["message"].get("usage"))
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict) and "output_tokens" in usage:
                self.usage.output_tokens = _count(usage["output_tokens"])  # cumulative
                self.usage.reported = True
        elif kind == "message" or "input_tokens" in (event.get("usage") or {}):
            self._anthropic(event.get("usage"))
        elif isinstance(event.get("usage"), dict):
            usage = event["usage"]
            self.usage.input_tokens = _count(usage.get("prompt_tokens"))
            self.usage.output_tokens = _count(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):  # OpenAI counts cached tokens inside prompt_tokens
                self.usage.cache_read_tokens = min(
                    _count(details.get("cached_tokens")), self.usage.input_tokens
                )
                self.usage.input_tokens -= self.usage.cache_read_tokens
            self.usage.reported = True
        elif event.get("done") is True and "eval_count" in event:
            self.usage.input_tokens = _count(event.get("prompt_eval_count"))
            self.usage.output_tokens = _count(event.get("eval_count"))
            self.usage.reported = True

    def _anthropic(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.usage.input_tokens = _count(usage.get("input_tokens"))
        self.usage.cache_read_tokens = _count(usage.get("cache_read_input_tokens"))
        self.usage.cache_write_tokens = _count(usage.get("cache_creation_input_tokens"))
        if "output_tokens" in usage:
            self.usage.output_tokens = _count(usage["output_tokens"])
        self.usage.reported = True

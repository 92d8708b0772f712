"""UsageMeter: usage from JSON bodies, SSE and NDJSON streams, however the bytes are cut."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from stigmergy.usage import Usage, UsageMeter

OPENAI_STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,'
    b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"m1","usage":{"input_tokens":25,'
    b'"cache_creation_input_tokens":10,"cache_read_input_tokens":3,"output_tokens":1}}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":7}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
OLLAMA_STREAM = (
    b'{"message":{"content":"a"},"done":false}\n'
    b'{"message":{"content":"b"},"done":true,"prompt_eval_count":9,"eval_count":4}\n'
)


def meter(body: bytes, cuts: list[int] | None = None) -> Usage:
    m = UsageMeter()
    start = 0
    for cut in sorted(cuts or []):
        m.feed(body[start:cut])
        start = cut
    m.feed(body[start:])
    return m.close()


def test_openai_final_usage_chunk_with_cached_tokens_split_out() -> None:
    usage = meter(OPENAI_STREAM)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (8, 4, 5)
    assert usage.total == 17 and usage.reported


def test_anthropic_output_tokens_are_cumulative_so_the_last_one_wins() -> None:
    usage = meter(ANTHROPIC_STREAM)
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_read_tokens) == (25, 10, 3)
    assert usage.output_tokens == 15


def test_ollama_ndjson_final_object() -> None:
    assert (meter(OLLAMA_STREAM).input_tokens, meter(OLLAMA_STREAM).output_tokens) == (9, 4)


def test_non_stream_bodies_without_a_trailing_newline() -> None:
    openai = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    anthropic = json.dumps({"type": "message", "usage": {"input_tokens": 4, "output_tokens": 6}}).encode()
    assert (meter(openai).input_tokens, meter(openai).output_tokens) == (3, 2)
    assert (meter(anthropic).input_tokens, meter(anthropic).output_tokens) == (4, 6)


def test_an_interrupted_stream_reports_no_usage() -> None:
    usage = meter(OPENAI_STREAM[:150])
    assert not usage.reported and usage.total == 0


@given(st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=12))
def test_any_chunking_reads_the_same_usage(cuts: list[int]) -> None:
    assert meter(ANTHROPIC_STREAM, cuts) == meter(ANTHROPIC_STREAM)
    assert meter(OPENAI_STREAM, [c % len(OPENAI_STREAM) for c in cuts]) == meter(OPENAI_STREAM)


@given(st.binary(max_size=300))
def test_garbage_never_raises(body: bytes) -> None:
    meter(body, [len(body) // 2])


def test_negative_or_non_integer_counts_are_ignored() -> None:
    body = b'{"usage":{"prompt_tokens":-5,"completion_tokens":"many"}}'
    assert meter(body).total == 0

"""``stigmergy setup <tool>``: what to paste so a tool sends its requests through the proxy.

Each tool only needs its base URL changed; the ``x-stigmergy-agent`` header (where
the tool can send headers) names the agent, so its requests are scheduled and
budgeted as its own instead of by a fingerprint of key and user agent. With an
access token, the text reads it from ``$STIGMERGY_ACCESS_TOKEN``, never inlines it.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_URL = "http://127.0.0.1:8765"
TOKEN_VARIABLE = "STIGMERGY_ACCESS_TOKEN"


def _claude_code(url: str, agent: str, token: bool) -> str:
    headers = f"x-stigmergy-agent: {agent}"
    value = f"$'{headers}\\nx-stigmergy-token: '\"${TOKEN_VARIABLE}\"" if token else f'"{headers}"'
    return f"""# Claude Code: in your shell profile (or the "env" block of ~/.claude/settings.json)
export ANTHROPIC_BASE_URL={url}
export ANTHROPIC_CUSTOM_HEADERS={value}
"""


def _codex(url: str, agent: str, token: bool) -> str:
    env_headers = f'env_http_headers = {{ "x-stigmergy-token" = "{TOKEN_VARIABLE}" }}\n' if token else ""
    return f"""# Codex: in ~/.codex/config.toml (the key stays in $OPENAI_API_KEY)
model_provider = "stigmergy"

[model_providers.stigmergy]
name = "OpenAI through stigmergy"
base_url = "{url}/v1"
env_key = "OPENAI_API_KEY"
wire_api = "responses"
http_headers = {{ "x-stigmergy-agent" = "{agent}" }}
{env_headers}"""


def _cursor(url: str, agent: str, token: bool) -> str:
    caution = (
        "# Cursor sends no custom headers: start the proxy without --access-token for it,\n"
        "# and its requests are told apart by key and user agent, not by name.\n"
        if token
        else "# Cursor sends no custom headers: its requests are told apart by key and user agent.\n"
    )
    return f"""# Cursor: Settings > Models > API Keys
#   OpenAI API Key:            your key
#   Override OpenAI Base URL:  {url}/v1
# If Cursor calls the URL from its own servers rather than from this machine,
# 127.0.0.1 is out of its reach: serve the proxy where it can reach it, over TLS.
{caution}"""


def _aider(url: str, agent: str, token: bool) -> str:
    token_line = f'        x-stigmergy-token: "<the value of ${TOKEN_VARIABLE}>"\n' if token else ""
    return f"""# aider (through LiteLLM): in your shell profile
export OPENAI_API_BASE={url}/v1
export ANTHROPIC_API_BASE={url}
# and, to name the agent, in .aider.model.settings.yml:
- name: aider/extra_params
  extra_params:
    extra_headers:
        x-stigmergy-agent: "{agent}"
{token_line}"""


def _openai_sdk(url: str, agent: str, token: bool) -> str:
    token_header = f', "x-stigmergy-token": os.environ["{TOKEN_VARIABLE}"]' if token else ""
    return f"""# OpenAI SDK: the environment alone...
export OPENAI_BASE_URL={url}/v1
# ...or in code, naming the agent:
client = AsyncOpenAI(
    base_url="{url}/v1",
    default_headers={{"x-stigmergy-agent": "{agent}"{token_header}}},
    max_retries=0,  # the proxy retries, at the moments the upstream allows
)
"""


def _anthropic_sdk(url: str, agent: str, token: bool) -> str:
    token_header = f', "x-stigmergy-token": os.environ["{TOKEN_VARIABLE}"]' if token else ""
    return f"""# Anthropic SDK: the environment alone...
export ANTHROPIC_BASE_URL={url}
# ...or in code, naming the agent:
client = AsyncAnthropic(
    base_url="{url}",
    default_headers={{"x-stigmergy-agent": "{agent}"{token_header}}},
    max_retries=0,  # the proxy retries, at the moments the upstream allows
)
"""


TOOLS: dict[str, Callable[[str, str, bool], str]] = {
    "claude-code": _claude_code,
    "codex": _codex,
    "cursor": _cursor,
    "aider": _aider,
    "openai-sdk": _openai_sdk,
    "anthropic-sdk": _anthropic_sdk,
}


def setup_text(tool: str, *, url: str = DEFAULT_URL, agent: str | None = None, token: bool = False) -> str:
    """The configuration for ``tool`` (one of :data:`TOOLS`) to use the proxy at ``url``.

    ``url`` is the proxy's own address; an upstream given with a path (``.../v1``)
    changes what the OpenAI-style tools append, so the text assumes the usual
    ``--upstream https://api.openai.com`` without one.
    """
    return TOOLS[tool](url.rstrip("/"), agent or tool, token)

"""``stigmergy proxy`` settings (flags over STIGMERGY_* variables over defaults) and ``stigmergy setup``."""

from __future__ import annotations

import dataclasses

import pytest

from stigmergy.cli import main
from stigmergy.errors import ConfigurationError
from stigmergy.integrations.proxy_config import OPTIONS, ProxyConfig, config_from
from stigmergy.integrations.proxy_setup import TOOLS, setup_text


def test_every_setting_has_a_flag_and_a_variable() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(ProxyConfig)]
    assert {o.env for o in OPTIONS} >= {"STIGMERGY_MAX_IN_FLIGHT", "STIGMERGY_REDIS", "STIGMERGY_INSECURE"}


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    environ = {
        "STIGMERGY_UPSTREAM": "https://api.openai.com/",
        "STIGMERGY_RPM": "50",
        "STIGMERGY_INSECURE": "yes",
    }
    config = config_from({"rpm": "60", "max_in_flight": "4", "insecure": False}, environ)
    assert config.upstream == "https://api.openai.com" and config.provider_name == "openai"
    assert (config.rpm, config.max_in_flight, config.insecure, config.port) == (60.0, 4, True, 8765)
    assert config.limits == {"rpm": 60.0}
    anthropic = config_from({"upstream": "https://api.anthropic.com", "provider": "openai-compatible"}, {})
    assert anthropic.provider_name == "openai-compatible"  # overridden
    assert "access_token" not in repr(config_from({"upstream": "http://x", "access_token": "t" * 20}, {}))


@pytest.mark.parametrize(
    ("flags", "environ", "says"),
    [
        ({}, {}, "--upstream"),
        ({"upstream": "ftp://example.com"}, {}, "http:// or https://"),
        ({"upstream": "https://user:pw@example.com"}, {}, "no credentials"),
        ({"upstream": "https://example.com", "rpm": "many"}, {}, "--rpm"),
        ({"upstream": "https://example.com"}, {"STIGMERGY_MAX_RETRIES": "-1"}, "max_retries"),
        ({"upstream": "https://example.com"}, {"STIGMERGY_INSECURE": "perhaps"}, "STIGMERGY_INSECURE"),
        ({"upstream": "https://example.com", "provider": "acme"}, {}, "provider"),
        ({"upstream": "https://example.com", "access_token": "short"}, {}, "16 characters"),
        ({"upstream": "https://example.com", "redis": "http://redis"}, {}, "redis://"),
        ({"upstream": "https://example.com", "log_level": "loud"}, {}, "log_level"),
    ],
)
def test_bad_settings_are_clear_errors(flags: dict[str, str], environ: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        config_from(flags, environ)


def test_the_command_exits_2_on_bad_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STIGMERGY_UPSTREAM", raising=False)
    assert main(["proxy"]) == 2
    assert "--upstream" in capsys.readouterr().err
    monkeypatch.setenv("STIGMERGY_TPM", "lots")
    assert main(["proxy", "--upstream", "https://api.openai.com"]) == 2
    assert "STIGMERGY_TPM" in capsys.readouterr().err


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_setup_prints_what_points_each_tool_at_the_proxy(
    tool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["setup", tool, "--url", "http://10.0.0.5:9000", "--agent", "alice"]) == 0
    printed = capsys.readouterr().out
    assert "http://10.0.0.5:9000" in printed
    assert tool == "cursor" or "alice" in printed
    with_token = setup_text(tool, token=True)
    assert "STIGMERGY_ACCESS_TOKEN" in with_token or tool == "cursor"


def test_setup_for_claude_code_and_the_sdks() -> None:
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:8765\n" in setup_text("claude-code")
    assert 'ANTHROPIC_CUSTOM_HEADERS="x-stigmergy-agent: claude-code"' in setup_text("claude-code")
    assert "export OPENAI_BASE_URL=http://127.0.0.1:8765/v1" in setup_text("openai-sdk")
    assert 'base_url = "http://127.0.0.1:8765/v1"' in setup_text("codex")

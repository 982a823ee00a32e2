"""Config loading: env substitution and errors that name the file, the path and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchboard.core.config import ConfigError, load_config, load_config_text

GOOD = """
listen: {http: "127.0.0.1:8080", grpc: "127.0.0.1:50051"}
admin_key: ${ADMIN}
keys:
  - {name: app, key: ${APP_KEY}, models: ["gpt-4o*"], rpm: 600}
channels:
  - {name: openai, provider: openai, api_key: ${OPENAI_API_KEY}, models: [gpt-4o, gpt-4o-mini]}
  - name: claude
    provider: anthropic
    api_key: ${ANTHROPIC_API_KEY:-unset}
    model_map: {smart-claude: claude-sonnet-4-20250514}
    priority: 1
    timeouts: {first_token: 5}
routes:
  - {model: smart, targets: [gpt-4o, smart-claude]}
"""
ENV = {"ADMIN": "adm-secret", "APP_KEY": "sk-app-000000", "OPENAI_API_KEY": "sk-up"}


def test_good_config_with_env() -> None:
    cfg = load_config_text(GOOD, "gw.yaml", env=ENV)
    assert cfg.admin_key == "adm-secret" and cfg.keys[0].key == "sk-app-000000"
    assert cfg.channels[0].base_url == "https://api.openai.com/v1"
    assert cfg.channels[1].api_key == "unset"
    assert cfg.channels[1].models == {"smart-claude": "claude-sonnet-4-20250514"}
    assert cfg.channels[1].timeouts.first_token == 5 and cfg.channels[1].timeouts.connect == 10
    assert cfg.routes[0].targets == ("gpt-4o", "smart-claude")


@pytest.mark.parametrize(("text", "env", "message"), [
    (GOOD, {}, "gw.yaml: line 3: environment variable ADMIN is not set"),
    ("channels:\n  - {name: a, provider: foo, models: [m]}", {},
     "gw.yaml: channels[0].provider: unknown provider 'foo'"),
    ("channels:\n  - {name: a, provider: openai, models: []}", {},
     "gw.yaml: channels[0].models: a channel must serve at least one model"),
    ("channels:\n  - {name: a, provider: openai, models: [m], weight: heavy}", {},
     "gw.yaml: channels[0].weight: expected a number"),
    ("channels:\n  - {name: a, provider: openai, models: [m], timeouts: {frist_token: 1}}", {},
     "gw.yaml: channels[0].timeouts.frist_token: unknown setting"),
    ("routes:\n  - {model: x, targets: [ghost]}", {}, "gw.yaml: routes[0].targets[0]: no channel serves model 'ghost'"),
    ("keys:\n  - {name: a, key: short}", {}, "gw.yaml: keys[0].key: is shorter than 8 characters"),
    ("listen: [1, 2]", {}, "gw.yaml: listen: expected a mapping, got list"),
    ("channels: {", {}, "gw.yaml: line 1: invalid YAML"),
    ("chanels: []", {}, "gw.yaml: chanels: unknown setting"),
])
def test_config_errors_name_file_path_and_problem(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "gw.yaml", env=env)
    assert str(exc.value).startswith(message), str(exc.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------- provider options, by the providers' models ----

@pytest.mark.parametrize(("text", "message"), [
    ("channels:\n  - {name: a, provider: echo, models: [m], options: {delay_ms: soon}}",
     "gw.yaml: channels[0].options.delay_ms: expected a number, got 'soon'"),
    ("channels:\n  - {name: a, provider: echo, models: [m], options: {dleay_ms: 5}}",
     "gw.yaml: channels[0].options.dleay_ms: unknown setting (expected one of: delay_ms)"),
    ("channels:\n  - {name: a, provider: echo, models: [m]}\n"
     "  - {name: b, provider: openai, models: [n], options: {stream_usage: maybe}}",
     "gw.yaml: channels[1].options.stream_usage: expected true or false, got 'maybe'"),
    ("channels:\n  - {name: a, provider: anthropic, models: [m], options: {default_max_tokens: {m: 0}}}",
     "gw.yaml: channels[0].options.default_max_tokens.m: expected a whole number >= 1, got 0"),
    ("channels:\n  - {name: a, provider: gemini, models: [m], options: {schema_field: openapi}}",
     "gw.yaml: channels[0].options.schema_field: expected one of parametersJsonSchema, parameters, "
     "got 'openapi'"),
    ("channels:\n  - {name: a, provider: ollama, models: [m], options: {keep_alive: [1]}}",
     "gw.yaml: channels[0].options.keep_alive: expected a duration"),
    ("channels:\n  - {name: a, provider: openai, models: [m], options: [stream_usage]}",
     "gw.yaml: channels[0].options: expected a mapping, got list"),
])
def test_channel_options_are_checked_when_the_config_loads(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "gw.yaml", env={})
    assert str(exc.value).startswith(message), str(exc.value)


def test_channel_options_arrive_typed() -> None:
    from switchboard.core.providers import anthropic, echo, gemini, ollama

    cfg = load_config_text(
        "channels:\n"
        "  - {name: e, provider: echo, models: [e], options: {delay_ms: 5}}\n"
        "  - {name: a, provider: anthropic, models: [a], options: {default_max_tokens: {'*': 64}}}\n"
        "  - {name: g, provider: gemini, models: [g], options: {include_thoughts: false}}\n"
        "  - {name: o, provider: ollama, models: [o]}\n", "gw.yaml", env={})
    assert echo.Options.of(cfg.channels[0]).delay_ms == 5.0
    assert anthropic.default_max_tokens(anthropic.Options.of(cfg.channels[1]), "any") == 64
    g = gemini.Options.of(cfg.channels[2])
    assert g.include_thoughts is False and g.schema_field == "parametersJsonSchema"
    assert ollama.Options.of(cfg.channels[3]) == ollama.Options()
    with pytest.raises(TypeError):
        gemini.Options.of(cfg.channels[0])


def test_provider_names_and_default_urls_come_from_the_registry() -> None:
    from switchboard.core.providers import SPECS

    with pytest.raises(ConfigError) as exc:
        load_config_text("channels:\n  - {name: a, provider: foo, models: [m]}", "gw.yaml", env={})
    assert str(exc.value).endswith(f"(expected one of: {', '.join(SPECS)})")
    for name, spec in SPECS.items():
        if spec.upstream and not spec.default_base_url:
            continue  # azure: no default, base_url required (tests/test_provider_azure.py)
        cfg = load_config_text(f"channels:\n  - {{name: a, provider: {name}, models: [m]}}", "gw.yaml",
                               env={})
        assert cfg.channels[0].base_url == spec.default_base_url
        assert type(cfg.channels[0].options) is spec.options


def test_a_registered_provider_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a provider is a module and a registry line: the config needs nothing else."""
    from pydantic import Field

    from switchboard.core.config import ProviderOptions, ProviderSpec, Whole
    from switchboard.core.providers import SPECS
    from switchboard.core.providers.openai import OpenAIClient

    class QuirkyOptions(ProviderOptions):
        deployment_depth: Whole = Field(default=1, description="test option")

    monkeypatch.setitem(SPECS, "quirky", ProviderSpec(name="quirky", default_base_url="https://q.test",
                                                      options=QuirkyOptions, client=OpenAIClient))
    cfg = load_config_text("channels:\n  - {name: q, provider: quirky, models: [m], "
                           "options: {deployment_depth: 3}}", "gw.yaml", env={})
    assert cfg.channels[0].base_url == "https://q.test"
    assert QuirkyOptions.of(cfg.channels[0]).deployment_depth == 3
    with pytest.raises(ConfigError, match=r"channels\[0\]\.options\.deployment_depth: must be >= 0"):
        load_config_text("channels:\n  - {name: q, provider: quirky, models: [m], "
                         "options: {deployment_depth: -1}}", "gw.yaml", env={})


def test_channels_built_in_code_get_their_providers_options() -> None:
    from switchboard.core.config import ChannelConfig
    from switchboard.core.providers import anthropic

    ch = ChannelConfig(name="c", provider="anthropic", base_url="http://127.0.0.1:1")
    assert ch.options == anthropic.Options() and ch.owned_by == "anthropic"


def test_null_means_default_and_old_zero_rules_hold() -> None:
    cfg = load_config_text("router: {max_attempts: 0, backoff_ms: null}\nlimits: {redis_timeout_s: 0}\n"
                           "timeouts: {connect: 3}\nchannels:\n"
                           "  - {name: a, provider: openai, models: [m], timeouts: {idle: 7, total: null}}",
                           "gw.yaml", env={})
    assert cfg.router.max_attempts == 1 and cfg.router.backoff_ms == 50.0
    assert cfg.limit_settings.redis_timeout_s == 0.5
    t = cfg.channels[0].timeouts
    assert (t.connect, t.first_token, t.idle, t.total) == (3.0, 60.0, 7.0, 600.0)


def test_check_config_exits_2_on_a_bad_option(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "sb.yaml"
    bad.write_text("channels:\n  - {name: a, provider: echo, models: [m], options: {delay_ms: soon}}\n")
    run = subprocess.run([sys.executable, "-m", "switchboard.core.composition.cli", "check-config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and not run.stdout
    assert f"{bad}: channels[0].options.delay_ms: expected a number, got 'soon'" in run.stderr


# ------------------------------------------------------------- the generated reference ----

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_config_docs.py"


def test_configuration_reference_is_generated_from_the_models(tmp_path: Path) -> None:
    """docs/configuration.md is what scripts/gen_config_docs.py writes; a stale copy fails."""
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    doc = (SCRIPT.parent.parent / "docs" / "configuration.md").read_text()
    for key in ("`first_token`", "`delay_ms`", "`default_max_tokens`", "`schema_field`", "`stream_usage`"):
        assert key in doc
    stale = tmp_path / "configuration.md"
    stale.write_text(doc.replace("`delay_ms`", "`delay`"))
    again = subprocess.run([sys.executable, str(SCRIPT), "--check", "--output", str(stale)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "stale" in again.stderr

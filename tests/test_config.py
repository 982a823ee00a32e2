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

"""Small fixes of issue 16: help text, clearer Config errors, `demo --prefix`."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner

from asgi_worker import Config, ConfigurationError
from asgi_worker.cli.commands import main
from asgi_worker.cli.demo import demo_config
from asgi_worker.testing import find_middleware


def test_invalidate_help_prints_one_example_per_line() -> None:
    result = CliRunner().invoke(main, ["invalidate", "--help"])
    assert result.exit_code == 0
    assert "\\b" not in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    for kind in ("path", "prefix", "glob", "query", "tag"):
        assert sum(line.startswith(f"asgi-worker invalidate {kind} ") for line in lines) == 1
    assert sum("asgi-worker invalidate" in line for line in lines) == 5


@pytest.mark.parametrize("field", ["ttl", "job_timeout", "stale_ttl", "max_wait", "claim_ttl"])
def test_a_duration_given_as_a_string_says_so(field: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Config(**{field: "300"})
    assert str(raised.value) == f"Config.{field} must be a number of seconds, got str '300'"
    assert raised.value.field == field


def test_a_non_finite_duration_still_says_finite() -> None:
    with pytest.raises(ConfigurationError, match=r"^Config\.ttl must be a finite number > 0$"):
        Config(ttl=float("inf"))


@pytest.mark.parametrize("key_credentials", [False, True])
def test_a_short_secret_is_refused_whenever_given(key_credentials: bool) -> None:
    with pytest.raises(ConfigurationError, match=r"^Config\.secret .*16 characters") as raised:
        Config(secret="short", key_credentials=key_credentials)
    assert "short" not in str(raised.value)  # never echo a secret
    assert Config(secret="x" * 16).secret == "x" * 16


def test_a_short_secret_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match=r"^Config\.secret .*ASGI_WORKER_SECRET"):
        Config.from_env({"ASGI_WORKER_SECRET": "short"})


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_retry_after_must_be_a_whole_second_or_more(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^Config\.retry_after .*>= 1"):
        Config(retry_after=value)
    assert Config(retry_after=1).retry_after == 1


def test_demo_config_takes_a_prefix() -> None:
    assert demo_config(None).prefix == Config().prefix
    assert demo_config(None, prefix="mine").prefix == "mine"
    on_redis = demo_config("redis://127.0.0.1:6379/0", prefix="mine")
    assert (on_redis.prefix, on_redis.inline_worker) == ("mine", True)


def test_demo_command_passes_prefix_to_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: served.append(app))
    result = CliRunner().invoke(main, ["demo", "--prefix", "demo-prefix"], env={})
    assert result.exit_code == 0, result.output
    (app,) = served
    assert find_middleware(app).config.prefix == "demo-prefix"

    result = CliRunner().invoke(main, ["demo", "--prefix", "a b"], env={})
    assert result.exit_code == 2
    assert "Config.prefix must not contain" in result.output

"""config.py: validation, defaults, from_env parsing, immutability."""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import math
import pydoc
import re
import typing
from typing import Any

import pytest

from asgi_worker import Config, ConfigurationError
from asgi_worker.core.config import FieldDoc, _field_type, documented, field_docs
from asgi_worker.core.redis_urls import display_url


def test_defaults_are_valid() -> None:
    config = Config()
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.queue_redis_url is None
    assert config.prefix == "aw"
    assert config.ttl == 300.0
    assert config.error_ttl == 10.0
    assert config.job_timeout == 60.0
    assert config.claim_lease == 90.0
    assert config.vary == ()
    assert config.include == ("*",)
    assert config.exclude == ()
    assert config.queue == "aw:queue"
    assert config.fail_open is False


def test_claim_ttl_default_is_job_timeout_plus_30() -> None:
    assert Config(job_timeout=5).claim_lease == 35
    assert Config(job_timeout=0.25).claim_lease == pytest.approx(30.25)


def test_explicit_claim_ttl_is_kept() -> None:
    assert Config(job_timeout=5, claim_ttl=6).claim_lease == 6


def test_queue_name_overrides_default_queue() -> None:
    assert Config(prefix="p").queue == "p:queue"
    assert Config(prefix="p", queue_name="jobs").queue == "jobs"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prefix", ""),
        ("prefix", "a{b}"),
        ("prefix", "{aw}"),
        ("prefix", "a}"),
        ("prefix", "a*"),
        ("prefix", "a b"),
        ("ttl", 0),
        ("ttl", -1),
        ("ttl", math.nan),
        ("error_ttl", 0),
        ("job_timeout", 0),
        ("job_timeout", -5),
        ("poll_delay", 0),
        ("redis_timeout", 0),
        ("retry_after", -1),
        ("max_body_bytes", 0),
        ("max_jobs", 0),
        ("queue_name", ""),
        ("redis_url", "http://localhost:6379"),
        ("redis_url", "localhost:6379"),
        ("redis_url", ""),
        ("queue_redis_url", "amqp://localhost"),
        ("vary", ("accept language",)),
        ("vary", ("x:y",)),
        ("vary", ("",)),
        ("vary", ("acc\nept",)),
        ("vary", ("authorization",)),
        ("vary", ("Cookie",)),
        ("vary", ("accept", " AUTHORIZATION ")),
    ],
)
def test_invalid_value_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"^Config\.{field} ") as raised:
        Config(**{field: value})
    assert raised.value.field == field


@pytest.mark.parametrize(("job_timeout", "claim_ttl"), [(10, 10), (10, 9.99), (10, 1)])
def test_claim_ttl_must_exceed_job_timeout(job_timeout: float, claim_ttl: float) -> None:
    with pytest.raises(ConfigurationError, match=r"Config\.claim_ttl must exceed job_timeout"):
        Config(job_timeout=job_timeout, claim_ttl=claim_ttl)


@pytest.mark.parametrize("field", ["ttl", "error_ttl", "job_timeout", "claim_ttl"])
def test_non_finite_duration_is_refused(field: str) -> None:
    # round(inf * 1000) raises OverflowError in store._milliseconds: an infinite ttl or
    # lease would fail inside a request or job instead of at start-up.
    with pytest.raises(ConfigurationError, match=rf"Config\.{field} "):
        Config(**{field: math.inf})


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


def test_vary_is_lowercased_stripped_and_deduplicated() -> None:
    config = Config(vary=("Accept-Language", " X-Tenant ", "accept-language", "X-TENANT"))
    assert config.vary == ("accept-language", "x-tenant")


def test_valid_urls() -> None:
    config = Config(redis_url="rediss://h:6380/1", queue_redis_url="unix:///tmp/redis.sock")
    assert config.redis_url == "rediss://h:6380/1"
    assert config.queue_redis_url == "unix:///tmp/redis.sock"
    assert Config(redis_url="memory://").embedded is True


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ttl = 1  # type: ignore[misc]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        config.unknown = 1  # type: ignore[attr-defined]
    assert config.ttl == 300.0


def test_replace_recomputes_the_default_claim_ttl() -> None:
    # claim_ttl was never set: its default should follow the new job_timeout.
    changed = dataclasses.replace(Config(), job_timeout=120)
    assert changed.claim_lease == 150


def wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a field of type `hint`, the likely slips first."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = (arg for arg in args if arg is not type(None))
    kind = typing.get_origin(hint) or hint
    wrong: dict[Any, list[Any]] = {
        bool: ["false", 1, 0.0],
        int: [True, 1.5, "5"],
        float: [True, "300", b"1"],
        str: [5, b"x", True],
        tuple: ["/x", {"/x"}, (5,), 5],
    }
    return wrong[kind] + ([] if optional else [None])


TYPE_CASES = [
    pytest.param(spec.name, value, id=f"{spec.name}={value!r}")
    for spec in dataclasses.fields(Config)
    for value in wrong_values(typing.get_type_hints(Config)[spec.name])
]


@pytest.mark.parametrize(("field", "value"), TYPE_CASES)
def test_a_value_of_the_wrong_type_names_the_field(field: str, value: Any) -> None:
    # Every field, present and future: Config(fail_open="false") used to count as true.
    with pytest.raises(ConfigurationError) as raised:
        Config(**{field: value})
    assert raised.value.field == field
    assert str(raised.value).startswith(f"Config.{field} "), str(raised.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fail_open", "false", "Config.fail_open must be True or False, got str 'false'"),
        ("max_jobs", 2.5, "Config.max_jobs must be a whole number, got float 2.5"),
        ("prefix", 5, "Config.prefix must be a string, got int 5"),
        (
            "include",
            "/api/*",
            "Config.include must be a tuple (or list) of strings, got str '/api/*'; "
            "one pattern is written ('/api/*',)",
        ),
        ("vary", ("accept", 5), "Config.vary must be a tuple (or list) of strings, got tuple"),
    ],
)
def test_a_wrong_type_says_what_the_field_takes(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Config(**{field: value})
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("field", "value"),
    [("secret", b"0123456789abcdef-bytes"), ("redis_url", b"redis://:pw-in-bytes@h/0")],
)
def test_a_wrong_type_never_shows_a_secret(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Config(**{field: value})
    assert str(raised.value) == f"Config.{field} must be a string, got bytes"


def test_lists_are_taken_for_tuples_and_the_config_stays_hashable() -> None:
    # As settings files (JSON, YAML, TOML) give them.
    config = Config(include=["/a/*"], exclude=[], vary=["Accept"], ttl_rules=[["/a/*", 5]])
    assert config == Config(include=("/a/*",), vary=("accept",), ttl_rules=(("/a/*", 5),))
    assert (config.include, config.exclude, config.vary) == (("/a/*",), (), ("accept",))
    assert hash(config) == hash(Config(include=("/a/*",), vary=("accept",), ttl_rules=("/a/*=5",)))


def test_ints_are_taken_for_floats() -> None:
    assert Config(ttl=5, claim_ttl=None, max_wait=0).ttl == 5


def test_a_field_type_with_no_check_fails_at_import() -> None:
    spec = next(spec for spec in dataclasses.fields(Config) if spec.name == "vary")
    with pytest.raises(TypeError, match="no type check"):
        _field_type(spec, dict[str, int])


@pytest.mark.parametrize(
    ("field", "pattern"), [("include", "reports"), ("include", "reports/*"), ("exclude", "")]
)
def test_a_path_pattern_must_start_with_a_slash(field: str, pattern: str) -> None:
    # The path a pattern is matched against starts with /: "reports" never matches.
    with pytest.raises(
        ConfigurationError, match=rf"^Config\.{field} pattern {re.escape(repr(pattern))} "
    ) as raised:
        Config(**{field: ("/ok", pattern)})
    assert raised.value.field == field


def test_a_path_pattern_may_start_with_a_star() -> None:
    assert Config(include=("*",), exclude=("*.json", "/health")).exclude == ("*.json", "/health")


# --- from_env --------------------------------------------------------------------------------

FULL_ENV = {
    "ASGI_WORKER_REDIS_URL": "redis://cache:6379/2",
    "ASGI_WORKER_QUEUE_REDIS_URL": "redis://queue:6379/3",
    "ASGI_WORKER_PREFIX": "shop",
    "ASGI_WORKER_TTL": "120.5",
    "ASGI_WORKER_ERROR_TTL": "3",
    "ASGI_WORKER_JOB_TIMEOUT": "20",
    "ASGI_WORKER_CLAIM_TTL": "25.5",
    "ASGI_WORKER_RETRY_AFTER": "4",
    "ASGI_WORKER_VARY": "Accept-Language, X-Tenant,,",
    "ASGI_WORKER_INCLUDE": "/api/*,/reports/*",
    "ASGI_WORKER_EXCLUDE": " /api/health ",
    "ASGI_WORKER_QUEUE_NAME": "shop-jobs",
    "ASGI_WORKER_MAX_BODY_BYTES": "2048",
    "ASGI_WORKER_POLL_DELAY": "0.05",
    "ASGI_WORKER_MAX_JOBS": "3",
    "ASGI_WORKER_REDIS_TIMEOUT": "0.5",
    "ASGI_WORKER_FAIL_OPEN": "yes",
    "ASGI_WORKER_INLINE_WORKER": "off",
    "UNRELATED": "ignored",
}


def test_from_env_parses_every_field() -> None:
    config = Config.from_env(FULL_ENV)
    assert config == Config(
        redis_url="redis://cache:6379/2",
        queue_redis_url="redis://queue:6379/3",
        prefix="shop",
        ttl=120.5,
        error_ttl=3.0,
        job_timeout=20.0,
        claim_ttl=25.5,
        retry_after=4,
        vary=("accept-language", "x-tenant"),
        include=("/api/*", "/reports/*"),
        exclude=("/api/health",),
        queue_name="shop-jobs",
        max_body_bytes=2048,
        poll_delay=0.05,
        max_jobs=3,
        redis_timeout=0.5,
        fail_open=True,
        inline_worker=False,
    )
    assert type(config.retry_after) is int
    assert type(config.max_body_bytes) is int
    assert type(config.ttl) is float
    assert type(config.fail_open) is bool


def env_text(value: Any) -> str:
    """How a value is written in an ASGI_WORKER_* variable."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(env_text(item) for item in value)
    return str(value)


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(Config)])
def test_from_env_parses_the_default_of_every_field(field: str) -> None:
    # Every field, present and future, can be set from the environment.
    default = Config()
    variable = "ASGI_WORKER_" + field.upper()
    assert Config.from_env({variable: env_text(getattr(default, field))}) == default


def test_from_env_empty_environment_gives_defaults() -> None:
    assert Config.from_env({}) == Config()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        (" True ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_from_env_booleans(raw: str, expected: bool) -> None:
    assert Config.from_env({"ASGI_WORKER_FAIL_OPEN": raw}).fail_open is expected


def test_from_env_optional_empty_is_none() -> None:
    config = Config.from_env(
        {
            "ASGI_WORKER_QUEUE_REDIS_URL": "",
            "ASGI_WORKER_QUEUE_NAME": "  ",
            "ASGI_WORKER_CLAIM_TTL": "",
            "ASGI_WORKER_JOB_TIMEOUT": "7",
        }
    )
    assert config.queue_redis_url is None
    assert config.queue_name is None
    assert config.claim_lease == 37


def test_from_env_empty_tuple() -> None:
    assert Config.from_env({"ASGI_WORKER_EXCLUDE": ""}).exclude == ()
    assert Config.from_env({"ASGI_WORKER_VARY": " , "}).vary == ()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASGI_WORKER_TTL", "42")
    monkeypatch.setenv("ASGI_WORKER_PREFIX", "fromenv")
    config = Config.from_env()
    assert (config.ttl, config.prefix) == (42.0, "fromenv")


def test_from_env_overrides_win() -> None:
    config = Config.from_env(
        {"ASGI_WORKER_TTL": "5", "ASGI_WORKER_PREFIX": "env"}, ttl=7, vary=("X-A",)
    )
    assert config.ttl == 7
    assert config.prefix == "env"
    assert config.vary == ("x-a",)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("ASGI_WORKER_TTL", "soon"),
        ("ASGI_WORKER_TTL", ""),
        ("ASGI_WORKER_ERROR_TTL", "1s"),
        ("ASGI_WORKER_CLAIM_TTL", "x"),
        ("ASGI_WORKER_RETRY_AFTER", "1.5"),
        ("ASGI_WORKER_MAX_JOBS", "ten"),
        ("ASGI_WORKER_MAX_BODY_BYTES", "10MB"),
        ("ASGI_WORKER_FAIL_OPEN", "maybe"),
        ("ASGI_WORKER_FAIL_OPEN", "2"),
    ],
)
def test_from_env_unparseable_value_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{variable}=") as raised:
        Config.from_env({variable: raw})
    assert raised.value.field == variable.removeprefix("ASGI_WORKER_").lower()


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("ASGI_WORKER_TTL", "-1"),
        ("ASGI_WORKER_PREFIX", "a{b}"),
        ("ASGI_WORKER_REDIS_URL", "http://x"),
        ("ASGI_WORKER_VARY", "cookie"),
    ],
)
def test_from_env_invalid_value_names_the_variable(variable: str, raw: str) -> None:
    # ConfigurationError's docstring: "from Config.from_env(), the message names the variable".
    with pytest.raises(ConfigurationError, match=variable) as raised:
        Config.from_env({variable: raw})
    assert raised.value.field == variable.removeprefix("ASGI_WORKER_").lower()


@pytest.mark.parametrize(
    ("variable", "suggested"),
    [
        ("ASGI_WORKER_TTLL", "ASGI_WORKER_TTL"),
        ("ASGI_WORKER_ttl", "ASGI_WORKER_TTL"),
        ("ASGI_WORKER_REDIS_UR", "ASGI_WORKER_REDIS_URL"),
        ("ASGI_WORKER_FAILOPEN", "ASGI_WORKER_FAIL_OPEN"),
        ("ASGI_WORKER_INCLUDES", "ASGI_WORKER_INCLUDE"),
    ],
)
def test_from_env_a_variable_that_names_no_field_suggests_the_closest(
    variable: str, suggested: str
) -> None:
    # A typo used to leave its field at the default, unnoticed.
    with pytest.raises(ConfigurationError) as raised:
        Config.from_env({"ASGI_WORKER_PREFIX": "p", variable: "5"})
    assert str(raised.value) == f"{variable} is not a setting; did you mean {suggested}?"


def test_from_env_a_variable_like_no_field_points_to_the_docs() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^ASGI_WORKER_XYZZY is not a setting; "
    ) as raised:
        Config.from_env({"ASGI_WORKER_XYZZY": "1"})
    assert "docs/configuration.md" in str(raised.value)


def test_from_env_an_override_does_not_excuse_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASGI_WORKER_TTLL", "5")
    with pytest.raises(ConfigurationError, match="did you mean ASGI_WORKER_TTL"):
        Config.from_env(ttl=3)


def test_from_env_never_shows_a_password_or_the_secret() -> None:
    unknown = {"ASGI_WORKER_SECRETT": "hunter2-hunter2-hunter2"}
    short = {"ASGI_WORKER_SECRET": "hunter2"}
    bad_url = {"ASGI_WORKER_QUEUE_REDIS_URL": "http://:hunter2@h/0"}
    for environ in (unknown, short, bad_url):
        with pytest.raises(ConfigurationError) as raised:
            Config.from_env(environ)
        assert "hunter2" not in str(raised.value), str(raised.value)
    assert str(raised.value).endswith("(from ASGI_WORKER_QUEUE_REDIS_URL='http://:***@h/0')")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        (
            "rediss://user:p%40ss@host/2?ssl_cert_reqs=none",
            "rediss://user:***@host/2?ssl_cert_reqs=none",
        ),
        ("redis://user@host/0", "redis://user@host/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("memory://", "memory://"),
    ],
)
def test_display_url_masks_only_the_password(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_repr_masks_the_passwords_of_redis_urls() -> None:
    config = Config(redis_url="redis://:s3cret@h/0", queue_redis_url="redis://u:p4ss@q/1")
    shown = repr(config)
    assert "s3cret" not in shown
    assert "p4ss" not in shown
    assert "redis_url='redis://:***@h/0'" in shown
    assert "queue_redis_url='redis://u:***@q/1'" in shown
    assert shown.startswith("Config(")
    assert "prefix='aw'" in shown
    assert repr(Config(redis_url="memory://")).startswith("Config(redis_url='memory://', ")


# --- help(Config) ------------------------------------------------------------------------------


def test_help_says_what_each_field_means() -> None:
    docs = field_docs(Config)
    assert [spec.name for spec in docs] == [spec.name for spec in dataclasses.fields(Config)]
    assert all(spec.doc for spec in docs), [spec.name for spec in docs if not spec.doc]
    shown = pydoc.render_doc(Config)
    for spec in docs:
        assert spec.name in shown
        assert spec.doc.splitlines()[0] in shown, spec.name
    doc = inspect.getdoc(Config) or ""
    assert "\nttl: float = 300.0\n    How long a stored response is served." in doc
    assert "\nclaim_ttl: float | None = None\n" in doc


def test_a_field_doc_is_the_docstring_under_the_field() -> None:
    prefix = next(spec for spec in field_docs(Config) if spec.name == "prefix")
    assert prefix == FieldDoc(
        "prefix", "str", "'aw'", "Prefix of every Redis key the cache writes."
    )


@dataclasses.dataclass
class Documented:
    """A class of this test module, with a field docstring."""

    size: int = 3
    """How big,
    in units."""
    plain: str = "x"


def test_the_fields_section_needs_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    assert documented(Documented) == (
        "A class of this test module, with a field docstring.\n\nFields:\n\n"
        "size: int = 3\n    How big,\n    in units.\nplain: str = 'x'"
    )
    monkeypatch.setattr(linecache, "getlines", lambda *args: [])  # a build without .py files
    assert documented(Documented) == Documented.__doc__

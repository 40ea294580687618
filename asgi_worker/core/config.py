"""`Config`: the one frozen object the middleware and the worker share.

`Config.from_env()` is the only place in the package that reads environment variables.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import linecache
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from asgi_worker.core.credentials import CREDENTIAL_HEADERS, CredentialGuard, sealing_available
from asgi_worker.core.redis_urls import (
    CLUSTER_SCHEMES,
    FALSE_WORDS,
    SENTINEL_SCHEMES,
    TRUE_WORDS,
    URL_SCHEMES,
    display_url,
    is_cluster_url,
    parse_cluster_url,
    parse_sentinel_url,
)

ENV_PREFIX = "ASGI_WORKER_"
MEMORY_URL = "memory://"
DASHBOARD_TOKEN_VARIABLE = ENV_PREFIX + "DASHBOARD_TOKEN"
"""The ops dashboard's token (`asgi-worker dashboard`): a secret, not a `Config` field."""
NOT_SETTINGS = frozenset({DASHBOARD_TOKEN_VARIABLE})
"""`ASGI_WORKER_` variables that are no `Config` field: `Config.from_env` lets them be."""

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")  # RFC 9110 token, lowercased
# Credentials make a response private to one client: a shared cache must not key on them
# silently (RFC 9111 section 3.5). Such requests bypass the cache instead.
_PRIVATE_HEADERS = frozenset(name.decode() for name in CREDENTIAL_HEADERS)


class ConfigurationError(ValueError):
    """A `Config` field has a value the library cannot work with.

    The message names the field (and, from `Config.from_env()`, the variable).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        """The name of the offending `Config` field, where one is to blame."""


@dataclass(frozen=True, slots=True)
class Config:
    """Settings shared by `WorkerMiddleware` and the worker.

    Durations are in seconds. Every value is checked when the object is built, so a
    mistake shows at start-up as a `ConfigurationError` naming the field, not later
    inside a request. Each field takes values of its own type only: `True` or `False`
    (not `"false"`, not `0`), an `int` for a count, an `int` or a `float` for a duration,
    a `str`, and `None` where the default is. A tuple field also takes a list, which is
    kept as a tuple, so a `Config` stays hashable.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the stored responses and claims.
    `redis://`, `rediss://` (TLS) or `unix://`; `memory://` for the embedded backend (one
    process, jobs run as tasks in it: for demos, tests and single-process apps);
    `redis+sentinel://s1:26379,s2:26379/mymaster/0` through Sentinel (see
    docs/sentinel.md); `redis+cluster://h1:6379,h2:6379/` for a Redis Cluster (see
    docs/cluster.md). `rediss+sentinel://` and `rediss+cluster://` are TLS too; a private
    CA or a client certificate goes in the query:
    `?ssl_ca_certs=/ca.pem&ssl_certfile=...&ssl_keyfile=...` (also `ssl_cert_reqs`,
    `ssl_check_hostname`; see docs/sentinel.md#tls, docs/cluster.md#tls)."""
    queue_redis_url: str | None = None
    """Redis holding the arq queue, in the same URL forms as `redis_url` (None: that one).
    arq cannot use a Cluster: with a Cluster `redis_url` this one is required (unless
    `inline_worker`), and not a Cluster. Give it a Redis that never evicts
    (`maxmemory-policy noeviction`) where the cache's does (see docs/scale.md)."""
    prefix: str = "aw"
    """Prefix of every Redis key the cache writes."""
    ttl: float = 300.0
    """How long a stored response is served."""
    error_ttl: float = 10.0
    """How long an error response (app exception, timeout, 5xx, body too large) is served."""
    stale_ttl: float = 0.0
    """After `ttl`, how long a response is still served while one refresh runs (RFC 5861
    stale-while-revalidate; the app's own `stale-while-revalidate=` wins)."""
    min_ttl: float = 1.0
    """Floor on any freshness the app asks for (`max-age=0`): the polling client must be
    able to collect the response its 202 promised."""
    ttl_rules: tuple[tuple[str, float], ...] = ()
    """Per-route ttl, `(("/reports/*", 3600), ...)` or `("/reports/*=3600", ...)`; the first
    matching pattern wins; the app's `Cache-Control: s-maxage/max-age` wins over both."""
    pass_ttl: float = 60.0
    """How long a key stays hit-for-pass after the app answered `private`, `no-store` or
    with `Set-Cookie`: its requests go straight to the app."""
    tag_header: str = "surrogate-key"
    """Response header holding space-separated invalidation tags (stripped when stored)."""
    job_timeout: float = 60.0
    """How long the worker lets the app run for one request before storing a 504; a body
    still streaming then is a live stream, the app's to serve (hit-for-pass, see
    docs/stored-response.md)."""
    claim_ttl: float | None = None
    """Lease of the claim that dedups jobs; must exceed `job_timeout` (None: `job_timeout`
    + 30 s, see `claim_lease`). A job that starts with less than `job_timeout +
    redis_timeout` of it left renews it first (one more round trip)."""
    retry_after: int = 1
    """Seconds sent in `Retry-After` on a 202 or 503: a whole number, at least 1 (0 would
    have polling clients ask again without pause)."""
    adaptive_retry_after: bool = False
    """On a 202, send the recent typical job duration of the path (whole seconds, from
    `retry_after` up to `max_retry_after`) instead; costs misses one more round trip."""
    max_retry_after: int = 60
    """Cap on the adaptive `Retry-After`."""
    vary: tuple[str, ...] = ()
    """Request header names that are part of the cache key (and replayed to the app)."""
    include: tuple[str, ...] = ("*",)
    """Path patterns (shell-style, `*` matches across `/`) handled by the worker. Each
    starts with `/`, or with `*` (alone, every path)."""
    exclude: tuple[str, ...] = ()
    """Path patterns that bypass the worker, as in `include`; they win over it."""
    queue_name: str | None = None
    """arq queue name (None: `<prefix>:queue`)."""
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest response body stored; a larger one sent whole is replaced by a short-lived
    502, one still streaming past it is a live stream (hit-for-pass). A body over
    `stream_body_bytes` costs a worker job about 1x its size while it is stored, and
    Redis 1x for as long as it is kept (see docs/stored-response.md#large-bodies)."""
    stream_body_bytes: int = 1024 * 1024
    """Bodies larger than this are stored apart from their entry, in pieces, and a hit
    streams them to the client a chunk (256 KiB) at a time: each hit then holds about one
    chunk in the web process, never the whole body, and the near cache never holds them.
    Smaller bodies are served whole from the entry, in its one round trip."""
    compress: bool = True
    """Store a compressible answer (text, JSON, XML, JavaScript, SVG, with no coding of its
    own) gzipped, once, and serve it as gzip to a client that accepts gzip and decoded to
    one that does not; an answer the app gzipped itself is decoded for such a client too
    (see docs/compression.md). False stores every body as the app sent it."""
    compress_min_bytes: int = 1024
    """Bodies of this size or smaller are stored as the app sent them (one packet on the
    wire either way), as are bodies stored apart (`stream_body_bytes`), and any that gzip
    does not shrink by 10 %."""
    compress_level: int = 9
    """zlib's level for that gzip, 1 (fastest) to 9 (smallest). Paid once per stored
    answer, not per hit: 9, as Starlette's `GZipMiddleware`, makes a JSON report about
    6 % smaller than 6 for about 4 times the CPU (docs/compression.md#the-level)."""
    decoded_bodies_bytes: int = 16 * 1024 * 1024
    """Memory a web process spends on gzip entries decoded for clients that accept no
    gzip, kept 10 s each (least recently used out first), so a hot entry is decoded once
    per 10 s, not on every hit; 0 decodes on every hit."""
    poll_delay: float = 0.01
    """How often arq's own `Worker` (`arq module.WorkerSettings`) and `run_pending` poll
    the queue (arq's default is 0.5 s). `asgi-worker worker` does not poll: each enqueue
    wakes it, and idle it looks at the queue every 3 s (see docs/scale.md)."""
    max_jobs: int = 10
    """Jobs one worker process (or one web process, with in-process jobs) runs at once."""
    redis_timeout: float = 2.0
    """Seconds to wait for Redis before treating it as down. On the web side all of one
    request's Redis work (its lookup, the enqueue, a 202's hints) ends within it; in the
    worker, each connect and each command (a job's steps are retried for as long)."""
    fail_open: bool = False
    """On a Redis error, pass the request to the app instead of answering 503."""
    max_wait: float = 10.0
    """Longest a request may be held for `Prefer: wait=N` (RFC 7240); 0 turns waiting off."""
    max_waiters: int = 1000
    """Requests one web process holds at once for `Prefer: wait`; beyond, they get 202."""
    coalesce: bool = True
    """Requests for a key whose lookup is already on its way in this process share it
    (single-flight) instead of each sending their own."""
    near_cache_ttl: float = 0.0
    """Keep fresh hits in the web process this many seconds (e.g. 0.1) so a hot key costs
    one Redis round trip per process per interval; 0 turns it off. Commits and
    invalidations evict at once; nothing older than this is ever served from it."""
    near_cache_bytes: int = 32 * 1024 * 1024
    """Memory bound of the near cache (least recently used out first)."""
    key_credentials: bool = False
    """Give requests with `Authorization`/`Cookie` entries of their own (keyed by a MAC of
    the credentials) instead of passing them to the app. Needs `secret`."""
    secret: str | None = field(default=None, repr=False)
    """Keys the credential MAC and seals credentials in jobs (`key_credentials`): 16
    characters or more, checked whenever given. Never shown in `repr` or errors."""
    replay_client: bool = True
    """Replay each job's request with the address of the client whose request enqueued it,
    so the app sees `request.client` in the worker as in the web process. The address is
    kept in the queue (Redis) until the job runs; False keeps none, and the replay has
    `client: None`. Not part of the key: an answer that shows the address shows the first
    client's to every client (see docs/stored-response.md)."""
    inline_worker: bool = False
    """Run jobs as tasks in the web process, with the Redis store, instead of in an arq
    worker (implied by `memory://`)."""
    max_queued: int = 10_000
    """Jobs waiting in the queue at most; a miss that would enqueue one more gets `503`
    with `Retry-After` (`Cache-Status: ...; detail=queue-full`). 0: no cap. See
    docs/under-attack.md."""
    fair_queueing: bool = True
    """Space each path's queued jobs by its typical job duration over `max_jobs`, so a
    flood of distinct URLs on one path does not delay the other paths' jobs."""
    allowed_hosts: tuple[str, ...] = ()
    """Host name patterns (shell-style: `example.com`, `*.example.com`) served; a request
    for any other host gets `400`, with no lookup and no job. Empty: every host."""
    ignore_params: tuple[str, ...] = ()
    """Query parameter name patterns (shell-style, `utm_*`) dropped from the key and the
    replay, e.g. `("utm_*", "fbclid", "gclid")`."""
    sort_query: bool = False
    """Key and replay query parameters in order of name (repeated names keep their order)."""
    metrics: bool = False
    """Prometheus metrics of the web process (`pip install 'asgi-worker[metrics]'`), served
    by the middleware at `metrics_path`; see docs/metrics.md."""
    metrics_path: str = "/metrics"
    """Where the middleware serves the metrics, with `metrics` on (never cached)."""
    tracing: bool = False
    """OpenTelemetry spans for requests and jobs, one trace across the queue
    (`pip install 'asgi-worker[otel]'`); see docs/tracing.md."""
    dashboard_counts: bool = False
    """Count hits, misses and lookup latency per minute (the last hour) and keep a list of
    recent jobs, for the ops dashboard (`asgi_worker.dashboard`; see docs/dashboard.md).
    On Redis they are written to the queue's Redis about once a second, off the request
    path; with `memory://` they stay in the process."""

    def __post_init__(self) -> None:
        # Before the type checks: its own message says what Retry-After needs.
        _require(
            isinstance(self.retry_after, int)
            and not isinstance(self.retry_after, bool)
            and self.retry_after >= 1,
            "retry_after",
            f"must be a whole number of seconds >= 1, got {self.retry_after!r} "
            "(Retry-After: 0 would have polling clients ask again at once)",
        )
        # Every field's type first: the checks below may then compare and call methods.
        _check_types(self)
        _require(self.prefix != "", "prefix", "must not be empty")
        _require(
            not set(self.prefix) & set("{}*?[] \t\r\n"),
            "prefix",
            "must not contain braces (Redis Cluster hash tags), glob characters or spaces",
        )
        if not self.embedded:
            _check_url(self.redis_url, "redis_url", "redis://, rediss://, unix://, memory://")
        if self.queue_redis_url is not None:
            _check_url(self.queue_redis_url, "queue_redis_url", "redis://, rediss://, unix://")
            _require(
                not is_cluster_url(self.queue_redis_url),
                "queue_redis_url",
                "must not be a Redis Cluster: arq's queue needs one Redis (a plain or "
                "redis+sentinel:// URL)",
            )
        if is_cluster_url(self.redis_url) and not self.inline_worker:
            _require(
                self.queue_redis_url is not None,
                "queue_redis_url",
                "is required when redis_url is a Redis Cluster: arq's queue cannot live "
                "on a Cluster, so name a separate (non-Cluster) Redis for it",
            )
        for name in ("ttl", "error_ttl", "job_timeout", "poll_delay", "redis_timeout", "pass_ttl"):
            _require(_duration(getattr(self, name)) > 0, name, "must be a finite number > 0")
        for name in ("stale_ttl", "min_ttl"):
            _require(_duration(getattr(self, name)) >= 0, name, "must be a finite number >= 0")
        object.__setattr__(self, "ttl_rules", _ttl_rules(self.ttl_rules))
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                _require(
                    pattern.startswith(("/", "*")),
                    name,
                    f"pattern {pattern!r} must start with / (or *): it is matched against the "
                    "request's path, which starts with /",
                )
        tag_header = self.tag_header.strip().lower()
        _require(bool(_HEADER_NAME.match(tag_header)), "tag_header", "is not a header name")
        object.__setattr__(self, "tag_header", tag_header)
        if self.claim_ttl is not None:
            _require(
                _duration(self.claim_ttl) > 0,
                "claim_ttl",
                "must be a finite number > 0",
            )
            _require(
                self.claim_ttl > self.job_timeout,
                "claim_ttl",
                f"must exceed job_timeout ({self.job_timeout}), or a slow job would be "
                "enqueued twice",
            )
        if self.secret is not None:
            # Checked whenever given: a short secret is a mistake even while it is unused.
            _require(
                len(self.secret) >= 16,
                "secret",
                "must be a string of 16 characters or more",
            )
        if self.key_credentials:
            _require(
                self.secret is not None,
                "secret",
                "must be set (16 characters or more) when key_credentials is on",
            )
            _require(
                sealing_available(),
                "key_credentials",
                "needs the cryptography package: pip install 'asgi-worker[credentials]'",
            )
        _require(
            self.max_retry_after >= self.retry_after,
            "max_retry_after",
            f"must be at least retry_after ({self.retry_after})",
        )
        _require(self.max_body_bytes > 0, "max_body_bytes", "must be greater than 0")
        _require(self.stream_body_bytes >= 0, "stream_body_bytes", "must be 0 or more")
        _require(self.compress_min_bytes >= 0, "compress_min_bytes", "must be 0 or more")
        _require(1 <= self.compress_level <= 9, "compress_level", "must be 1 to 9")
        _require(self.decoded_bodies_bytes >= 0, "decoded_bodies_bytes", "must be 0 or more")
        _require(self.max_jobs > 0, "max_jobs", "must be greater than 0")
        _require(_duration(self.max_wait) >= 0, "max_wait", "must be a finite number >= 0")
        _require(self.max_waiters >= 0, "max_waiters", "must be 0 or more")
        _require(
            _duration(self.near_cache_ttl) >= 0,
            "near_cache_ttl",
            "must be a finite number >= 0",
        )
        _require(self.near_cache_bytes > 0, "near_cache_bytes", "must be greater than 0")
        _require(self.max_queued >= 0, "max_queued", "must be 0 (no cap) or more")
        for name in ("allowed_hosts", "ignore_params"):
            patterns = getattr(self, name)
            _require(
                all(pattern.strip() for pattern in patterns),
                name,
                "must be a tuple of non-empty patterns",
            )
        object.__setattr__(
            self, "allowed_hosts", tuple(p.strip().lower().rstrip(".") for p in self.allowed_hosts)
        )
        object.__setattr__(self, "ignore_params", tuple(p.strip() for p in self.ignore_params))
        _require(self.queue_name != "", "queue_name", "must not be empty (use None)")
        _require(
            self.metrics_path.startswith("/"), "metrics_path", "must be a path starting with /"
        )
        _require(
            not self.metrics or _installed("prometheus_client"),
            "metrics",
            "needs prometheus-client: pip install 'asgi-worker[metrics]'",
        )
        _require(
            not self.tracing or _installed("opentelemetry.trace"),
            "tracing",
            "needs the OpenTelemetry API: pip install 'asgi-worker[otel]'",
        )
        vary = tuple(name.strip().lower() for name in self.vary)
        for name in vary:
            _require(bool(_HEADER_NAME.match(name)), "vary", f"{name!r} is not a header name")
            _require(
                name not in _PRIVATE_HEADERS,
                "vary",
                f"{name!r} carries credentials; requests with it bypass the cache",
            )
        object.__setattr__(self, "vary", tuple(dict.fromkeys(vary)))

    def credential_guard(self) -> CredentialGuard | None:
        """What keys and seals credentials, if `key_credentials` is on."""
        if not self.key_credentials or self.secret is None:
            return None
        return CredentialGuard(self.secret)

    @property
    def embedded(self) -> bool:
        """True for `memory://`: the in-process store, jobs run in the web process."""
        return self.redis_url == MEMORY_URL

    @property
    def in_process(self) -> bool:
        """True if jobs run in the web process rather than in an arq worker."""
        return self.embedded or self.inline_worker

    @property
    def queue(self) -> str:
        """The arq queue the middleware enqueues to and the worker reads."""
        return self.queue_name or f"{self.prefix}:queue"

    @property
    def claim_lease(self) -> float:
        """`claim_ttl`, or by default `job_timeout` + 30 s."""
        return self.job_timeout + 30.0 if self.claim_ttl is None else self.claim_ttl

    def __repr__(self) -> str:
        # As dataclass's own, but a password in a Redis URL is masked: configs get logged.
        shown = []
        for spec in dataclasses.fields(self):
            if spec.repr:
                value = getattr(self, spec.name)
                if spec.name in _URL_FIELDS and value is not None:
                    value = display_url(value)
                shown.append(f"{spec.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a `Config` from `ASGI_WORKER_<FIELD>` variables (e.g. `ASGI_WORKER_TTL`).

        Each field is read from the variable named after it in capitals. Tuples are
        comma-separated (`/api/*,/reports/*`), booleans are `1/0`, `true/false`,
        `yes/no` or `on/off`, and an empty value is `None` for a field that takes it.
        Every `ASGI_WORKER_` variable must name a field: a misspelt one is an error,
        not a setting silently left at its default.

        Args:
            environ: The variables to read; `os.environ` by default.
            **overrides: Field values that win over the environment.

        Returns:
            The checked `Config`.

        Raises:
            ConfigurationError: A variable names no field (the message suggests the
                closest one), cannot be parsed, or gives a value `Config` refuses; the
                message names the variable.
        """
        env = os.environ if environ is None else environ
        _refuse_unknown_variables(env)
        values: dict[str, Any] = {}
        for spec in _FIELD_TYPES:
            variable = ENV_PREFIX + spec.name.upper()
            if variable in env:
                values[spec.name] = _parse(env[variable], spec, variable)
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigurationError as error:
            to_blame = next((spec for spec in _FIELD_TYPES if spec.name == error.field), None)
            variable = ENV_PREFIX + (error.field or "").upper()
            if to_blame is None or error.field in overrides or variable not in env:
                raise
            shown = _assignment(variable, env[variable], to_blame)
            raise ConfigurationError(f"{error} (from {shown})", field=error.field) from None


_URL_FIELDS = frozenset({"redis_url", "queue_redis_url"})


def _check_url(url: str, name: str, plain: str) -> None:
    """`url` is a Redis URL this library can connect with, or a clear error naming `name`."""
    kinds = f"{plain}, redis+cluster://, redis+sentinel:// or rediss+sentinel://"
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    _require(scheme in URL_SCHEMES, name, f"must be a {kinds} URL, got {display_url(url)!r}")
    if scheme in CLUSTER_SCHEMES:
        try:
            parse_cluster_url(url)
        except ValueError as error:
            raise ConfigurationError(
                f"Config.{name} {display_url(url)!r} {error}. Expected "
                "redis+cluster://[user:password@]host1:6379[,host2:6379...]/"
                "[?ssl_ca_certs=... with rediss+cluster://]",
                field=name,
            ) from None
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(url)
        except ValueError as error:
            raise ConfigurationError(
                f"Config.{name} {display_url(url)!r} {error}. Expected "
                "redis+sentinel://[user:password@]host1:26379,host2:26379/mymaster[/db]"
                "[?sentinel_password=...][&ssl_ca_certs=... with rediss+sentinel://]",
                field=name,
            ) from None


def _ttl_rules(rules: Any) -> tuple[tuple[str, float], ...]:
    """Normalise `ttl_rules` given as pairs or as "pattern=seconds" strings."""
    normalised = []
    for original in rules:
        rule = original
        if isinstance(rule, str):
            pattern, equals, seconds = rule.rpartition("=")
            rule = (pattern, seconds) if equals else (rule, "")
        try:
            pattern, seconds = rule
            ttl = float(seconds)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"Config.ttl_rules entry {original!r} is not (pattern, seconds) "
                "or 'pattern=seconds'",
                field="ttl_rules",
            ) from None
        _require(isinstance(pattern, str) and pattern != "", "ttl_rules", "needs a pattern")
        _require(ttl > 0, "ttl_rules", f"ttl for {pattern!r} must be greater than 0")
        normalised.append((pattern, ttl))
    return tuple(normalised)


def _duration(value: float) -> float:
    """`value` as seconds, or NaN (which fails every comparison) if it is not finite."""
    if not math.isfinite(value):
        return math.nan
    return float(value)


def _installed(module: str) -> bool:
    """True if `module` can be imported (an optional extra), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigurationError(f"Config.{name} {problem}", field=name)


def _parse(raw: str, spec: _FieldType, variable: str) -> Any:
    """Turn one environment string into the field's type, or say which variable is wrong."""
    text = raw.strip()
    if spec.optional and text == "":
        return None
    try:
        if spec.kind is bool:
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
            raise ValueError("expected a boolean such as true or false")
        if spec.kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return spec.kind(text)
    except ValueError as error:
        shown = _assignment(variable, raw, spec)
        raise ConfigurationError(f"{shown}: {error}", field=spec.name) from None


def _assignment(variable: str, raw: str, spec: _FieldType) -> str:
    """`VARIABLE='value'` for a message, with no password in it."""
    if spec.name in _URL_FIELDS:
        return f"{variable}={display_url(raw)!r}"
    return variable if spec.secret else f"{variable}={raw!r}"


def _refuse_unknown_variables(env: Mapping[str, str]) -> None:
    """A `ConfigurationError` for an `ASGI_WORKER_` variable that names no field.

    Its value is not shown: a misspelt variable may hold a password all the same.
    The variables of `NOT_SETTINGS` are read elsewhere and allowed.
    """
    fields = [spec.name for spec in _FIELD_TYPES]
    known = {ENV_PREFIX + name.upper() for name in fields} | NOT_SETTINGS
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in known:
            continue
        # Matched without the prefix every variable shares, which would make all close.
        close = difflib.get_close_matches(variable.removeprefix(ENV_PREFIX).lower(), fields, 1)
        hint = (
            f"did you mean {ENV_PREFIX}{close[0].upper()}?"
            if close
            else f"each Config field is read from {ENV_PREFIX}<FIELD> (see docs/configuration.md)"
        )
        raise ConfigurationError(f"{variable} is not a setting; {hint}")


_SCALARS: tuple[type[Any], ...] = (bool, int, float, str)
# What a value of each type is called in an error. Every float field is a duration (the
# class docstring: "Durations are in seconds"); a float field that is not needs its own.
_SINGULAR = {bool: "True or False", int: "a whole number", float: "a number of seconds"}
_PLURAL = {bool: "booleans", int: "whole numbers", float: "numbers", str: "strings"}
# Tuple fields whose entries take forms of their own, checked by the field's own check.
_OWN_FORMS = frozenset({"ttl_rules"})


@dataclass(frozen=True, slots=True)
class _FieldType:
    """What one `Config` field takes, read from its type hint by `_field_type`."""

    name: str
    kind: type[Any]
    """bool, int, float, str or tuple."""
    element: type[Any] | None
    """For `tuple[X, ...]`, X: one of `_SCALARS`; None where `_OWN_FORMS` check the entries."""
    optional: bool
    """`X | None`: None is taken too."""
    secret: bool
    """The value may hold a password: an error shows only its type."""


def _field_type(spec: dataclasses.Field[Any], hint: Any) -> _FieldType:
    """How to check field `spec` of type `hint`; a `TypeError` for a hint with no check.

    Raised at import, so a new field of a type not handled here cannot go unchecked.
    """
    args = get_args(hint)
    optional = get_origin(hint) in (Union, UnionType) and type(None) in args
    if optional:
        others = [arg for arg in args if arg is not type(None)]
        hint = others[0] if len(others) == 1 else hint
        args = get_args(hint)
    secret = not spec.repr or spec.name in _URL_FIELDS
    if hint in _SCALARS:
        return _FieldType(spec.name, hint, None, optional, secret)
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] in _SCALARS:
            return _FieldType(spec.name, tuple, args[0], optional, secret)
        if spec.name in _OWN_FORMS:
            return _FieldType(spec.name, tuple, None, optional, secret)
    raise TypeError(f"Config.{spec.name}: no type check for {hint!r} (see _field_type)")


def _check_types(config: Config) -> None:
    """Each field of `config` is of its type, or a `ConfigurationError` names it.

    A list given for a tuple field is kept as a tuple.
    """
    for spec in _FIELD_TYPES:
        given = getattr(config, spec.name)
        value = _typed(given, spec)
        if value is not given:
            object.__setattr__(config, spec.name, value)


def _typed(value: Any, spec: _FieldType) -> Any:
    """`value` if it is of `spec`'s type (a list for a tuple: as a tuple), else an error."""
    if value is None and spec.optional:
        return value
    if spec.kind is tuple:
        # A list too: settings files (JSON, YAML, TOML) have no tuples. As a tuple, the
        # Config stays hashable.
        value = tuple(value) if isinstance(value, list) else value
        element = spec.element
        if isinstance(value, tuple) and (
            element is None or all(_is(item, element) for item in value)
        ):
            return value
    elif _is(value, spec.kind):
        return value
    raise ConfigurationError(f"Config.{spec.name} {_wrong_type(value, spec)}", field=spec.name)


def _is(value: Any, kind: type[Any]) -> bool:
    """True if `value` is of field type `kind`: an int counts as a float, a bool as neither."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def _wrong_type(value: Any, spec: _FieldType) -> str:
    """What `spec`'s field takes, and the `value` of another type it got."""
    got = type(value).__name__ if spec.secret else f"{type(value).__name__} {value!r}"
    if spec.kind is not tuple:
        return f"must be {_SINGULAR.get(spec.kind, 'a string')}, got {got}"
    entries = f" of {_PLURAL[spec.element]}" if spec.element else ""
    problem = f"must be a tuple (or list){entries}, got {got}"
    if isinstance(value, str):  # include="/api/*": the commonest slip
        return f"{problem}; one pattern is written ({value!r},)"
    return problem


def _field_types() -> tuple[_FieldType, ...]:
    """How to check each field of `Config`, in order (built once, at import)."""
    hints = get_type_hints(Config)
    return tuple(_field_type(spec, hints[spec.name]) for spec in dataclasses.fields(Config))


_FIELD_TYPES = _field_types()


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """One field of a dataclass as its documentation shows it (see `field_docs`)."""

    name: str
    type: str
    """The annotation as written, e.g. `str | None`."""
    default: str
    """The default's `repr`; empty for a field without one."""
    doc: str
    """The docstring under the field, cleaned of its indentation; empty if none."""


def field_docs(cls: type[Any]) -> tuple[FieldDoc, ...]:
    """Each field of dataclass `cls`, in order, with the docstring written under it.

    The docstrings are read from the source with `ast`, as pydantic's
    `use_attribute_docstrings` does: they are the fields' one documentation, which
    `help(Config)` and the table in docs/configuration.md show. Where the source cannot
    be read (a build without .py files), every `doc` is empty.
    """
    docs = _attribute_docstrings(cls)
    return tuple(
        FieldDoc(
            name=spec.name,
            type=spec.type if isinstance(spec.type, str) else inspect.formatannotation(spec.type),
            default=_default_repr(spec),
            doc=docs.get(spec.name, ""),
        )
        for spec in dataclasses.fields(cls)
    )


def _attribute_docstrings(cls: type[Any]) -> dict[str, str]:
    """The string literal under each annotated name in the body of class `cls`."""
    source = _class_source(cls)
    try:
        definition = ast.parse(source).body[0] if source else None
    except SyntaxError:  # the class's lines were not all found: no docstrings, no harm
        return {}
    if not isinstance(definition, ast.ClassDef):
        return {}
    docs = {}
    for node, after in itertools.pairwise(definition.body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _class_source(cls: type[Any]) -> str | None:
    """The lines of module-level class `cls`, from `class` to the end of its body.

    Not `inspect.getsource`: on Python 3.11 and 3.12 it parses and walks the whole
    module to find the class, about 20 ms of every `import asgi_worker`; reading the
    class's own lines costs well under one. None if the source cannot be read.
    """
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None
    lines = linecache.getlines(path) if path else []
    header = re.compile(rf"class {re.escape(cls.__name__)}\b")
    start = next((n for n, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    # The body ends at the next line that starts in the first column (not a comment).
    end = next(
        (n for n in range(start + 1, len(lines)) if lines[n][:1] not in ("", " ", "\n", "#")),
        len(lines),
    )
    return "".join(lines[start:end])


def _default_repr(spec: dataclasses.Field[Any]) -> str:
    if spec.default is not dataclasses.MISSING:
        return repr(spec.default)
    if spec.default_factory is not dataclasses.MISSING:
        return repr(spec.default_factory())
    return ""


def documented(cls: type[Any]) -> str | None:
    """`cls.__doc__` followed by a section on each field (`field_docs`), for `help()`.

    `cls.__doc__` as it is if no field has a docstring to show (the source cannot be read).
    """
    fields = field_docs(cls)
    if not any(spec.doc for spec in fields):
        return cls.__doc__
    lines = [inspect.cleandoc(cls.__doc__ or ""), "", "Fields:", ""]
    for spec in fields:
        default = f" = {spec.default}" if spec.default else ""
        lines.append(f"{spec.name}: {spec.type}{default}")
        lines.extend(f"    {line}" if line else "" for line in spec.doc.splitlines())
    return "\n".join(lines)


# help(Config) says what each field means: the class docstring gains the field docstrings.
Config.__doc__ = documented(Config)

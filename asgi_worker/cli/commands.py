"""The `asgi-worker` command."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asgi_worker.backends.redis.clients import close_client, redis_client, store_client
from asgi_worker.core.config import (
    DASHBOARD_TOKEN_VARIABLE,
    ENV_PREFIX,
    NOT_SETTINGS,
    Config,
    ConfigurationError,
)
from asgi_worker.core.discovery import find_config
from asgi_worker.core.redis_urls import display_url
from asgi_worker.dashboard import create_dashboard
from asgi_worker.invalidation import Invalidator
from asgi_worker.observability.from_config import observer_for
from asgi_worker.observability.observer import Observer, Observers
from asgi_worker.observability.stats import (
    DEFAULT_MAX_AGE,
    QueueCheck,
    Stats,
    check_queue,
    collect_stats,
)
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.outage import RedisUnreachable
from asgi_worker.worker.settings import configure_logging, worker_settings


def import_object(spec: str) -> Any:
    """Import `module:attribute` (dots allowed in the attribute), with a clear error."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not of the form module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn and arq do: find the user's modules
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise click.BadParameter(f"cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise click.BadParameter(f"{module_name!r} has no attribute {attribute!r}") from None
    return found


def load_config(spec: str | None, app: Any = None) -> Config:
    """The `Config` to use: `--config`, else `ASGI_WORKER_*` variables, else the app's.

    `spec` is `module:attribute`. Without it, any `ASGI_WORKER_*` variable means the
    config is built from the environment; without those, that of the `WorkerMiddleware`
    found in `app`; with no app either, the defaults.
    """
    if spec is None:
        try:
            if app is not None and not _config_in_env():
                return find_config(app)
            return Config.from_env()
        except ConfigurationError as error:
            raise click.UsageError(str(error)) from error
    config = import_object(spec)
    if not isinstance(config, Config):
        raise click.BadParameter(
            f"{spec!r} is a {type(config).__name__}, not an asgi_worker.Config"
        )
    return config


def _config_in_env() -> bool:
    return any(name.startswith(ENV_PREFIX) and name not in NOT_SETTINGS for name in os.environ)


def command_config(config_spec: str | None, app_spec: str | None) -> Config:
    """The `Config` for `stats` and `invalidate`, from `--config`, the environment or `--app`.

    With none of them it is the defaults': said on stderr (stdout may be JSON), since a
    default cache that holds nothing looks just like an idle one.
    """
    config = load_config(config_spec, import_object(app_spec) if app_spec else None)
    if config_spec is None and app_spec is None and not _config_in_env():
        click.echo(
            f"asgi-worker: no config given (no --app, --config or {ENV_PREFIX}* variable), "
            f"so this is the default cache: prefix {config.prefix!r} at "
            f"{display_url(config.redis_url)}. For your app's, pass --app MODULE:APP (the "
            f"app you serve), --config MODULE:CONFIG, or set {ENV_PREFIX}* variables.",
            err=True,
        )
    return config


_CONFIG_OPTION = click.option(
    "--config",
    "config_spec",
    metavar="MODULE:CONFIG",
    help=(
        "A Config object to use. By default: built from ASGI_WORKER_* variables if any is "
        "set, else the one of the WorkerMiddleware in the app."
    ),
)
_APP_OPTION = click.option(
    "--app",
    "app_spec",
    metavar="MODULE:APP",
    help="Take the Config of the WorkerMiddleware in this app (e.g. myproject.main:app).",
)


# Each command gives its line in `asgi-worker --help` (short_help): else Click cuts the
# docstring's first sentence to the terminal's width ("... MODULE:APP (e.g....").
@click.group()
@click.version_option(package_name="asgi-worker")
def main() -> None:
    """asgi-worker: serve slow GET endpoints from a cache filled by background workers."""


EXIT_REDIS_UNREACHABLE = os.EX_UNAVAILABLE
"""`asgi-worker worker`'s exit status when Redis cannot be reached at start (69)."""


@main.command(short_help="Run a worker: replay jobs through MODULE:APP.")
@click.argument("app_spec", metavar="MODULE:APP")
@_CONFIG_OPTION
@click.option("--burst", is_flag=True, help="Run the queued jobs, then exit.")
@click.option(
    "--wait-for-redis",
    is_flag=True,
    help=(
        "If Redis cannot be reached at start, wait for it (a log line every 10 s) instead "
        f"of exiting with status {EXIT_REDIS_UNREACHABLE}. Once running, the worker always "
        "waits out an outage."
    ),
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Debug logging (jobs are logged at INFO already)."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on this port at /metrics (needs asgi-worker[metrics]).",
)
@click.option(
    "--metrics-host", default="0.0.0.0", show_default=True, help="Interface for --metrics-port."
)
def worker(
    app_spec: str,
    config_spec: str | None,
    burst: bool,
    wait_for_redis: bool,
    verbose: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run a worker that replays requests through MODULE:APP (e.g. myproject.main:app)."""
    app = import_object(app_spec)
    config = load_config(config_spec, app)
    configure_logging(verbose)
    observer = None if metrics_port is None else _serve_metrics(config, metrics_port, metrics_host)
    settings = worker_settings(app, config, observer=observer)
    try:
        ReplayWorker(**settings, burst=burst, wait_for_redis=wait_for_redis).run()
    except RedisUnreachable:
        # Logged already, in one line; a supervisor restarts the worker (with its backoff).
        sys.exit(EXIT_REDIS_UNREACHABLE)


def _serve_metrics(config: Config, port: int, host: str) -> Observer:
    """The worker's observer, its metrics served on `host:port`.

    Bound now: a port in use is a usage error before the worker starts, not a traceback
    in its startup.
    """
    try:
        from asgi_worker.observability.metrics import PrometheusObserver
    except ImportError:
        raise click.UsageError(
            "--metrics-port needs prometheus-client: pip install 'asgi-worker[metrics]'"
        ) from None
    metrics = PrometheusObserver()
    try:
        metrics.serve(port, host)
    except ConfigurationError as error:
        raise click.UsageError(str(error)) from None
    others = observer_for(config, metrics=False)  # tracing, dashboard counts
    return metrics if others is None else Observers(metrics, others)


@main.command(short_help="Serve a demo app with a slow endpoint.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--redis-url",
    envvar="ASGI_WORKER_REDIS_URL",
    help="Use Redis (jobs run in this process) instead of the embedded memory:// backend.",
)
@click.option("--seconds", default=2.0, show_default=True, type=float, help="How slow /slow is.")
@click.option(
    "--prefix",
    default=None,
    help="Prefix of the demo's Redis keys (Config.prefix; default: the Config default).",
)
def demo(host: str, port: int, redis_url: str | None, seconds: float, prefix: str | None) -> None:
    """Serve a demo app: a slow endpoint behind the middleware and a page that polls it."""
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError("the demo needs uvicorn: pip install 'asgi-worker[demo]'") from None
    from asgi_worker.cli.demo import create_app, demo_config

    try:
        config = demo_config(redis_url, prefix=prefix)
    except ConfigurationError as error:
        raise click.UsageError(str(error)) from error
    backend = "embedded memory:// backend" if config.embedded else f"Redis at {redis_url}"
    base = f"http://{host}:{port}"
    click.echo(
        f"asgi-worker demo on the {backend}\n"
        f"  open   {base}/\n"
        f"  or run curl -i '{base}/slow?n=100000'\n"
        f"  (202 at once; the same again after ~{seconds:g} s: 200 with the result)\n"
        "Stop with Ctrl+C."
    )
    uvicorn.run(create_app(config, seconds=seconds), host=host, port=port, log_level="warning")


@main.command(short_help="Serve the ops dashboard of MODULE:APP's cache.")
@click.argument("app_spec", metavar="MODULE:APP")
@_CONFIG_OPTION
@click.option(
    "--token",
    envvar=DASHBOARD_TOKEN_VARIABLE,
    show_envvar=True,
    help="The secret operators sign in with (better from the variable: not in `ps`).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535))
def dashboard(
    app_spec: str, config_spec: str | None, token: str | None, host: str, port: int
) -> None:
    """Serve the ops dashboard of the cache of MODULE:APP (e.g. myproject.main:app).

    Queue depth, running jobs and their progress, recent jobs, hit ratio and latency
    (with Config.dashboard_counts), the biggest paths, and invalidation of a path. It
    refuses to start without a token. See docs/dashboard.md.
    """
    if not token:
        raise click.UsageError(
            f"the dashboard needs a token: set {DASHBOARD_TOKEN_VARIABLE} (or pass --token)"
        )
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError(
            "the dashboard needs uvicorn: pip install 'asgi-worker[demo]'"
        ) from None
    config = load_config(config_spec, import_object(app_spec))
    if config.embedded:
        raise click.UsageError(
            "memory:// lives inside the web process: mount create_dashboard(config, token=...) "
            "in your app instead (see docs/dashboard.md)"
        )
    click.echo(f"asgi-worker dashboard of cache {config.prefix!r} on http://{host}:{port}/")
    uvicorn.run(create_dashboard(config, token=token), host=host, port=port, log_level="warning")


_KINDS = ("path", "prefix", "glob", "query", "tag")


@main.command(short_help="Expire stored responses; prints how many.")
@click.argument("kind", type=click.Choice(_KINDS))
@click.argument("target")
@click.argument("params", nargs=-1, metavar="[NAME=VALUE]...")
@click.option("--soft", is_flag=True, help="Mark stale (served while one refresh runs).")
@_CONFIG_OPTION
@_APP_OPTION
def invalidate(
    kind: str,
    target: str,
    params: tuple[str, ...],
    soft: bool,
    config_spec: str | None,
    app_spec: str | None,
) -> None:
    """Expire stored responses; prints how many.

    \b
      asgi-worker invalidate path /reports          every query variant of /reports
      asgi-worker invalidate prefix /reports/       every path under /reports/
      asgi-worker invalidate glob '/reports/*/pdf'  every path matching the pattern
      asgi-worker invalidate query /foo a=1 b=2     /foo entries whose query has a=1 and b=2
      asgi-worker invalidate tag report-42          every response tagged report-42
    """  # noqa: D301 (not raw: click's no-rewrap marker is the character \b itself)
    if (kind == "query") != bool(params):
        raise click.UsageError("NAME=VALUE pairs go with 'query', and 'query' needs them")
    pairs = []
    for param in params:
        name, equals, value = param.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{param!r} is not NAME=VALUE", param_hint="PARAMS")
        pairs.append((name, value))
    config = command_config(config_spec, app_spec)
    if config.embedded:
        raise click.UsageError("memory:// lives inside the web process; nothing to invalidate")

    async def run() -> int:
        async with Invalidator.connect(config) as invalidator:
            if kind == "query":
                return await invalidator.query(target, pairs, soft=soft)
            method: Callable[..., Awaitable[int]] = getattr(invalidator, kind)
            return await method(target, soft=soft)

    try:
        count = asyncio.run(run())
    except RedisError as error:
        raise click.ClickException(f"Redis at {display_url(config.redis_url)}: {error}") from error
    noun = "entry" if count == 1 else "entries"
    click.echo(f"{count} {noun} {'marked stale' if soft else 'invalidated'}")


@main.command(short_help="Show what the cache and its queue hold.")
@_CONFIG_OPTION
@_APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
@click.option(
    "--check",
    is_flag=True,
    help=(
        "Liveness probe: print one line and exit 1 if no worker serves the queue or its "
        "oldest job is more than --max-age seconds past due (reads two keys, no SCAN)."
    ),
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_AGE,
    show_default=True,
    metavar="SECONDS",
    help="With --check: how long past due the oldest queued (or running) job may be.",
)
def stats(
    config_spec: str | None, app_spec: str | None, as_json: bool, check: bool, max_age: float
) -> None:
    """Show what the cache holds and what its queue is doing.

    Counting entries walks the keyspace with SCAN (in batches; Redis keeps serving), so
    on a large keyspace it takes a while. With --check, only the queue's health is read.
    """
    config = command_config(config_spec, app_spec)
    if config.embedded:
        raise click.UsageError("memory:// lives inside the web process; no stats to read")

    async def run() -> Stats | QueueCheck:
        store = store_client(config.redis_url, config)
        queue = redis_client(config.queue_redis_url, config) if config.queue_redis_url else store
        assert isinstance(queue, Redis)  # Config requires queue_redis_url with a Cluster
        try:
            if check:
                return await check_queue(config, queue, max_age=max_age)
            return await collect_stats(config, store, queue)
        finally:
            await close_client(store)
            if queue is not store:
                await close_client(queue)

    try:
        found = asyncio.run(run())
    except RedisError as error:
        url = config.queue_redis_url if check and config.queue_redis_url else config.redis_url
        raise click.ClickException(f"Redis at {display_url(url)}: {error}") from error
    if isinstance(found, QueueCheck):
        click.echo(json.dumps(found.as_dict()) if as_json else found.line())
        sys.exit(0 if found.problem is None else 1)
    if as_json:
        click.echo(json.dumps(found.as_dict()))
        return
    oldest = "-" if found.oldest_queued is None else f"{found.oldest_queued:,.0f} s past due"
    click.echo(
        f"cache {config.prefix!r} at {display_url(config.redis_url)}\n"
        f"  stored responses  {found.stored:,} ({found.fresh:,} fresh)\n"
        f"  claims held       {found.claims:,}\n"
        f"  paths indexed     {found.paths:,}\n"
        f"queue {config.queue!r}\n"
        f"  jobs queued       {found.queued:,} (running: {found.running:,})\n"
        f"  oldest job        {oldest}\n"
        f"  worker health     {found.worker_health or 'no current report (no worker?)'}"
    )
    if found.slowest:
        click.echo("slowest paths (typical job duration)")
        for path, seconds in found.slowest:
            click.echo(f"  {seconds:8.3f} s  {path}")

"""arq glue: the replay job, the app's lifespan in the worker, `worker_settings()`, logging."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import math
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import health_check_key_suffix
from arq.logs import default_log_config
from arq.worker import func
from asgi_lifespan import LifespanManager, LifespanNotSupported
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, ExpiryT, KeyT
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_worker.backends.redis.clients import (
    client_url,
    close_client,
    redis_client,
    store_client,
    tls_kwargs,
)
from asgi_worker.backends.redis.queue import (
    JOB_FUNCTION,
    deserialize,
    serialize,
    write_progress,
)
from asgi_worker.backends.redis.retries import REDIS_ERRORS, Throttle, brief
from asgi_worker.backends.redis.sentinel import FailoverWatch
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.config import Config, ConfigurationError
from asgi_worker.core.discovery import config_mismatch, find_config
from asgi_worker.core.keys import RedisKeys
from asgi_worker.core.redis_urls import is_sentinel_url, parse_sentinel_url
from asgi_worker.observability.from_config import observer_for
from asgi_worker.observability.observer import Observer
from asgi_worker.worker.arq_worker import hand_off
from asgi_worker.worker.job import HandOff, run_job

logger = logging.getLogger("asgi_worker")
_ARQ_LOGGER = "arq"

_CONTEXT_KEY = "asgi_worker"
# arq's own timeout is a last resort: ours (Config.job_timeout) fires first and stores a 504.
_ARQ_TIMEOUT_GRACE = 5.0
# Apps that open pools at startup may take a while; asgi-lifespan's 5 s is tight for them.
_LIFESPAN_TIMEOUT = 60.0
_HEALTH_CHECK_INTERVAL = 60


@dataclass(frozen=True, slots=True)
class _Runtime:
    """What the worker process holds between startup and shutdown (kept in arq's ctx)."""

    exit_stack: AsyncExitStack
    store: RedisStore
    state: Mapping[str, Any] | None
    hand_off: HandOff | None
    """Set when the queue is on the store's Redis: a `ReplayWorker` may then send a
    job's commit in the transaction that ends the job."""
    store_client: Redis | RedisCluster
    throttle: Throttle
    """Where the jobs log the Redis errors they give up on: a line every 10 s at most."""


def worker_settings(
    app: ASGIApp, config: Config | None = None, *, observer: Observer | None = None
) -> dict[str, Any]:
    """The settings of an arq worker that replays requests through `app`.

    `asgi-worker worker module:app` runs one; in Python,
    `await ReplayWorker(**worker_settings(app)).async_run()`. arq's own command and
    `arq.worker.create_worker` take them too (`WorkerSettings = worker_settings(app)`,
    then `arq module.WorkerSettings`), but only `ReplayWorker` stores each replay in the
    transaction that ends its job (one round trip less per job) and waits out a Redis
    outage, where arq's `Worker` ends on one that outlasts its retries.

    Args:
        app: The very app object you serve. Replays enter at its top, as the server's
            requests do, and what the app inside the `WorkerMiddleware` answers is
            stored. Under arq's own command, our log lines follow arq's logger's level
            and handlers (see `_log_as_arq_does`).
        config: By default the one of the `WorkerMiddleware` inside `app` (found
            through middleware stacks, mounts and the frameworks' wrappers). One whose
            prefix or queue is not the middleware's is logged as a warning.
        observer: Sees every job (`asgi-worker worker --metrics-port` passes a
            Prometheus one). By default spans if `config.tracing` is on, and no metrics:
            a worker's metrics need a port of their own to be scraped from.

    Returns:
        arq `Worker` keyword arguments: the replay job function, `config`'s queue,
        `max_jobs`, `job_timeout` and `poll_delay`, a Redis pool with the library's
        retries, timeouts and `redis+sentinel://` support, and a startup and shutdown
        that run the app's lifespan.

    Raises:
        ConfigurationError: No `config` is given and `app` holds no `WorkerMiddleware`
            (the message says how to pass one), or `config` is `memory://`, whose jobs
            run in the web process.
    """
    if config is None:
        config = find_config(app)
    elif (warning := config_mismatch(app, config)) is not None:
        logger.warning("asgi-worker: %s", warning)
    if config.embedded:
        raise ConfigurationError(
            "Config.redis_url is memory://: jobs run inside the web process, "
            "there is nothing for an arq worker to do"
        )
    if observer is None:
        observer = observer_for(config, metrics=False)

    async def startup(ctx: dict[Any, Any]) -> None:
        _log_as_arq_does()
        runtime = ctx[_CONTEXT_KEY] = await _start(app, config)
        _watch_failovers(runtime, ctx.get("redis"), config)
        if observer is not None:
            observer.bind(app)
            if ctx.get("redis") is not None:
                observer.watch_queue(ctx["redis"], config.queue, config.redis_timeout)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The worker was told to stop while the app's lifespan started, and the
            # cancellation was lost: asgi-lifespan awaits the startup in asyncio.wait_for,
            # which on Python 3.11 can swallow one (CPython gh-86296), and the worker
            # would poll on. Honour it; arq's close() still runs `shutdown`.
            raise asyncio.CancelledError

    async def shutdown(ctx: dict[Any, Any]) -> None:
        runtime: _Runtime | None = ctx.pop(_CONTEXT_KEY, None)
        if runtime is not None:
            await runtime.exit_stack.aclose()
        if observer is not None:
            await observer.close()  # e.g. the dashboard's counts of the last second

    keys = RedisKeys(config.prefix)
    # A job's progress outlives no run of it: a job runs at most this long.
    progress_lifetime_ms = round((config.job_timeout + _ARQ_TIMEOUT_GRACE) * 1000)

    async def replay_job(
        ctx: dict[Any, Any],
        snapshot: bytes,
        token: str,
        claimed_at: float | None = None,
        trace: str | None = None,
    ) -> str:
        # A job enqueued by an earlier version has no claim time: run_job renews the claim.
        # `trace` is there only if the enqueuing request was traced.
        runtime: _Runtime = ctx[_CONTEXT_KEY]
        return await run_job(
            app,
            runtime.store,
            config,
            snapshot,
            token,
            claimed_at,
            state=runtime.state,
            hand_off=runtime.hand_off,
            observer=observer,
            trace=trace,
            throttle=runtime.throttle,
            progress=partial(
                write_progress,
                ctx["redis"],
                keys.progress(ctx["job_id"]),
                lifetime_ms=progress_lifetime_ms,
            ),
        )

    return {
        "functions": [
            func(
                replay_job,
                name=JOB_FUNCTION,
                # keep_result=0: arq refuses a job id while its result is kept; and no
                # one reads results here, the stored response is the result.
                keep_result=0,
                timeout=config.job_timeout + _ARQ_TIMEOUT_GRACE,
            )
        ],
        "queue_name": config.queue,
        # Our own client for arq's pool: arq's create_pool gives a Sentinel pool neither
        # retries nor timeouts, and ours checks connections without a socket read.
        "redis_pool": _queue_client(config),
        # Only read by `arq --check`: with a pool, arq's Worker does not use them.
        "redis_settings": _redis_settings(config),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "keep_result": 0,
        "poll_delay": config.poll_delay,
        "max_jobs": config.max_jobs,
        "job_timeout": config.job_timeout + _ARQ_TIMEOUT_GRACE,
        # On SIGTERM/SIGINT take no new job and let the running ones finish (they end by
        # job_timeout); whatever is still running after that is cancelled and re-queued.
        "job_completion_wait": math.ceil(config.job_timeout + _ARQ_TIMEOUT_GRACE),
        # arq's default is an hour; `asgi-worker stats` shows this report, so keep it
        # current (one SET a minute).
        "health_check_interval": _HEALTH_CHECK_INTERVAL,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
    }


def configure_logging(verbose: bool = False) -> None:
    """Log arq's lines and ours, each once: what `asgi-worker worker` does at start.

    If importing the app configured logging (a handler on the root logger: Litestar's
    default `LoggingConfig` does), our lines go to its handlers, in its format: a handler
    of our own beside it printed every line twice, in two formats. Otherwise arq's default
    (time and message, on stderr), for arq's logger and ours.
    """
    if logging.getLogger().handlers:
        level = logging.DEBUG if verbose else logging.INFO
        for name in (_ARQ_LOGGER, logger.name):
            logging.getLogger(name).setLevel(level)
        return
    log_config = default_log_config(verbose)
    log_config["loggers"][logger.name] = dict(log_config["loggers"][_ARQ_LOGGER])
    logging.config.dictConfig(log_config)


def _log_as_arq_does() -> None:
    """Where only arq's logger is configured, log ours the same way (the worker's startup).

    `arq module.WorkerSettings` configures arq's logger alone, after importing the
    settings: ours stayed at the root's WARNING, and the per-job INFO line never showed.
    It takes arq's level, and arq's handlers unless a handler above it (the root's, set
    by the app) takes its lines already: then they would show twice. Nothing is changed
    where ours has a level already (`asgi-worker worker`, the app) or arq's has no handler.
    """
    ours, arq = logging.getLogger(logger.name), logging.getLogger(_ARQ_LOGGER)
    if ours.level != logging.NOTSET or not arq.handlers:
        return
    ours.setLevel(arq.getEffectiveLevel())
    if not ours.hasHandlers():
        for handler in arq.handlers:
            ours.addHandler(handler)


# A queue command that meets a dead connection is retried on a new one with a growing
# delay (0.1, 0.2, 0.4, 0.5 s): a Redis restart or a failover's switch is ridden out
# inside the command. A longer outage is `ReplayWorker`'s to wait out, with a log line.
_QUEUE_RETRY = (ExponentialBackoff(cap=0.5, base=0.05), 4)


class _QueueClient(ArqRedis):
    """The worker's client for arq's queue: a health-check report Redis refuses is no end.

    arq's `Worker` writes its report (`<queue>:health-check`, every
    `health_check_interval`) in its poll loop, where any error ends the worker: a Redis
    over its maxmemory with noeviction refuses that write, and so ended even an idle
    worker within a minute. Here the report is logged as missed, and the next one is
    written an interval later. Every other command is the pool's own.
    """

    health_check_key = ""
    """The key of the worker's report (`<queue>:health-check`)."""

    async def psetex(self, name: KeyT, time_ms: ExpiryT, value: EncodableT) -> Any:
        """Redis's PSETEX; for the health-check key, a Redis error is logged instead."""
        sent: Any = super().psetex(name, time_ms, value)
        try:
            return await sent
        except REDIS_ERRORS as error:
            if name != self.health_check_key:
                raise
            logger.warning(
                "asgi-worker: Redis at %s did not take the worker's health-check report (%s); "
                "the worker goes on, and reports again in %d s",
                client_url(self),
                brief(error),
                _HEALTH_CHECK_INTERVAL,
            )
            return False


def _queue_client(config: Config) -> ArqRedis:
    """The worker's client for arq's queue: our pool, retries and connect timeout.

    No per-read timeout, as arq's own pool has none: with one, redis-py sends each
    command under `asyncio.wait_for`, which on Python 3.11 can swallow a cancellation
    (CPython gh-86296), and a worker told to stop would poll on. `ReplayWorker` bounds
    each poll iteration instead. A health-check report Redis refuses is logged, not
    fatal (`_QueueClient`).
    """
    url = config.queue_redis_url or config.redis_url
    retry = Retry(*_QUEUE_RETRY)
    client = redis_client(url, config, read_timeout=False, retry=retry, client_class=_QueueClient)
    assert isinstance(client, _QueueClient)
    client.health_check_key = config.queue + health_check_key_suffix
    return client


def _redis_settings(config: Config) -> RedisSettings:
    """Settings for what arq builds itself for the queue's Redis (`arq --check`)."""
    url = config.queue_redis_url or config.redis_url
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        settings = RedisSettings(
            host=list(target.sentinels),
            sentinel=True,
            sentinel_master=target.master,
            database=target.db,
            username=target.username,
            password=target.password,
            # arq's own Sentinel client takes only `ssl` of these (arq 0.28).
            **tls_kwargs(target.tls),
        )
    else:
        settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = max(1, math.ceil(config.redis_timeout))
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    settings.retry = Retry(*_QUEUE_RETRY)
    return settings


async def _start(app: ASGIApp, config: Config) -> _Runtime:
    """Run the app's lifespan startup and open the store; undo both at shutdown."""
    stack = AsyncExitStack()
    try:
        captured: dict[str, Mapping[str, Any]] = {}
        manager = LifespanManager(
            _capture_state(app, captured),
            startup_timeout=_LIFESPAN_TIMEOUT,
            shutdown_timeout=_LIFESPAN_TIMEOUT,
        )
        try:
            await stack.enter_async_context(manager)
        except LifespanNotSupported:
            logger.info("asgi-worker: the app does not support lifespan; running without it")
        client = store_client(config.redis_url, config, read_timeout=False)  # see run_job
        stack.push_async_callback(close_client, client)
        store = RedisStore(client, prefix=config.prefix, claim_ttl=config.claim_lease)
        shared = config.queue_redis_url in (None, config.redis_url)
        commit_with_job = partial(hand_off, store, config.redis_timeout) if shared else None
        state = captured.get("state")
        return _Runtime(stack, store, state, commit_with_job, client, Throttle())
    except BaseException:
        await stack.aclose()
        raise


def _watch_failovers(runtime: _Runtime, queue: ArqRedis | None, config: Config) -> None:
    """On Sentinel, watch for failovers: they drop the store's and arq's connections.

    The watch stops with the rest of the runtime at shutdown.
    """
    store = runtime.store_client
    # A Cluster fails over by itself (its client re-reads the slot map): nothing to drop.
    pools: list[ConnectionPool] = [store.connection_pool] if isinstance(store, Redis) else []
    if queue is not None:
        pools.append(queue.connection_pool)
    watch = FailoverWatch.for_pools(*pools, connect_timeout=config.redis_timeout)
    if watch is not None:
        watch.start()
        runtime.exit_stack.push_async_callback(watch.stop)


def _capture_state(app: ASGIApp, captured: dict[str, Mapping[str, Any]]) -> ASGIApp:
    """Wrap `app` to keep the lifespan `state` the manager hands it, for the replays."""

    async def app_with_state_capture(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and "state" in scope:
            captured["state"] = scope["state"]
        await app(scope, receive, send)

    return app_with_state_capture

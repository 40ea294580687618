"""Find the `WorkerMiddleware` inside an app, and with it the app's `Config`.

The worker, `run_pending`, `Invalidator.for_app` and the CLI are given the app you serve;
the middleware sits somewhere inside it (see `app_layers` for the shapes it is found in).
The walk looks for `CacheLayer`, the middleware's base class, so that the core (and the
worker) find it without importing the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from starlette.types import ASGIApp

from asgi_worker.core.app_layers import walk
from asgi_worker.core.config import Config, ConfigurationError


class CacheLayer:
    """The base class of `WorkerMiddleware`: what the walk of an app looks for."""

    config: Config
    """The layer's configuration."""


Layer = TypeVar("Layer", bound=CacheLayer)

HOW_TO_PASS_CONFIG = (
    "pass the Config explicitly (--config module:config, or ASGI_WORKER_* variables; "
    "config= in Python)"
)


@dataclass(frozen=True, slots=True)
class Found(Generic[Layer]):
    """A middleware in an app, and how it is reached."""

    middleware: Layer
    mounted: bool
    """Reached through a `Mount`: the root path it sees is longer than the server's."""


def find_all(app: ASGIApp, kind: type[Layer]) -> list[Found[Layer]]:
    """Every cache layer of class `kind` in `app`, outermost first."""
    return [Found(node, mounted) for node, mounted in walk(app) if isinstance(node, kind)]


def find_middleware(app: ASGIApp, kind: type[Layer]) -> Layer | None:
    """The outermost cache layer of class `kind` in `app`, or None.

    Found through middleware stacks, mounts and the frameworks' wrappers (Starlette,
    FastAPI, Litestar, Quart).
    """
    found = find_all(app, kind)
    return found[0].middleware if found else None


def find_config(app: ASGIApp) -> Config:
    """The `Config` of the middleware(s) in `app`; a clear error if there is none or several."""
    configs = list(dict.fromkeys(found.middleware.config for found in find_all(app, CacheLayer)))
    if not configs:
        raise ConfigurationError(
            f"no WorkerMiddleware found in {_name(app)}: add it to the app you pass "
            f"(the app you serve), or {HOW_TO_PASS_CONFIG}"
        )
    if len(configs) > 1:
        prefixes = ", ".join(repr(config.prefix) for config in configs)
        raise ConfigurationError(
            f"{_name(app)} holds WorkerMiddlewares with {len(configs)} different configs "
            f"(prefixes {prefixes}): {HOW_TO_PASS_CONFIG}"
        )
    return configs[0]


def config_mismatch(app: ASGIApp, config: Config) -> str | None:
    """Why `config` may not serve the middleware in `app`, or None if it does.

    A worker whose prefix or queue differs from the middleware's never answers the
    middleware's jobs: its clients get 202 until someone notices.
    """
    configs = list(dict.fromkeys(found.middleware.config for found in find_all(app, CacheLayer)))
    if not configs:
        return (
            f"no WorkerMiddleware found in {_name(app)}: replays store what the whole app "
            "answers, and layers outside the middleware will run twice on a hit"
        )
    if any(c.prefix == config.prefix and c.queue == config.queue for c in configs):
        return None
    theirs = "; ".join(_prefix_and_queue(c) for c in configs)
    return (
        f"this worker's Config ({_prefix_and_queue(config)}) does not match the "
        f"WorkerMiddleware in the app ({theirs}), so this worker will never run that "
        "middleware's jobs: its requests get 202 until a worker with its Config runs. "
        "Give the worker the middleware's Config, or none (no --config and no "
        "ASGI_WORKER_* variables; config=None in Python) to take it from the app."
    )


def _prefix_and_queue(config: Config) -> str:
    return f"prefix {config.prefix!r}, queue {config.queue!r}"


def _name(app: object) -> str:
    return f"the app ({type(app).__module__}.{type(app).__qualname__})"

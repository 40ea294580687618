"""What to invalidate: targets, their matching rules, and the `Invalidator` API.

The original rack-worker gem expired entries by URL, URL prefix and query parameters
(with SQL substring matches). Here the same, plus tags, each matched exactly:

- `path("/foo")`: every stored query variant of `/foo`, on every host;
- `prefix("/reports/")` and `glob("/reports/*")`: every path matching;
- `query("/foo", {"a": "1"})`: the `/foo` entries whose query string holds all the given
  `name=value` pairs, compared after percent-decoding, in any order, repeated names allowed;
- `tag("report-42")`: every entry whose response carried the tag (`Surrogate-Key`).

Hard (default) deletes: the next GET is a 202. `soft=True` marks stale: the entry is
served stale while one refresh runs, as a CDN's soft purge does.
"""

from __future__ import annotations

import glob as globbing
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

from starlette.types import ASGIApp

from asgi_worker.backends.base import Store
from asgi_worker.backends.redis.clients import close_client, store_client
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.config import Config
from asgi_worker.core.discovery import find_all
from asgi_worker.core.invalidation_targets import ByGlob, ByPath, ByQuery, ByTag, Target
from asgi_worker.web.middleware import WorkerMiddleware

__all__ = ["Invalidator"]


class Invalidator:
    """Expire stored responses by path, prefix, glob, query parameters or tag.

    Get one with `Invalidator.connect(config)` in scripts and other services (Redis
    backends), or `Invalidator.for_app(app)` in the process that serves the app (every
    backend, `memory://` included), not with its constructor:

    ```python
    async with Invalidator.connect(Config.from_env()) as invalidator:
        await invalidator.tag("report-42")
    ```

    Each method matches entries of every host and returns how many it expired. By
    default they are deleted: the next GET is a `202`, and a job stores the response
    anew. With `soft=True` they are marked stale instead, and still served while one
    refresh runs, as a CDN's soft purge does.
    """

    def __init__(self, *stores: Store) -> None:
        self._stores = stores

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: Config) -> AsyncIterator[Invalidator]:
        """An invalidator on the Redis store `config` names, for the `async with` block.

        Args:
            config: The app's `Config`, or one with the same `redis_url` and `prefix`.

        Yields:
            The invalidator; its connection is closed when the block ends.

        Raises:
            ValueError: `config` is `memory://`, whose entries live in the web process:
                use `for_app` there.
        """
        if config.embedded:
            raise ValueError(
                "memory:// entries live inside the web process: use Invalidator.for_app(app)"
            )
        client = store_client(config.redis_url, config)
        try:
            yield cls(RedisStore(client, prefix=config.prefix, claim_ttl=config.claim_lease))
        finally:
            await close_client(client)

    @classmethod
    def for_app(cls, app: ASGIApp) -> Invalidator:
        """An invalidator on the store of the `WorkerMiddleware` inside `app`.

        Where the app holds several (Litestar builds one per route handler and method),
        each store they serve from is invalidated once.

        Args:
            app: The app you serve, with a `WorkerMiddleware` anywhere inside.

        Raises:
            LookupError: `app` holds no `WorkerMiddleware`.
        """
        middlewares = [found.middleware for found in find_all(app, WorkerMiddleware)]
        if not middlewares:
            raise LookupError(f"no WorkerMiddleware found in the app ({type(app).__qualname__})")
        # Those that served (twins share one store); else the first, which opens its own.
        serving = [middleware for middleware in middlewares if middleware.opened]
        stores: dict[object, Store] = {}
        for middleware in serving or middlewares[:1]:
            config, store = middleware.config, middleware.store
            where = id(store) if config.embedded else (config.redis_url, config.prefix)
            stores.setdefault(where, store)
        return cls(*stores.values())

    async def path(self, path: str, *, soft: bool = False) -> int:
        """Expire every stored query variant of `path`: `/r` expires `/r?year=2024` too.

        Returns:
            How many entries were expired (as every method does).
        """
        return await self._invalidate(ByPath(path), soft)

    async def prefix(self, prefix: str, *, soft: bool = False) -> int:
        """Expire every path that starts with `prefix` (`/reports/`), all their queries."""
        return await self._invalidate(ByGlob(globbing.escape(prefix) + "*"), soft)

    async def glob(self, pattern: str, *, soft: bool = False) -> int:
        """Expire every path matching the shell-style `pattern` (`*` also matches `/`)."""
        return await self._invalidate(ByGlob(pattern), soft)

    async def query(
        self,
        path: str,
        params: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        soft: bool = False,
    ) -> int:
        """Expire the entries of `path` whose query holds every `name=value` of `params`.

        Compared after percent-decoding, in any order; the query may hold others too.

        Raises:
            ValueError: `params` is empty (use `path`).
        """
        pairs = tuple(params.items() if isinstance(params, Mapping) else params)
        if not pairs:
            raise ValueError("query() needs at least one name=value pair; use path()")
        return await self._invalidate(ByQuery(path, pairs), soft)

    async def tag(self, tag: str, *, soft: bool = False) -> int:
        """Expire every entry whose response carried `tag` in `Config.tag_header`."""
        return await self._invalidate(ByTag(tag), soft)

    async def _invalidate(self, target: Target, soft: bool) -> int:
        return sum([await store.invalidate(target, soft=soft) for store in self._stores])

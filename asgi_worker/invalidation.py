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

import fnmatch
import glob as globbing
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from .config import Config
    from .store import Store

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class ByPath:
    """Every entry of one path."""

    path: str


@dataclass(frozen=True, slots=True)
class ByGlob:
    """Every entry whose path matches a shell-style pattern (`*` also matches `/`)."""

    pattern: str

    def matches(self, path: str) -> bool:
        """True if `path` is selected."""
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclass(frozen=True, slots=True)
class ByQuery:
    """The entries of one path whose query holds all of `params`."""

    path: str
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ByTag:
    """Every entry whose response carried the tag."""

    tag: str


Target = ByPath | ByGlob | ByQuery | ByTag


def query_matches(query: bytes, params: tuple[tuple[str, str], ...]) -> bool:
    """True if every `(name, value)` in `params` occurs in the raw query string."""
    present = set(parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"))
    wanted = {
        (name.encode().decode("latin-1"), value.encode().decode("latin-1"))
        for name, value in params
    }
    return wanted <= present


def glob_range(pattern: str) -> tuple[bytes, bytes]:
    """The ZRANGEBYLEX bounds that hold every path the pattern can match."""
    literal = _GLOB_CHARS.split(pattern, maxsplit=1)[0].encode("utf-8", "surrogatepass")
    if not literal:
        return b"-", b"+"
    # UTF-8 never contains 0xff: every string starting with `literal` sorts in between.
    return b"[" + literal, b"[" + literal + b"\xff"


class Invalidator:
    """Expire stored responses by path, prefix, glob, query parameters or tag.

    Every method returns how many stored entries it expired. Use `Invalidator.connect`
    from scripts and other services (Redis backends), or `Invalidator.for_app` inside the
    process that serves the app (every backend, `memory://` included).
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: Config) -> AsyncIterator[Invalidator]:
        """An invalidator on the Redis store `config` names; closes it afterwards."""
        from .backend import redis_client
        from .store import RedisStore

        if config.embedded:
            raise ValueError(
                "memory:// entries live inside the web process: use Invalidator.for_app(app)"
            )
        client = redis_client(config.redis_url, config)
        try:
            yield cls(RedisStore(client, prefix=config.prefix, claim_ttl=config.claim_lease))
        finally:
            await client.aclose(close_connection_pool=True)

    @classmethod
    def for_app(cls, app: ASGIApp) -> Invalidator:
        """An invalidator on the store of the `WorkerMiddleware` inside `app`."""
        from .testing import find_middleware

        middleware = find_middleware(app)
        if middleware is None:
            raise LookupError("no WorkerMiddleware in the app (has it served a request yet?)")
        return cls(middleware.store)

    async def path(self, path: str, *, soft: bool = False) -> int:
        """Every stored query variant of `path`."""
        return await self._store.invalidate(ByPath(path), soft=soft)

    async def prefix(self, prefix: str, *, soft: bool = False) -> int:
        """Every path that starts with `prefix`."""
        return await self._store.invalidate(ByGlob(globbing.escape(prefix) + "*"), soft=soft)

    async def glob(self, pattern: str, *, soft: bool = False) -> int:
        """Every path matching the shell-style `pattern` (`*` also matches `/`)."""
        return await self._store.invalidate(ByGlob(pattern), soft=soft)

    async def query(
        self,
        path: str,
        params: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        soft: bool = False,
    ) -> int:
        """The entries of `path` whose query holds every `name=value` of `params`."""
        pairs = tuple(params.items() if isinstance(params, Mapping) else params)
        if not pairs:
            raise ValueError("query() needs at least one name=value pair; use path()")
        return await self._store.invalidate(ByQuery(path, pairs), soft=soft)

    async def tag(self, tag: str, *, soft: bool = False) -> int:
        """Every entry whose response carried `tag` in the tag header."""
        return await self._store.invalidate(ByTag(tag), soft=soft)

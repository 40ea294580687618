"""The ASGI apps inside an app: a walk that knows the shapes of the frameworks we support.

It follows, without importing any framework but Starlette:

- middleware chains (the next app in `.app`, as Starlette's middlewares and ours keep it);
- Starlette and FastAPI apps (their middleware stack; built here if the app has not
  served a request yet, exactly as Starlette builds it on its first one), routers,
  `Mount`s and `Host`s;
- Litestar apps (the middleware stack of every route handler: Litestar builds one
  middleware instance per handler);
- Quart apps whose `asgi_app` was replaced (`app.asgi_app = WorkerMiddleware(...)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Host, Mount, Router

# A real app has tens to hundreds of nodes; this bounds a walk through something odd.
_MAX_NODES = 100_000


def walk(app: Any) -> Iterator[tuple[Any, bool]]:
    """Every app reachable from `app` (itself first), with whether a `Mount` leads to it."""
    seen: set[int] = set()
    pending: list[tuple[Any, bool]] = [(app, False)]
    while pending and len(seen) < _MAX_NODES:
        node, mounted = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, mounted
        # Reversed onto a stack: the first child is visited first.
        children = list(_children(node))
        pending.extend((child, mounted or via_mount) for child, via_mount in reversed(children))


def _children(node: Any) -> Iterator[tuple[Any, bool]]:
    """The ASGI apps `node` calls, each with whether a `Mount` leads to it."""
    if isinstance(node, Starlette):
        if node.middleware_stack is None:
            node.middleware_stack = node.build_middleware_stack()
        yield node.middleware_stack, False
        return
    if isinstance(node, Router):
        for route in node.routes:
            if isinstance(route, Mount | Host):
                yield route.app, isinstance(route, Mount)
        return
    router = _attribute(node, "asgi_router")
    trie = _attribute(router, "root_route_map_node")
    if trie is not None:  # Litestar: one middleware stack per route handler
        yield from ((app, False) for app in _litestar_handlers(trie))
        return
    replaced = vars(node).get("asgi_app") if hasattr(node, "__dict__") else None
    if replaced is not None:  # Quart, with `app.asgi_app = WorkerMiddleware(...)`
        yield replaced, False
    inner = _attribute(node, "app")
    if inner is not None and callable(inner):
        yield inner, False


def _litestar_handlers(root: Any) -> Iterator[Any]:
    pending, seen = [root], set()
    while pending:
        trie_node = pending.pop()
        if id(trie_node) in seen:
            continue
        seen.add(id(trie_node))
        for handler in (_attribute(trie_node, "asgi_handlers") or {}).values():
            app = _attribute(handler, "asgi_app")
            if app is not None:
                yield app
        pending.extend((_attribute(trie_node, "children") or {}).values())


def _attribute(node: Any, name: str) -> Any:
    """`node.name`, or None where it is missing or its property fails."""
    try:
        return getattr(node, name, None)
    except Exception:  # a property of someone else's object: not ours to break on
        return None

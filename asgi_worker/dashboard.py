"""The ops dashboard: a page of its own for operators, as Flower or rq-dashboard are.

`create_dashboard(config, token=...)` is an ASGI app (Starlette routing, no HTTP
middleware classes) to mount in your app, outside the cache (`Config.exclude`), or to
serve with `asgi-worker dashboard MODULE:APP`. It shows the queue's depth and oldest job,
the running jobs with their progress, the recent jobs, the last hour's hit ratio and
lookup latency (`Config.dashboard_counts`), and the paths holding the most entries, read
again every second by the page's script (`GET api/state`); and it invalidates a path, after
a confirmation, through `Invalidator`.

Access: `Authorization: Bearer <token>`, or a session cookie (HttpOnly, SameSite=Strict)
from its sign-in form. A form posted with the cookie must come from the dashboard's own
origin (`Sec-Fetch-Site`/`Origin`) and carry the session's CSRF token. Every answer is
`Cache-Control: no-store`. See docs/dashboard.md.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from urllib.parse import parse_qsl

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_worker.backends.memory import MemoryStore
from asgi_worker.core.config import Config
from asgi_worker.core.dashboard_session import SESSION_SECONDS, Sessions, same_origin
from asgi_worker.core.discovery import find_middleware
from asgi_worker.invalidation import Invalidator
from asgi_worker.observability.dashboard_counts import dashboard_observer
from asgi_worker.observability.dashboard_state import ProcessReader, RedisReader
from asgi_worker.web.middleware import WorkerMiddleware

__all__ = ["create_dashboard"]

COOKIE = "asgi_worker_dashboard"
"""The session cookie's name."""
MAX_FORM_BYTES = 16 * 1024
"""A form body larger than this is refused (413): the forms hold a path and two tokens."""
MAX_PATH_LENGTH = 2048

_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),  # the confirm button must not be clickjacked
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    # Not no-referrer: with it, a browser sends `Origin: null` on the forms it posts.
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
]
_REPLACED = {name for name, _ in _HEADERS}


def create_dashboard(
    config: Config, *, token: str, app: ASGIApp | None = None, refresh: float = 1.0
) -> ASGIApp:
    """The ops dashboard of the cache `config` describes, as an ASGI app.

    Mount it where only operators go, outside the cache: with `WorkerMiddleware` around
    the app, exclude its path (`Config(exclude=("/ops/*",))`, the same `Config` for the
    worker), or mount it beside the middleware rather than inside.

    Args:
        config: The app's `Config`. On Redis the dashboard reads that Redis with clients
            of its own; with `memory://` it reads the app's own store and queue.
        token: The secret an operator signs in with (also `Authorization: Bearer`).
        app: The app you serve, with its `WorkerMiddleware`: needed with `memory://`
            only, and then only if the dashboard is not mounted in it (mounted, it is
            found from the request).
        refresh: Seconds between two reads of the page's numbers.

    Raises:
        ValueError: `token` is empty.
    """
    return _Dashboard(config, Sessions(token), app, refresh)


class _Dashboard:
    """The app: Starlette's routing inside, the no-store headers around it."""

    def __init__(
        self, config: Config, sessions: Sessions, app: ASGIApp | None, refresh: float
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._app = app
        self._refresh_ms = max(100, round(refresh * 1000))
        self._redis = None if config.embedded else RedisReader(config)
        self._page = files("asgi_worker").joinpath("static", "dashboard.html").read_text()
        self._router = Starlette(
            routes=[
                Route("/", self.page, methods=["GET"]),
                Route("/api/state", self.api_state, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/invalidate", self.invalidate, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None and scope["type"] == "http" and self._config.embedded:
            self._app = scope.get("app")  # the app it is mounted in (Starlette's own sets it)

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k not in _REPLACED]
                message = {**message, "headers": kept + _HEADERS}
            await send(message)

        await self._router(scope, receive, send_no_store)

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Closes the Redis clients when served on its own (a `Mount` runs no lifespan)."""
        yield
        if self._redis is not None:
            await self._redis.close()

    # Who asks.

    def _bearer(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._sessions.token_matches(credentials.strip())

    def _session(self, request: Request) -> str | None:
        return self._sessions.session_of(request.cookies.get(COOKIE))

    def _allowed(self, request: Request) -> bool:
        return self._bearer(request) or self._session(request) is not None

    def _form_allowed(self, request: Request, form: dict[str, str]) -> bool:
        """A POST with the session cookie: same origin and the session's CSRF token.

        A bearer token is no ambient credential (a browser never adds it by itself), so
        a request that carries it needs neither.
        """
        if self._bearer(request):
            return True
        session = self._session(request)
        return (
            session is not None
            and self._from_here(request)
            and self._sessions.csrf_matches(session, form.get("csrf", ""))
        )

    def _from_here(self, request: Request) -> bool:
        return same_origin(
            request.headers.get("sec-fetch-site"),
            request.headers.get("origin"),
            request.url.scheme,
            request.headers.get("host"),
        )

    # Pages.

    async def page(self, request: Request) -> Response:
        """The dashboard, or (401) the sign-in form."""
        session = self._session(request)
        if session is None and not self._bearer(request):
            return _login_page(_base(request), "", status=401)
        csrf = "" if session is None else self._sessions.csrf(session)
        values = {
            "base": _base(request),
            "csrf": csrf,
            "refresh": str(self._refresh_ms),
            "cache": f"{self._config.prefix} ({'memory://' if self._config.embedded else 'Redis'})",
        }
        page = self._page
        for name, value in values.items():
            page = page.replace("{{" + name + "}}", html.escape(value, quote=True))
        return HTMLResponse(page)

    async def api_state(self, request: Request) -> Response:
        """The numbers, as JSON (what the page's script reads every `refresh` seconds)."""
        if not self._allowed(request):
            return JSONResponse(
                {"error": "unauthorized"}, 401, headers={"www-authenticate": "Bearer"}
            )
        if self._redis is not None:
            try:
                return JSONResponse(await self._redis.read())
            except (RedisError, OSError) as error:  # the page says so, and tries again
                return JSONResponse({"error": f"Redis: {error}"}, 503)
        reader = self._process_reader()
        if reader is None:
            return JSONResponse({"error": _NO_MIDDLEWARE}, 503)
        return JSONResponse(await reader.read())

    async def login(self, request: Request) -> Response:
        """The sign-in form's POST: the token, from this origin, sets the session cookie."""
        form = await _form(request)
        base = _base(request)
        if form is None:
            return _login_page(base, "That form is too large.", status=413)
        if not self._from_here(request):
            return _login_page(base, "Sign in from the dashboard's own page.", status=403)
        if not self._sessions.token_matches(form.get("token", "")):
            return _login_page(base, "That is not the dashboard's token.", status=401)
        response = RedirectResponse(f"{base}/", status_code=303)
        response.set_cookie(
            COOKIE,
            self._sessions.new(),
            max_age=SESSION_SECONDS,
            path=f"{base}/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        """Ends the session: the cookie is cleared."""
        form = await _form(request)
        if form is None or not self._form_allowed(request, form):
            return _message(_base(request), "Forbidden", "Not signed out: refused.", 403)
        response = RedirectResponse(f"{_base(request)}/", status_code=303)
        response.delete_cookie(COOKIE, path=f"{_base(request)}/")
        return response

    async def invalidate(self, request: Request) -> Response:
        """Invalidate a path: a confirmation page first, then (`confirm=yes`) the deed."""
        base = _base(request)
        form = await _form(request)
        if form is None:
            return _message(base, "Too large", "That form is too large.", 413)
        if not self._allowed(request):
            return _login_page(base, "", status=401)
        if not self._form_allowed(request, form):
            return _message(
                base,
                "Refused",
                "Refused: the form must come from this dashboard's own page, with its "
                "session's CSRF token.",
                403,
            )
        path = form.get("path", "")
        if not path.startswith("/") or len(path) > MAX_PATH_LENGTH or not path.isprintable():
            return _message(base, "Not a path", "A path starts with / (like /reports).", 400)
        if form.get("confirm") != "yes":
            return _confirm_page(base, path, form.get("csrf", ""))
        count = await self._invalidate_path(path)
        if count is None:
            return _message(base, "Unavailable", _NO_MIDDLEWARE, 503)
        noun = "entry" if count == 1 else "entries"
        return _message(base, "Invalidated", f"{count} {noun} of {path} invalidated.", 200)

    async def _invalidate_path(self, path: str) -> int | None:
        if not self._config.embedded:
            async with Invalidator.connect(self._config) as invalidator:
                return await invalidator.path(path)
        if self._app is None or find_middleware(self._app, WorkerMiddleware) is None:
            return None
        return await Invalidator.for_app(self._app).path(path)

    def _process_reader(self) -> ProcessReader | None:
        """The `memory://` app's own queue, store and counts (found anew: cheap)."""
        middleware = None if self._app is None else find_middleware(self._app, WorkerMiddleware)
        if middleware is None or not isinstance(middleware.store, MemoryStore):
            return None
        counts = dashboard_observer(middleware.observer)
        return ProcessReader(middleware.queue, middleware.store, counts)


_NO_MIDDLEWARE = (
    "memory:// lives in the web process: mount the dashboard in the app that holds the "
    "WorkerMiddleware, or pass it create_dashboard(app=...)"
)


def _base(request: Request) -> str:
    """Where the dashboard is mounted (`/ops`), "" at the root."""
    return str(request.scope.get("root_path", "")).rstrip("/")


async def _form(request: Request) -> dict[str, str] | None:
    """The urlencoded form posted; None if it is larger than `MAX_FORM_BYTES`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


_STYLE = (
    "body{font:15px system-ui,sans-serif;margin:2rem;max-width:40rem}"
    "input,button{font:inherit;padding:.3rem .5rem}code{background:#eee;padding:0 .2rem}"
)


def _frame(base: str, title: str, body: str, status: int) -> HTMLResponse:
    """A small page: `body` is HTML already escaped."""
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)} · asgi-worker</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}"
        f'<p><a href="{html.escape(base)}/">Back to the dashboard</a></p></body></html>',
        status,
    )


def _message(base: str, title: str, text: str, status: int) -> HTMLResponse:
    return _frame(base, title, f'<p id="message">{html.escape(text)}</p>', status)


def _login_page(base: str, problem: str, *, status: int) -> HTMLResponse:
    said = f'<p id="problem">{html.escape(problem)}</p>' if problem else ""
    form = (
        f'{said}<form method="post" action="{html.escape(base)}/login">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" '
        'required autofocus></label> <button type="submit">Sign in</button></form>'
    )
    return _frame(base, "asgi-worker dashboard: sign in", form, status)


def _confirm_page(base: str, path: str, csrf: str) -> HTMLResponse:
    shown, action = html.escape(path), html.escape(f"{base}/invalidate")
    body = (
        f"<p>Invalidate every stored variant of <code>{shown}</code> (every query, every "
        "host)? The next GET of each is a 202 while a worker stores it anew.</p>"
        f'<form method="post" action="{action}">'
        f'<input type="hidden" name="path" value="{shown}">'
        f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
        '<input type="hidden" name="confirm" value="yes">'
        '<button type="submit" id="confirm">Yes, invalidate</button></form>'
    )
    return _frame(base, "Invalidate a path?", body, 200)

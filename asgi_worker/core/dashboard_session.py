"""The ops dashboard's sign-in: its token, session cookies and CSRF tokens (pure, no I/O).

A session cookie is `<id>.<issued>.<mac>`: a random id, when it was issued, and an
HMAC-SHA256 keyed with the dashboard's token over both. Its CSRF token is another HMAC
of the id, so each session has its own and nothing is kept on the server. Changing the
token ends every session. Every comparison is `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

SESSION_SECONDS = 12 * 3600
"""How long a session lasts from sign-in."""


class Sessions:
    """Signs and checks the sessions of one dashboard token."""

    def __init__(self, token: str, *, clock: Callable[[], float] = time.time) -> None:
        if not token:
            raise ValueError("the dashboard needs a token: an empty one would let anyone in")
        self._token = token.encode()
        self._clock = clock

    def token_matches(self, candidate: str) -> bool:
        """`candidate` is the dashboard's token."""
        return hmac.compare_digest(candidate.encode(), self._token)

    def new(self) -> str:
        """A new session's cookie value."""
        session = f"{secrets.token_urlsafe(18)}.{int(self._clock())}"
        return f"{session}.{self._mac('session', session)}"

    def session_of(self, cookie: str | None) -> str | None:
        """The session id of a valid, current cookie value; None otherwise."""
        if not cookie or cookie.count(".") != 2:
            return None
        session_id, issued, mac = cookie.split(".")
        session = f"{session_id}.{issued}"
        if not hmac.compare_digest(mac, self._mac("session", session)):
            return None
        try:
            age = self._clock() - int(issued)
        except ValueError:
            return None
        return session_id if 0 <= age <= SESSION_SECONDS else None

    def csrf(self, session_id: str) -> str:
        """The CSRF token of a session: what its forms carry."""
        return self._mac("csrf", session_id)

    def csrf_matches(self, session_id: str, candidate: str) -> bool:
        """`candidate` is that session's CSRF token."""
        return hmac.compare_digest(candidate, self.csrf(session_id))

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._token, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()


def same_origin(fetch_site: str | None, origin: str | None, scheme: str, host: str | None) -> bool:
    """Whether a browser says the request comes from the dashboard's own origin.

    `Sec-Fetch-Site` (every current browser sends it) must be `same-origin`; an `Origin`,
    if sent, must be `scheme://host` of this request. A request with neither is refused:
    a browser that sends neither cannot be told apart from a forged form.
    """
    if fetch_site is None and origin is None:
        return False
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    return origin is None or (host is not None and origin == f"{scheme}://{host}")

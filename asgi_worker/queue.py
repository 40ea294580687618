"""Deprecated import path: use `from asgi_worker import JobQueue`.

`asgi_worker.queue` was a module of the flat layout before 0.2; it keeps working, with a
`DeprecationWarning`, until 0.3.
"""

from __future__ import annotations

import warnings

from asgi_worker.backends.base import JobQueue

warnings.warn(
    "asgi_worker.queue is deprecated: import JobQueue from asgi_worker instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["JobQueue"]

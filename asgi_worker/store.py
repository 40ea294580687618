"""Deprecated import path: use `from asgi_worker import Store`.

`asgi_worker.store` was a module of the flat layout before 0.2; it keeps working, with a
`DeprecationWarning`, until 0.3.
"""

from __future__ import annotations

import warnings

from asgi_worker.backends.base import Store

warnings.warn(
    "asgi_worker.store is deprecated: import Store from asgi_worker instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Store"]

"""The `asgi-worker` command (`main`) and its demo app (`demo`).

May import anything in the package.
"""

from asgi_worker.cli.commands import main

__all__ = ["main"]

"""asgi-worker: the Worker Pattern for ASGI apps.

GET requests are served only from a Redis cache; a miss answers `202 Accepted` at once
and one background arq job replays the request through the same app to fill the cache.
"""

from .completion import ReplayWorker
from .config import Config, ConfigurationError
from .middleware import WorkerMiddleware
from .worker import worker_settings

__all__ = [
    "Config",
    "ConfigurationError",
    "ReplayWorker",
    "WorkerMiddleware",
    "__version__",
    "worker_settings",
]
__version__ = "0.1.0"

"""asgi-worker: the Worker Pattern for ASGI apps.

GET requests are served only from a Redis cache; a miss answers `202 Accepted` at once
and one background arq job replays the request through the same app to fill the cache.
"""

from asgi_worker.core.config import Config, ConfigurationError
from asgi_worker.web.middleware import WorkerMiddleware
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.settings import worker_settings

__all__ = [
    "Config",
    "ConfigurationError",
    "ReplayWorker",
    "WorkerMiddleware",
    "__version__",
    "worker_settings",
]
__version__ = "0.1.0"

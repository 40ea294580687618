"""asgi-worker: the Worker Pattern for ASGI apps.

GET requests are served only from a Redis cache; a miss answers `202 Accepted` at once
and one background arq job replays the request through the same app to fill the cache.

The public API is what this module exports, and the tool modules beside it:
`asgi_worker.invalidation` (`Invalidator`), `asgi_worker.testing` (`run_pending`,
`worker_running`, `find_middleware`), `asgi_worker.client` (`fetch`) and
`asgi_worker.stats` (`collect_stats`, `check_queue`). The subpackages (`core`,
`backends`, `observability`, `worker`, `web`, `cli`) are internal: their names may change
in any release.
"""

from asgi_worker.backends.base import JobQueue, Store
from asgi_worker.core.config import Config, ConfigurationError
from asgi_worker.web.middleware import WorkerMiddleware
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.progress import report_progress, report_progress_sync
from asgi_worker.worker.settings import worker_settings

__all__ = [
    "Config",
    "ConfigurationError",
    "JobQueue",
    "ReplayWorker",
    "Store",
    "WorkerMiddleware",
    "__version__",
    "report_progress",
    "report_progress_sync",
    "worker_settings",
]
__version__ = "0.1.0"

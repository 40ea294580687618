"""What the cache and its queue hold: `asgi-worker stats` from Python.

    from asgi_worker.stats import check_queue, collect_stats

The same numbers as the command (docs/stats.md); this is their public import path.
"""

from __future__ import annotations

from asgi_worker.observability.stats import QueueCheck, Stats, check_queue, collect_stats

__all__ = ["QueueCheck", "Stats", "check_queue", "collect_stats"]

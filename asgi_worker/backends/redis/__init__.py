"""The Redis backend: the store's scripts and keys, arq's queue, the clients.

`store` and `scripts` (the cache, one Cluster slot per script), `queue` and
`queue_scripts` (enqueueing on arq's queue, the worker's take), `clients` (connections to
one Redis, Sentinel or Cluster), `sentinel` (following a failover), `events` (pub/sub of
stored and invalidated entries), `retries` (which Redis errors pass, retried steps).

May import: `asgi_worker.core`, `asgi_worker.backends.base`.
"""

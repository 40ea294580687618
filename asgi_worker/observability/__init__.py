"""What the cache reports: the observer hooks, metrics, tracing, and cache statistics.

`observer` (the hooks the request path and the worker call), `from_config` (the observer a
`Config` asks for), `metrics` (Prometheus), `tracing` (OpenTelemetry), `route_labels`
(route templates as labels), `stats` (what `asgi-worker stats` reads from Redis).

May import: `asgi_worker.core`, `asgi_worker.backends`.
"""

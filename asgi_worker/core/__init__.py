"""The core: what a request and a stored answer are, and the rules both sides share.

Configuration (`config`, `credentials`, `redis_urls`), a request's identity and key
(`keys`, `normalize`), the stored answer's encoding (`codec`), freshness (`freshness`),
which requests are served from the cache (`policy`), the replay of a request through the
app (`replay`), invalidation targets (`invalidation_targets`), and finding the cache in an
app (`app_layers`, `discovery`).

May import: the standard library, starlette, msgpack. Nothing else of this package.
"""

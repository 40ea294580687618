"""Decoded bodies of gzip entries, kept a while for clients that accept no gzip.

The cache stores a compressible answer gzipped (docs/compression.md); a client that does
not accept gzip gets it decoded, which costs a pass over the body per hit (about 0.15 ms
for 120 KB, twice what the rest of such a hit costs). Kept here, a hot entry is decoded
once per `KEEP_SECONDS` per process instead. Entries are keyed by their content
(`representations.content_key`), so a newer commit of the URL never gets an older body.
"""

from __future__ import annotations

from asgi_worker.core.codec import StoredResponse
from asgi_worker.core.representations import content_key, select
from asgi_worker.web.near_cache import NearCache, bytes_cost

KEEP_SECONDS = 10.0
"""How long a decoded body is kept after it was decoded (memory falls back when idle)."""


class DecodedBodies:
    """Decoded bodies, at most `max_bytes` of process memory (least recently used out).

    With `max_bytes` 0 none is kept: each such hit decodes.
    """

    def __init__(self, max_bytes: int) -> None:
        self._bodies: NearCache[bytes] | None = None
        if max_bytes > 0:
            self._bodies = NearCache(ttl=KEEP_SECONDS, max_bytes=max_bytes, cost=bytes_cost)

    def select(self, digest: str, response: StoredResponse, accepts_gzip: bool) -> StoredResponse:
        """`representations.select`, with the decoded body kept for the next such hit."""
        bodies = self._bodies
        if accepts_gzip or response.coded is None or bodies is None:
            return select(response, accepts_gzip)
        key = digest + content_key(response).hex()
        decoded = bodies.get(key)
        chosen = select(response, accepts_gzip, decoded)
        if decoded is None:
            bodies.put(key, chosen.body)
        return chosen

"""The request path: the middleware and what only it uses.

`middleware` (`WorkerMiddleware`), `backend` (opens the store and the queue for it),
`responses` (the answers it sends), `waiting` (`Prefer: wait`), `near_cache` (hits held in
process), `key_memo` (recent requests' keys), `single_flight` (one lookup per key at a
time).

May import: `asgi_worker.core`, `asgi_worker.backends`, `asgi_worker.observability`,
`asgi_worker.worker` (in-process jobs of the `memory://` backend).
"""

"""Where answers are stored and jobs are queued.

`base` holds the two protocols every backend implements (`Store`, `JobQueue`) and the
values they pass; `memory` is the in-process backend (`memory://`); `redis` is Redis,
Sentinel and Cluster, with arq's queue.

May import: `asgi_worker.core`. A backend never imports another backend.
"""

"""The worker: runs each job's replay and stores its answer.

`settings` (`worker_settings()`, the arq settings for an app), `arq_worker` (the
`ReplayWorker`: the one module that knows arq's internals), `job_taker` (takes due jobs
off the queue), `job` (one job: replay, then commit), `outage` (waiting out a Redis that
cannot be reached).

May import: `asgi_worker.core`, `asgi_worker.backends`, `asgi_worker.observability`.
"""

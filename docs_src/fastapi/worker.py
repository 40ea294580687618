"""For arq's own CLI: `arq worker.WorkerSettings`."""

from asgi_worker import worker_settings

from app import app

WorkerSettings = worker_settings(app)

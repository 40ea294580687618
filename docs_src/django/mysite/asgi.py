"""Django's ASGI application behind WorkerMiddleware: serve it, and give it to the worker."""

import os

from asgi_worker import Config, WorkerMiddleware
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

config = Config(redis_url="redis://127.0.0.1:6379/0", prefix="example-django", ttl=300)

application = WorkerMiddleware(get_asgi_application(), config=config)

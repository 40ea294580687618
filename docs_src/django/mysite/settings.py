"""Settings of a minimal project: two views, no database, no apps."""

SECRET_KEY = "django-insecure-replace-me"  # read yours from the environment
DEBUG = False
# The worker replays each request with the Host it came with: list the hosts you serve.
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "mysite.urls"

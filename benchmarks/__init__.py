"""Benchmarks of asgi-worker: `nox -s bench` or `python -m benchmarks.run`."""

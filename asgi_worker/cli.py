"""The `asgi-worker` command."""

from __future__ import annotations

import importlib
import logging.config
import os
import sys
from typing import Any

import click
from arq.logs import default_log_config
from arq.worker import run_worker

from .config import Config, ConfigurationError
from .worker import worker_settings


def import_object(spec: str) -> Any:
    """Import `module:attribute` (dots allowed in the attribute), with a clear error."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not of the form module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn and arq do: find the user's modules
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise click.BadParameter(f"cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise click.BadParameter(f"{module_name!r} has no attribute {attribute!r}") from None
    return found


@click.group()
@click.version_option(package_name="asgi-worker")
def main() -> None:
    """asgi-worker: serve slow GET endpoints from a cache filled by background workers."""


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option(
    "--config",
    "config_spec",
    metavar="MODULE:CONFIG",
    help="A Config object to use; by default one is built from ASGI_WORKER_* variables.",
)
@click.option("--burst", is_flag=True, help="Run the queued jobs, then exit.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Debug logging (jobs are logged at INFO already)."
)
def worker(app_spec: str, config_spec: str | None, burst: bool, verbose: bool) -> None:
    """Run a worker that replays requests through MODULE:APP (e.g. myproject.main:app)."""
    app = import_object(app_spec)
    if config_spec is None:
        try:
            config = Config.from_env()
        except ConfigurationError as error:
            raise click.UsageError(str(error)) from error
    else:
        config = import_object(config_spec)
        if not isinstance(config, Config):
            raise click.BadParameter(
                f"{config_spec!r} is a {type(config).__name__}, not an asgi_worker.Config"
            )
    log_config = default_log_config(verbose)
    log_config["loggers"]["asgi_worker"] = dict(log_config["loggers"]["arq"])
    logging.config.dictConfig(log_config)
    run_worker(worker_settings(app, config), burst=burst)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--redis-url",
    envvar="ASGI_WORKER_REDIS_URL",
    help="Use Redis (jobs run in this process) instead of the embedded memory:// backend.",
)
@click.option("--seconds", default=2.0, show_default=True, type=float, help="How slow /slow is.")
def demo(host: str, port: int, redis_url: str | None, seconds: float) -> None:
    """Serve a demo app: a slow endpoint behind the middleware and a page that polls it."""
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError("the demo needs uvicorn: pip install 'asgi-worker[demo]'") from None
    from .demo import create_app, demo_config

    config = demo_config(redis_url)
    backend = "embedded memory:// backend" if config.embedded else f"Redis at {redis_url}"
    base = f"http://{host}:{port}"
    click.echo(
        f"asgi-worker demo on the {backend}\n"
        f"  open   {base}/\n"
        f"  or run curl -i '{base}/slow?n=100000'\n"
        f"  (202 at once; the same again after ~{seconds:g} s: 200 with the result)\n"
        "Stop with Ctrl+C."
    )
    uvicorn.run(create_app(config, seconds=seconds), host=host, port=port, log_level="warning")

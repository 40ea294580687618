"""`Age` counts on one clock, Redis's, whatever the web and worker hosts' clocks say
(RFC 9111 section 4.2.3: the cache's own clock).

Real processes: uvicorn and an `asgi-worker worker` whose wall clocks are wrong, each its
own way. A `sitecustomize` module, which Python imports as it starts, shifts `time.time`
(and `time.time_ns`) by `AW_CLOCK_OFFSET` seconds before anything else is imported: the
web host's clock is an hour ahead, the worker's half an hour behind. The monotonic clock
is left alone, as a wrong wall clock leaves it.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import sys
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from asgi_worker.codec import decode_response

from .processes import Processes, asgi_worker_command, free_port, http_client, processes
from .stack import APP, environment, get_until_ready

WEB_AHEAD = 3600.0
WORKER_BEHIND = 1800.0

_SKEWED = """\
import os
import time

_offset = float(os.environ.get("AW_CLOCK_OFFSET", "0"))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
"""


def skewed(env: dict[str, str], directory: Path, offset: float) -> dict[str, str]:
    """`env` for a process whose wall clock is `offset` seconds off."""
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SKEWED)
    path = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "AW_CLOCK_OFFSET": str(offset)}


def start(group: Processes, env: dict[str, str], clock: Path, port: int) -> None:
    """uvicorn an hour ahead, a worker half an hour behind; wait until both serve."""
    command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)]
    group.start("uvicorn", command, env=skewed(env, clock, WEB_AHEAD))
    group.wait_for(
        "uvicorn", lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    )
    group.start(
        "worker", asgi_worker_command("worker", APP), env=skewed(env, clock, -WORKER_BEHIND)
    )


async def test_age_is_counted_on_redis_clock_when_web_and_worker_clocks_disagree(
    tmp_path: Path, prefix: str, redis: Redis
) -> None:
    env = environment(prefix)
    port = free_port()
    with processes(tmp_path, env) as group:
        start(group, env, tmp_path / "clock", port)
        async with http_client(f"http://127.0.0.1:{port}") as http:
            # The web host's clock is off indeed: its Date header says so.
            health = await http.get("/health")
            shown = email.utils.parsedate_to_datetime(health.headers["date"]).timestamp()
            assert abs(shown - time.time() - WEB_AHEAD) < 5

            url = "/hang?seconds=1"  # the job takes a second: stored_at is its end
            assert (await http.get(url)).status_code == 202
            ready = await get_until_ready(http, url, within=20)
            assert ready.status_code == 200
            assert int(ready.headers["age"]) <= 1
            # The entry's stored_at is Redis's time, not the worker's (30 min behind).
            entries = [key async for key in redis.scan_iter(match=f"{prefix}*:resp")]
            assert len(entries) == 1
            stored = decode_response(await redis.get(entries[0]))
            seconds, micros = await redis.time()
            assert abs(seconds + micros / 1e6 - stored.stored_at) < 3

            await asyncio.sleep(2.0)
            later = await http.get(url)
            assert later.headers["cache-status"] == "asgi-worker; hit"
            assert 1 <= int(later.headers["age"]) <= 3

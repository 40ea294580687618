"""The demo app behind `asgi-worker demo`: a slow endpoint and a page that waits for it.

The page uses the package's browser client (`asgi_worker/static/client.js`), served at
`/client.js`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from importlib.resources import files

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from asgi_worker.core.config import Config
from asgi_worker.web.middleware import WorkerMiddleware
from asgi_worker.worker.progress import report_progress

MAX_N = 200_000
MAX_SECONDS = 10.0
PROGRESS_STEPS = 20
CLIENT_JS = ("static", "client.js")
"""The browser client, inside the package (`fetchWhenReady`)."""


def client_js() -> bytes:
    """The browser client's source, as shipped in the package."""
    return files("asgi_worker").joinpath(*CLIENT_JS).read_bytes()


def create_app(config: Config, *, seconds: float = 2.0) -> Starlette:
    """The demo: `/slow?n=N` takes `seconds` and counts the primes up to N; `/` waits for it.

    `/client.js` serves the browser client the page imports.
    """
    script = client_js()  # read once per app; fails at start-up if the file is missing

    async def slow(request: Request) -> Response:
        try:
            n = int(request.query_params.get("n", "1000"))
            delay = float(request.query_params.get("seconds", seconds))
        except ValueError:
            return JSONResponse({"error": "n must be an integer, seconds a number"}, 400)
        if not (1 <= n <= MAX_N and 0 <= delay <= MAX_SECONDS):
            return JSONResponse(
                {"error": f"n must be 1..{MAX_N}, seconds 0..{MAX_SECONDS}"}, status_code=400
            )
        started = time.perf_counter()
        # Stands for a slow query or a remote call, in steps that tell the page how far
        # it got (report_progress: nothing when the app serves /slow directly).
        for step in range(PROGRESS_STEPS):
            await report_progress(
                step, PROGRESS_STEPS, f"waiting on the slow part: {step}/{PROGRESS_STEPS}"
            )
            await asyncio.sleep(delay / PROGRESS_STEPS)
        await report_progress(PROGRESS_STEPS, PROGRESS_STEPS, f"counting the primes up to {n}")
        primes = count_primes(n)
        return JSONResponse(
            {
                "n": n,
                "primes": primes,
                "took_seconds": round(time.perf_counter() - started, 3),
                "computed_at": time.strftime("%H:%M:%S"),
            }
        )

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def client(request: Request) -> Response:
        return Response(
            script,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    app = Starlette(routes=[Route("/", page), Route("/client.js", client), Route("/slow", slow)])
    # Only /slow goes through the worker; the page and the script are served directly.
    app.add_middleware(WorkerMiddleware, config=config)
    return app


def demo_config(redis_url: str | None, *, prefix: str | None = None) -> Config:
    """The demo's settings: embedded backend unless a Redis URL is given.

    `prefix`, if given, is `Config.prefix` (keys of a demo on a shared Redis apart).
    """
    config = Config(redis_url="memory://", include=("/slow",), ttl=60)
    if redis_url is not None:
        config = dataclasses.replace(config, redis_url=redis_url, inline_worker=True)
    if prefix is not None:
        config = dataclasses.replace(config, prefix=prefix)
    return config


def count_primes(limit: int) -> int:
    """How many primes are <= limit (a sieve: real work the worker does for us)."""
    if limit < 2:
        return 0
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for number in range(2, int(limit**0.5) + 1):
        if sieve[number]:
            sieve[number * number :: number] = bytes(len(range(number * number, limit + 1, number)))
    return sum(sieve)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>asgi-worker demo</title>
<link rel="icon" href="data:,">
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; }
  #status { font-weight: bold; }
  pre { background: #f4f4f4; padding: 1rem; white-space: pre-wrap; overflow-wrap: anywhere; }
  pre:empty { display: none; }
  progress { width: 100%; height: 1.2rem; }
  progress:not([value]) { visibility: hidden; }
</style>
</head>
<body>
<h1>asgi-worker demo</h1>
<p><code>/slow?n=N</code> takes seconds. The middleware answers <code>202 Accepted</code> at
once while a worker computes it; this page (with <code>fetchWhenReady</code> from
<a href="client.js"><code>client.js</code></a>) asks again until the result is stored.</p>
<form id="form">
  <label>N <input id="n" type="number" min="1" max="200000" value="1000"></label>
  <button>Count primes up to N</button>
</form>
<p id="status">idle</p>
<progress id="bar" max="1"></progress>
<p id="message"></p>
<pre id="result"></pre>
<script type="module">
import { fetchWhenReady } from "./client.js";

const form = document.getElementById("form");
const statusEl = document.getElementById("status");
const resultEl = document.getElementById("result");
const bar = document.getElementById("bar");
const messageEl = document.getElementById("message");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const url = "./slow?n=" + encodeURIComponent(document.getElementById("n").value);
  resultEl.textContent = "";
  bar.removeAttribute("value");
  messageEl.textContent = "";
  const started = Date.now();
  const seconds = () => Math.round((Date.now() - started) / 1000) + " s";
  // Shown at once: with Prefer: wait the server may hold the request instead of a 202.
  statusEl.textContent = "processing…";
  try {
    const response = await fetchWhenReady(url, {
      timeout: 60,
      wait: null,  // a 202 every Retry-After: each one moves the bar
      onPending: (attempt) => {
        statusEl.textContent = "processing… " + seconds() + " (attempt " + attempt + ")";
      },
      onProgress: (state) => {
        bar.value = state.progress ?? 0;
        const where = state.status === "queued" && state.position !== null
          ? "queued, " + state.position + " ahead" : state.status;
        const eta = state.eta_seconds === null
          ? "" : ", about " + Math.ceil(state.eta_seconds) + " s left";
        messageEl.textContent = where + eta + (state.message ? ": " + state.message : "");
      },
    });
    bar.value = 1;
    statusEl.textContent = "done (" + response.status + ", "
      + (response.headers.get("cache-status") || "") + ")";
    const text = await response.text();
    try {
      resultEl.textContent = JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      resultEl.textContent = text;  // not JSON: an error page, say
    }
  } catch (error) {
    statusEl.textContent = "failed: " + error.message;
  }
});
</script>
</body>
</html>
"""

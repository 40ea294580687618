"""`asgi-worker demo` as a real subprocess: 202 at once, then the computed 200."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from .processes import asgi_worker_command, free_port, processes

pytestmark = pytest.mark.e2e


def test_demo_serves_202_then_the_result(tmp_path: Path) -> None:
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    base = f"http://127.0.0.1:{port}"
    with processes(tmp_path, env) as group:
        demo = group.start(
            "demo", asgi_worker_command("demo", "--port", str(port), "--seconds", "0.5")
        )
        group.wait_for("demo", lambda: httpx.get(f"{base}/", timeout=1).status_code == 200)

        page = httpx.get(f"{base}/")
        assert "processing" in page.text
        assert "cache-status" not in page.headers  # the page itself is not cached

        first = httpx.get(f"{base}/slow?n=1000")
        assert first.status_code == 202
        assert first.headers["retry-after"] == "1"
        deadline = time.monotonic() + 10
        while (response := httpx.get(f"{base}/slow?n=1000")).status_code == 202:
            assert time.monotonic() < deadline, "demo still 202 after 10 s"
            time.sleep(0.1)
        assert response.status_code == 200
        assert response.headers["cache-status"] == "asgi-worker; hit"
        assert response.json()["primes"] == 168  # primes up to 1000
        assert response.json()["n"] == 1000

        output = (tmp_path / "demo.log").read_text()
        assert "memory://" in output
        assert f"{base}/" in output
    assert demo.returncode is not None  # stopped by SIGTERM, not left running

"""`asgi-worker demo` as a real subprocess: 202 at once, then the computed 200."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from .processes import demo

pytestmark = pytest.mark.e2e


def test_demo_serves_202_then_the_result(tmp_path: Path) -> None:
    with demo(tmp_path, seconds=0.5) as (base, process):
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
    assert process.returncode is not None  # stopped by SIGTERM, not left running

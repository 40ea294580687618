"""`Config.key_credentials`: per-credential entries, credentials never in Redis in clear."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_worker import Config, ConfigurationError, WorkerMiddleware
from asgi_worker.core.codec import CorruptEntryError, decode_snapshot, encode_snapshot
from asgi_worker.core.credentials import CredentialGuard
from asgi_worker.core.keys import snapshot_from_scope
from asgi_worker.testing import run_pending

from .conftest import BACKENDS
from .helpers import backend_config

SECRET = "correct horse battery staple"
TOKEN_A = "Bearer alice-9f2d1c"
TOKEN_B = "Bearer bob-77aa03"


def user_app(config: Config, runs: list[str]) -> Starlette:
    async def me(request: Request) -> Response:
        user = request.headers.get("authorization", "anonymous")
        runs.append(user)
        return JSONResponse({"user": user, "cookie": request.headers.get("cookie")})

    app = Starlette(routes=[Route("/me", me)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


async def everything_in_redis(redis: Redis, prefix: str) -> bytes:
    """Every key name and value under our prefix and in our arq jobs, concatenated."""
    blob = b""
    for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
        async for key in redis.scan_iter(match=pattern, count=1000):
            blob += key
            kind = (await redis.type(key)).decode()
            if kind == "string":
                blob += await redis.get(key) or b""
            elif kind == "hash":
                blob += b"".join(b"".join(pair) for pair in (await redis.hgetall(key)).items())
            elif kind == "set":
                blob += b"".join(await redis.smembers(key))
            elif kind == "zset":
                blob += b"".join(await redis.zrange(key, 0, -1))
    return blob


@pytest.mark.parametrize("kind", BACKENDS)
async def test_each_credential_gets_its_own_entry(kind: str, config: Config, redis: Redis) -> None:
    keyed = backend_config(kind, config, key_credentials=True, secret=SECRET)
    runs: list[str] = []
    app = user_app(keyed, runs)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for token in (TOKEN_A, TOKEN_B):
            assert (await http.get("/me", headers={"authorization": token})).status_code == 202
        if kind == "arq":  # queued jobs rest in Redis: the tokens must not be readable there
            before = await everything_in_redis(redis, config.prefix)
            assert b"alice" not in before
            assert b"bob" not in before
        await run_pending(app)
        alice = await http.get("/me", headers={"authorization": TOKEN_A})
        bob = await http.get("/me", headers={"authorization": TOKEN_B})
        again = await http.get("/me", headers={"authorization": TOKEN_A})
        anonymous = await http.get("/me")
    assert alice.json() == {"user": TOKEN_A, "cookie": None}
    assert bob.json() == {"user": TOKEN_B, "cookie": None}
    assert again.json() == alice.json()
    assert again.headers["cache-status"] == "asgi-worker; hit"
    assert anonymous.status_code == 202  # its own entry, not alice's
    assert sorted(runs) == sorted([TOKEN_A, TOKEN_B])
    if kind != "memory":
        stored = await everything_in_redis(redis, config.prefix)
        assert b"alice-9f2d1c" in stored  # the response body names the user: stored, keyed
        names = b"".join([key async for key in redis.scan_iter(match=f"{config.prefix}*")])
        assert b"alice" not in names
        assert b"bob" not in names


def test_key_credentials_needs_a_secret() -> None:
    with pytest.raises(ConfigurationError, match=r"Config\.secret"):
        Config(key_credentials=True)
    with pytest.raises(ConfigurationError, match=r"Config\.secret"):
        Config(key_credentials=True, secret="short")
    assert "correct horse" not in repr(Config(key_credentials=True, secret=SECRET))


def scope(authorization: bytes) -> dict[str, object]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/me",
        "query_string": b"",
        "headers": [(b"host", b"t"), (b"authorization", authorization)],
    }


def test_the_key_depends_on_the_secret_and_the_credential() -> None:
    guard = CredentialGuard(SECRET)
    other = CredentialGuard("another secret, just as long")
    a = snapshot_from_scope(scope(b"Bearer a"), (), guard)
    assert a.digest == snapshot_from_scope(scope(b"Bearer a"), (), guard).digest
    assert a.digest != snapshot_from_scope(scope(b"Bearer b"), (), guard).digest
    assert a.digest != snapshot_from_scope(scope(b"Bearer a"), (), other).digest
    assert b"Bearer a" not in a.credential_id


def test_sealed_credentials_open_only_with_the_same_secret() -> None:
    snapshot = snapshot_from_scope(scope(b"Bearer a"), (), CredentialGuard(SECRET))
    data = encode_snapshot(snapshot, CredentialGuard(SECRET))
    assert b"Bearer a" not in data
    assert decode_snapshot(data, CredentialGuard(SECRET)) == snapshot
    with pytest.raises(CorruptEntryError, match="do not open"):
        decode_snapshot(data, CredentialGuard("another secret, just as long"))
    with pytest.raises(CorruptEntryError, match="no secret"):
        decode_snapshot(data)
    with pytest.raises(ValueError, match="only encoded sealed"):
        encode_snapshot(snapshot)


def test_without_key_credentials_credentials_are_not_taken() -> None:
    snapshot = snapshot_from_scope(scope(b"Bearer a"), ())
    assert snapshot.credentials == ()
    assert snapshot == dataclasses.replace(snapshot, credential_id=b"")

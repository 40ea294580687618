"""The cache on a Redis Cluster of 3 masters: configuration, spread, stats, events.

The behaviour, freshness, waiting and near-cache suites run on the Cluster too (their
`cluster` parametrisation); this module holds what only a Cluster has.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import httpx
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from asgi_worker import Config
from asgi_worker.backends.redis.clients import close_client, store_client
from asgi_worker.core.config import ConfigurationError
from asgi_worker.core.keys import RedisKeys
from asgi_worker.core.redis_urls import TLSOptions, display_url, parse_cluster_url
from asgi_worker.invalidation import Invalidator
from asgi_worker.observability.stats import collect_stats

from .apps import make_app
from .conftest import REDIS_URL, backend
from .helpers import serve
from .own_cluster import OwnCluster, cluster_listener

# Every test here needs the module's Cluster: `config` puts the store on it.
kind = pytest.fixture(params=["cluster"], name="kind")(backend)
pytestmark = pytest.mark.usefixtures("kind")


def test_a_cluster_url_without_a_queue_redis_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="queue_redis_url is required") as error:
        Config(redis_url="redis+cluster://127.0.0.1:7000/")
    assert error.value.field == "queue_redis_url"
    # In-process jobs need no queue; a plain queue Redis is what arq needs.
    assert Config(redis_url="redis+cluster://h:7000/", inline_worker=True).inline_worker
    Config(redis_url="redis+cluster://h:7000/", queue_redis_url="redis://q:6379/0")


@pytest.mark.parametrize(
    ("field", "url", "problem"),
    [
        ("queue_redis_url", "redis+cluster://h:7000/", "must not be a Redis Cluster"),
        ("redis_url", "redis+cluster://h:7000/3", "only database 0"),
        ("redis_url", "redis+cluster://h:notaport/", "bad node port"),
        ("redis_url", "redis+cluster://h:7000,/", "no empty one"),
        ("redis_url", "redis+cluster://h:7000/?x=1", "unknown query parameter 'x'"),
        ("redis_url", "redis+cluster://h:7000/#x", "has a #fragment"),
        ("redis_url", "redis+cluster://h:7000/?ssl_ca_certs=/ca", r"use rediss\+cluster://"),
        ("redis_url", "rediss+cluster://h:7000/?ssl_cert_reqs=no", "it takes required"),
    ],
)
def test_a_malformed_cluster_url_names_the_field(field: str, url: str, problem: str) -> None:
    values = {"redis_url": "redis+cluster://h:7000/", "queue_redis_url": "redis://q/0"}
    values[field] = url
    with pytest.raises(ConfigurationError, match=problem) as error:
        Config(**values)
    assert error.value.field == field


def test_a_cluster_url_is_taken_apart_and_its_password_masked() -> None:
    url = "rediss+cluster://user:s%40cret@a:7000,b,[::1]:7002/"
    target = parse_cluster_url(url)
    assert target.nodes == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == ("user", "s@cret", True)
    assert "s%40cret" not in display_url(url)
    assert "***" in display_url(url)
    assert target.tls == TLSOptions()
    assert parse_cluster_url("redis+cluster://a/").tls is None
    secure = parse_cluster_url(
        "rediss+cluster://a:7000/?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    )
    assert secure.tls == TLSOptions(ca_certs="/ca.pem", certfile="/c.pem", keyfile="/k.pem")


async def test_requests_spread_over_every_master_and_invalidate_across_them(
    config: Config, cluster: OwnCluster
) -> None:
    calls: Counter[str] = Counter()
    app = make_app(dataclasses.replace(config, include=("*",)), calls)
    urls = [f"/echo?n={n}" for n in range(3)] + ["/stream", "/boom"]
    async with serve(app, worker=config) as http:
        for url in urls:
            assert (await http.get(url)).status_code == 202
        await wait_for_all(http, urls)
        # One path's keys live in one slot: /echo's and /boom's on the first master,
        # /stream's on the third (their hash tags fix the slots, `cluster create` splits
        # them evenly). A script touching two slots would have failed above.
        assert masters_holding(cluster, config.prefix) == 2
        invalidate = Invalidator.for_app(app)
        assert await invalidate.tag("nothing-tagged") == 0
        assert await invalidate.query("/echo", {"n": "1"}) == 1
        assert await invalidate.glob("/[sb]*") == 2  # /stream and /boom, two slots
        assert await invalidate.prefix("/echo", soft=True) == 2
        assert (await http.get("/echo?n=0")).headers["cache-status"].endswith("fwd=stale")
        assert (await http.get("/stream")).status_code == 202


async def wait_for_all(http: httpx.AsyncClient, urls: list[str], within: float = 10.0) -> None:
    """Poll every URL until it is a hit (a worker runs meanwhile)."""
    async with asyncio.timeout(within):
        for url in urls:
            while (await http.get(url)).status_code == 202:  # noqa: ASYNC110 (HTTP polling)
                await asyncio.sleep(0.02)


def masters_holding(cluster: OwnCluster, prefix: str) -> int:
    """How many masters hold keys of `prefix`."""
    holding = 0
    for node in cluster.nodes:
        client = node.client()
        try:
            role = client.execute_command("ROLE")[0]
            if role == b"master" and any(client.scan_iter(match=f"{prefix}:*", count=1000)):
                holding += 1
        except redis.RedisError:
            continue
        finally:
            client.close()
    return holding


async def test_stats_count_across_every_master(config: Config) -> None:
    app = make_app(config)
    paths = [f"/echo?n={n}" for n in range(6)]
    async with serve(app, worker=config) as http:
        for url in paths:
            await http.get(url)
        await wait_for_all(http, paths)
    store = store_client(config.redis_url, config)
    queue = store_client(REDIS_URL, config)
    try:
        assert isinstance(store, RedisCluster)
        assert not isinstance(queue, RedisCluster)
        stats = await collect_stats(config, store, queue)
    finally:
        await close_client(store)
        await close_client(queue)
    assert (stats.stored, stats.fresh, stats.claims, stats.paths) == (6, 6, 0, 1)
    assert [path for path, _ in stats.slowest] == ["/echo"]
    # What `asgi-worker invalidate` opens: its own Cluster client.
    async with Invalidator.connect(config) as invalidate:
        assert await invalidate.path("/echo", soft=True) == 6


async def test_events_published_on_any_master_reach_one_subscription(config: Config) -> None:
    channel = RedisKeys(config.prefix).events()
    async with cluster_listener(config, expected=3) as (_, heard, cluster):
        for node in cluster.get_primaries():
            await cluster.execute_command("PUBLISH", channel, str(node.port), target_nodes=node)
        await asyncio.wait_for(heard.all.wait(), 2)
        assert sorted(heard.events) == sorted(str(node.port) for node in cluster.get_primaries())

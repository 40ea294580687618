"""The Cluster changing under load: slots resharded, a master failed over, a node lost.

One cluster of 3 masters and 3 replicas for the module (node timeout 1 s). Each test runs
the web app and a real arq worker in this event loop while clients poll their URLs, and
changes the topology meanwhile. The tests run in file order: the last two kill nodes (the
crash needs a master whose replica still runs, so it comes first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import redis
from redis.crc import key_slot

from asgi_worker import Config
from asgi_worker.backends.redis.clients import close_client, store_client
from asgi_worker.core.keys import RedisKeys, path_tag

from .apps import make_app
from .conftest import REDIS_URL
from .helpers import serve
from .own_cluster import ClusterNode, OwnCluster, cluster_listener, own_cluster

LEASE = 4.0  # claim lease: no URL may stay at 202 longer than this (plus a poll)
URLS = [f"/echo?n={n}" for n in range(40)] + ["/stream", "/boom"]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    with own_cluster(tmp_path_factory.mktemp("replicated"), replicas=1) as started:
        yield started


@pytest.fixture
def on_cluster(config: Config, replicated: OwnCluster) -> Config:
    return dataclasses.replace(
        config,
        redis_url=replicated.url,
        queue_redis_url=REDIS_URL,
        job_timeout=2,
        claim_ttl=LEASE,
        redis_timeout=1,
        # 42 URLs of 3 paths at once: with a lease this short, fair queueing would refuse
        # most of /echo's jobs (503 queue-full), which is not what is tested here.
        fair_queueing=False,
    )


@dataclasses.dataclass
class Load:
    """Clients polling every URL until it is a hit, then reading it again, until stopped."""

    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    unavailable: Counter[str] = dataclasses.field(default_factory=Counter)
    first_hit: dict[str, float] = dataclasses.field(default_factory=dict)
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def poll(self, http: httpx.AsyncClient, url: str, began: float) -> None:
        while not self.stop.is_set():
            response = await http.get(url)
            status = response.status_code
            self.statuses[status] += 1
            if status == 503:
                self.unavailable[response.headers.get("cache-status", "")] += 1
            if status != 202 and url not in self.first_hit:
                self.first_hit[url] = time.monotonic() - began
            await asyncio.sleep(0.02)


@asynccontextmanager
async def loaded(config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, Load]]:
    load = Load()
    async with serve(make_app(config), worker=config) as http:
        began = time.monotonic()
        tasks = [asyncio.create_task(load.poll(http, url, began)) for url in URLS]
        try:
            yield http, load
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)


def master_of(cluster: OwnCluster, slot: int) -> ClusterNode:
    """The running node that serves `slot` as master now."""
    for node in cluster.nodes:
        if node.process is None:
            continue
        client = node.client()
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in cluster.nodes if n.port == port)
        except redis.RedisError:
            continue
        finally:
            client.close()
    raise AssertionError(f"no master serves slot {slot}")


def node_id(node: ClusterNode) -> str:
    client = node.client()
    try:
        return str(client.execute_command("CLUSTER MYID").decode())
    finally:
        client.close()


def slot_of(path: str) -> int:
    return int(key_slot(("{" + path_tag(path) + "}").encode()))


async def assert_every_url_served(load: Load, within: float) -> None:
    """Every URL got its hit, none later than its lease after the load began (+ a poll)."""
    deadline = time.monotonic() + within
    while len(load.first_hit) < len(URLS):
        assert time.monotonic() < deadline, sorted(set(URLS) - set(load.first_hit))
        await asyncio.sleep(0.05)


async def stored_entries(config: Config) -> int:
    client = store_client(config.redis_url, config)
    try:
        keys = RedisKeys(config.prefix)
        return sum(
            [
                1
                async for key in client.scan_iter(match=keys.requests_pattern())
                if key.endswith(b":resp")
            ]
        )
    finally:
        await close_client(client)


async def test_resharding_under_load_loses_nothing(
    on_cluster: Config, replicated: OwnCluster
) -> None:
    # /echo's slot moves from its master to another while clients poll and jobs commit:
    # redis-py follows MOVED and ASK, and nothing stored is lost.
    source = master_of(replicated, slot_of("/echo"))
    target = master_of(replicated, slot_of("/stream"))
    assert source is not target
    async with loaded(on_cluster) as (_, load):
        await asyncio.sleep(0.3)  # jobs are running and committing
        await asyncio.to_thread(
            replicated.cli,
            "reshard",
            "--cluster-from",
            node_id(source),
            "--cluster-to",
            node_id(target),
            "--cluster-slots",
            "3000",
            "--cluster-yes",
        )
        assert master_of(replicated, slot_of("/echo")) is target
        await assert_every_url_served(load, within=LEASE + 2)
        await asyncio.sleep(0.3)  # hits go on after the move
    assert load.statuses[503] == 0, (load.statuses, load.unavailable)
    assert max(load.first_hit.values()) < LEASE + 1
    assert await stored_entries(on_cluster) == len(URLS)


async def test_a_manual_failover_under_load_loses_nothing(
    on_cluster: Config, replicated: OwnCluster
) -> None:
    # CLUSTER FAILOVER on the replica of /echo's master: the replica waits until it has
    # every write, then takes over; the client re-reads the slot map on the MOVED.
    master = master_of(replicated, slot_of("/echo"))
    async with loaded(on_cluster) as (_, load):
        await asyncio.sleep(0.3)
        replica = replica_of(replicated, master)
        client = replica.client()
        try:
            client.execute_command("CLUSTER FAILOVER")
        finally:
            client.close()
        await wait_for(lambda: master_of(replicated, slot_of("/echo")) is replica, within=5)
        await assert_every_url_served(load, within=LEASE + 2)
        await asyncio.sleep(0.3)
    assert load.statuses[503] <= len(URLS), (
        load.statuses,
        load.unavailable,
    )  # at most one per URL, at the switch
    assert await stored_entries(on_cluster) == len(URLS)


async def test_a_master_crash_is_503_only_until_its_replica_takes_over(
    on_cluster: Config, replicated: OwnCluster
) -> None:
    await asyncio.to_thread(replicated.wait_settled)  # after the last test's failover
    app = make_app(on_cluster)
    async with serve(app, worker=on_cluster) as http:
        assert (await http.get("/stream")).status_code == 202
        await wait_for_hit(http, "/stream", within=5)
        master_of(replicated, slot_of("/stream")).kill()
        began = time.monotonic()
        down = await http.get("/stream")
        assert down.status_code in (200, 503)  # 503 while no node serves the slot
        assert time.monotonic() - began < on_cluster.redis_timeout * 3  # never a hang
        # The replica is promoted after the node timeout (1 s): served again, from it.
        await wait_for_hit(http, "/stream", within=8)


async def test_the_event_listener_moves_to_another_node_when_its_node_dies(
    on_cluster: Config, replicated: OwnCluster
) -> None:
    channel = RedisKeys(on_cluster.prefix).events()
    async with cluster_listener(on_cluster, expected=1) as (listener, heard, _):
        listening = subscribed_node(replicated, channel)
        listening.kill()
        await wait_for(lambda: not listener.subscribed, within=3)
        await listener.ready(5.0)  # on the next node
        assert subscribed_node(replicated, channel) is not listening
        live = next(node for node in replicated.nodes if node.process is not None)
        client = live.client()
        try:
            client.publish(channel, "after")
        finally:
            client.close()
        await asyncio.wait_for(heard.all.wait(), 2)
        assert heard.events == ["after"]


def replica_of(cluster: OwnCluster, master: ClusterNode) -> ClusterNode:
    master_id = node_id(master)
    for node in cluster.nodes:
        if node.process is None or node is master:
            continue
        client = node.client()
        try:
            role = client.execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == master.port:
                return node
        finally:
            client.close()
    raise AssertionError(f"no replica of {master_id}")


def subscribed_node(cluster: OwnCluster, channel: str) -> ClusterNode:
    """The node that holds the subscription to `channel` (PUBSUB CHANNELS is per node)."""
    for node in cluster.nodes:
        if node.process is None:
            continue
        client = node.client()
        try:
            if channel.encode() in client.pubsub_channels():
                return node
        finally:
            client.close()
    raise AssertionError(f"no node holds a subscription to {channel}")


async def wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def wait_for_hit(http: httpx.AsyncClient, url: str, within: float) -> None:
    deadline = time.monotonic() + within
    while (await http.get(url)).status_code != 200:
        assert time.monotonic() < deadline, f"{url} not served again within {within} s"
        await asyncio.sleep(0.05)

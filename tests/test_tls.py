"""TLS for real: `rediss+sentinel://` and `rediss+cluster://` URLs with a private CA, on
servers of the test's own that speak TLS only, with certificates made here (trustme).

What must hold (docs/sentinel.md and docs/cluster.md, "TLS"):

- through three Sentinels and a master that want a client certificate
  (`tls-auth-clients yes`), a cold URL is a 202, a worker stores it, and it is a 200;
- the same after `SENTINEL FAILOVER`: the failover listener hears the Sentinels over
  TLS, and the web process and the worker write to the new master;
- a CA that did not sign the servers' certificates is a clear error at once (the web
  process answers 503 and logs the SSL reason, the worker refuses to start), not a hang;
  `ssl_cert_reqs=none` connects without any CA;
- no client certificate is refused; with one, served;
- on a TLS-only Cluster of 3 masters (`tls-cluster yes`), with the queue on a TLS Redis,
  a cold URL becomes a 200, and the commit's event is heard on a node over TLS.

The servers are this test's own, on free loopback ports, stopped by PID. A redis-server
built without TLS fails these tests (its TLS servers never start); nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from asgi_worker import Config
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.outage import RedisUnreachable
from asgi_worker.worker.settings import worker_settings

from .helpers import build_app, digest_of, response_key, serve
from .own_cluster import OwnCluster, cluster_listener, own_cluster
from .own_redis import OwnRedis, ServerTLS, own_redis
from .own_sentinel import Topology, own_sentinel

pytestmark = pytest.mark.e2e

REDIS_TIMEOUT = 2.0
SWITCHED = "Sentinel switched 'mymaster'"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    """One CA for the module's servers, which want a client certificate of it."""
    return ServerTLS.make(tmp_path_factory.mktemp("certificates"), auth_clients=True)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, tls: ServerTLS) -> Iterator[Topology]:
    with own_sentinel(tmp_path_factory.mktemp("tls-sentinel"), tls=tls) as started:
        yield started


@pytest.fixture
def healthy(topology: Topology) -> Topology:
    """The module's topology, healed from whatever the previous test did to it."""
    topology.wait_healthy()
    return topology


@pytest.fixture
def wrong_ca(tmp_path: Path) -> Path:
    """A CA file of another CA than the one that signed the servers' certificates."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def _config(url: str, prefix: str) -> Config:
    return Config(redis_url=url, prefix=prefix, redis_timeout=REDIS_TIMEOUT, retry_after=1)


async def _served(http: httpx.AsyncClient, url: str, within: float = 10.0) -> None:
    """Poll `url` until it is a 200; anything but a 202 before that fails the test."""
    async with asyncio.timeout(within):
        while (status := (await http.get(url)).status_code) == 202:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert status == 200, status


async def _refused(
    config: Config, caplog: pytest.LogCaptureFixture, reason: str
) -> tuple[int, float]:
    """A GET through `config`'s URL: its status and how long it took; `reason` logged."""
    caplog.clear()
    async with serve(build_app(config)) as http:
        started = time.monotonic()
        status = (await http.get("/echo?n=refused")).status_code
        waited = time.monotonic() - started
    assert "asgi-worker: cache backend unavailable: " in caplog.text, caplog.text
    assert reason in caplog.text, caplog.text
    return status, waited


def test_the_sentinels_and_nodes_speak_tls_only(healthy: Topology) -> None:
    # What the tests below prove holds for TLS: no process answers plain text.
    assert healthy.url.startswith("rediss+sentinel://")
    for process in (*healthy.nodes, *healthy.sentinels):
        plain = redis.Redis(port=process.port, socket_timeout=1, socket_connect_timeout=1)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()


async def test_a_cold_url_becomes_a_200_through_sentinels_over_tls(
    healthy: Topology, tls: ServerTLS, prefix: str
) -> None:
    # The certificate names 127.0.0.1, the address the Sentinels give: hostnames check.
    config = _config(healthy.url_with(tls.query(ssl_check_hostname="true")), prefix)
    app = build_app(config)
    async with serve(app, worker=config) as http:
        assert (await http.get("/echo?n=1")).status_code == 202
        await _served(http, "/echo?n=1")


async def test_after_a_failover_the_clients_follow_the_new_master_over_tls(
    healthy: Topology, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_worker")
    config = _config(healthy.url, prefix)
    app = build_app(config)
    async with serve(app, worker=config) as http:
        assert (await http.get("/echo?n=before")).status_code == 202
        await _served(http, "/echo?n=before")
        old = await asyncio.to_thread(healthy.failover)
        new = await asyncio.to_thread(healthy.wait_switched, old)
        # The web process's and the worker's failover listeners heard it from the
        # Sentinels, over TLS with the client certificate, and dropped their pools.
        async with asyncio.timeout(10):
            while caplog.text.count(SWITCHED) < 2:  # noqa: ASYNC110 (log polling)
                await asyncio.sleep(0.05)
        assert (await http.get("/echo?n=after")).status_code == 202
        await _served(http, "/echo?n=after")
    # Written to the new master, not to the old one (which takes writes until Sentinel
    # turns it into a replica).
    key = response_key(config, await digest_of(config, "/echo?n=after"))
    with new.client() as client:
        assert client.exists(key) == 1
    assert new.address != old


async def test_a_wrong_ca_is_a_clear_error_at_once_not_a_hang(
    healthy: Topology, tls: ServerTLS, prefix: str, wrong_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(healthy.url_with(tls.query(ssl_ca_certs=str(wrong_ca))), prefix)
    status, waited = await _refused(config, caplog, "CERTIFICATE_VERIFY_FAILED")
    assert status == 503
    assert waited < REDIS_TIMEOUT / 2  # refused by the handshake, not timed out
    # The worker refuses to start, saying why (`asgi-worker worker` exits 69 on it).
    worker = ReplayWorker(**worker_settings(build_app(config), config), handle_signals=False)
    try:
        with pytest.raises(RedisUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await worker.main()
    finally:
        await worker.close()


async def test_ssl_cert_reqs_none_connects_without_a_ca(
    healthy: Topology, tls: ServerTLS, prefix: str
) -> None:
    # No CA: the system's CAs do not know this one, and nothing is verified.
    config = _config(healthy.url_with(tls.query(ca=False, ssl_cert_reqs="none")), prefix)
    async with serve(build_app(config), worker=config) as http:
        assert (await http.get("/echo?n=unverified")).status_code == 202
        await _served(http, "/echo?n=unverified")


async def test_a_client_certificate_is_needed_and_enough(
    healthy: Topology, tls: ServerTLS, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    without = _config(healthy.url_with(tls.query(client_cert=False)), prefix)
    status, waited = await _refused(without, caplog, "MasterNotFoundError(")
    assert status == 503
    assert waited < REDIS_TIMEOUT / 2
    with_certificate = _config(healthy.url_with(tls.query()), prefix)
    async with serve(build_app(with_certificate), worker=with_certificate) as http:
        assert (await http.get("/echo?n=client-cert")).status_code == 202
        await _served(http, "/echo?n=client-cert")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, tls: ServerTLS) -> Iterator[OwnCluster]:
    with own_cluster(tmp_path_factory.mktemp("tls-cluster"), tls=tls) as started:
        yield started


@pytest.fixture(scope="module")
def tls_queue(tmp_path_factory: pytest.TempPathFactory, tls: ServerTLS) -> Iterator[OwnRedis]:
    """The Cluster's queue Redis: a plain `rediss://` URL, whose TLS redis-py reads itself."""
    with own_redis(tmp_path_factory.mktemp("tls-queue"), tls=tls) as started:
        yield started


async def test_a_cold_url_becomes_a_200_on_a_tls_cluster(
    tls_cluster: OwnCluster, tls_queue: OwnRedis, prefix: str
) -> None:
    assert tls_cluster.url.startswith("rediss+cluster://")
    assert tls_queue.url.startswith("rediss://")
    config = Config(
        redis_url=tls_cluster.url,
        queue_redis_url=tls_queue.url,
        prefix=prefix,
        redis_timeout=REDIS_TIMEOUT,
    )
    app = build_app(config)
    async with (
        # The web process's event subscription, on one node (`NodeSubscriber`).
        cluster_listener(config, expected=1) as (_, heard, _),
        serve(app, worker=config) as http,
    ):
        assert (await http.get("/echo?n=cluster")).status_code == 202
        await _served(http, "/echo?n=cluster")
        async with asyncio.timeout(5):
            await heard.all.wait()  # the commit's event

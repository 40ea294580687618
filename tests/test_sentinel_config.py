"""`redis+sentinel://` URLs: what the config accepts and refuses, what it shows, and the
client, pool and master discovery they give (no Sentinel needed; tests/test_sentinel.py
runs the real thing)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.sentinel import MasterNotFoundError, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from asgi_worker import Config, ConfigurationError
from asgi_worker.backends.redis.clients import (
    BufferCheckingPool,
    NewestSentinel,
    SentinelPool,
    redis_client,
)
from asgi_worker.backends.redis.sentinel import FailoverWatch
from asgi_worker.core.redis_urls import SentinelURL, TLSOptions, display_url, parse_sentinel_url
from asgi_worker.worker.settings import _redis_settings, worker_settings

from .helpers import build_app


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://h1:26379,h2:26380/mymaster/0",
            SentinelURL(sentinels=(("h1", 26379), ("h2", 26380)), master="mymaster"),
        ),
        (
            "redis+sentinel://h1/mymaster",  # port and db by default
            SentinelURL(sentinels=(("h1", 26379),), master="mymaster"),
        ),
        (
            "rediss+sentinel://u:p%40ss@h1:1,[::1]:2,[fe80::1]/cache/3"
            "?sentinel_password=s%26p&sentinel_username=watcher",
            SentinelURL(
                sentinels=(("h1", 1), ("::1", 2), ("fe80::1", 26379)),
                master="cache",
                db=3,
                username="u",
                password="p@ss",
                sentinel_username="watcher",
                sentinel_password="s&p",
                tls=TLSOptions(),
            ),
        ),
        (
            "rediss+sentinel://h1/m?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem"
            "&ssl_keyfile=/k.pem&ssl_cert_reqs=Optional&ssl_check_hostname=yes"
            "&sentinel_password=spw",
            SentinelURL(
                sentinels=(("h1", 26379),),
                master="m",
                sentinel_password="spw",
                tls=TLSOptions(
                    ca_certs="/etc/ca.pem",
                    certfile="/c.pem",
                    keyfile="/k.pem",
                    cert_reqs="optional",
                    check_hostname=True,
                ),
            ),
        ),
        (
            "rediss+sentinel://h1/m?ssl_cert_reqs=none&ssl_check_hostname=false",
            SentinelURL(sentinels=(("h1", 26379),), master="m", tls=TLSOptions(cert_reqs="none")),
        ),
        (
            "REDIS+SENTINEL://:only-password@h/m/1",
            SentinelURL(sentinels=(("h", 26379),), master="m", db=1, password="only-password"),
        ),
    ],
)
def test_sentinel_urls_are_taken_apart(url: str, parsed: SentinelURL) -> None:
    assert parse_sentinel_url(url) == parsed
    for field in ("redis_url", "queue_redis_url"):
        assert getattr(Config(**{field: url}), field) == url  # accepted as given


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "needs the master's name after the hosts"),
        ("redis+sentinel://h1:26379/", "needs the master's name after the hosts"),
        ("redis+sentinel://h1:26379/m/zero", "path must be /<master name> or"),
        ("redis+sentinel://h1:26379/m/0/extra", "path must be /<master name> or"),
        ("redis+sentinel://h1:26379,,h2/m", "with no empty one"),
        ("redis+sentinel:///m", "with no empty one"),
        ("redis+sentinel://h1:port/m", "bad Sentinel port 'port'"),
        ("redis+sentinel://h1:70000/m", "bad Sentinel port '70000'"),
        ("redis+sentinel://[::1/m", "malformed IPv6 Sentinel address"),
        ("redis+sentinel://h1/m?db=2", "unknown query parameter 'db'"),
        ("redis+sentinel://h1/m#x", "has a #fragment"),
        (
            "redis+sentinel://h1/m?ssl_ca_certs=/ca.pem",
            "has 'ssl_ca_certs', a TLS parameter, but redis+sentinel:// is not TLS "
            "(use rediss+sentinel://)",
        ),
        ("rediss+sentinel://h1/m?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe'; it takes required"),
        ("rediss+sentinel://h1/m?ssl_check_hostname=sure", "it takes true or false"),
        ("rediss+sentinel://h1/m?ssl_ca_certs=", "has an empty 'ssl_ca_certs'"),
        ("rediss+sentinel://h1/m?ssl_certfile=/c.pem", "only one of ssl_certfile and"),
        ("rediss+sentinel://h1/m?ssl_keyfile=/k.pem", "only one of ssl_certfile and"),
        (
            "rediss+sentinel://h1/m?ssl_cert_reqs=none&ssl_check_hostname=1",
            "ssl_check_hostname=true with ssl_cert_reqs=none",
        ),
        ("rediss+sentinel://h1/m?ssl_ca_cert=/ca.pem", "unknown query parameter 'ssl_ca_cert'"),
    ],
)
def test_malformed_sentinel_urls_are_refused_saying_why(url: str, says: str) -> None:
    for field in ("redis_url", "queue_redis_url"):
        with pytest.raises(ConfigurationError) as raised:
            Config(**{field: url})
        assert raised.value.field == field
        message = str(raised.value)
        assert message.startswith(f"Config.{field} ")
        assert says in message
        assert "redis+sentinel://[user:password@]host1:26379,host2:26379/mymaster" in message


def test_refusals_never_show_a_password() -> None:
    for url in (
        "redis+sentinel://u:hunter22@h1:bad/m",
        "redis+sentinel://h1/m?sentinel_password=hunter22&nope=1",
        "redis+sentinel://:hunter22@h1/m?sentinel_password=hunter22&ssl_ca_certs=/ca",
        "rediss+sentinel://:hunter22@h1/m?sentinel_password=hunter22&ssl_cert_reqs=x",
        "amqp://u:hunter22@h/0",
    ):
        with pytest.raises(ConfigurationError) as raised:
            Config(redis_url=url)
        assert "hunter22" not in str(raised.value)


def test_other_schemes_are_refused_naming_the_sentinel_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"redis\+sentinel:// or rediss\+sentinel://"):
        Config(redis_url="sentinel://h/m")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+sentinel://u:pw@h1:26379,h2:26380/mymaster/0",
            "redis+sentinel://u:***@h1:26379,h2:26380/mymaster/0",
        ),
        (
            "redis+sentinel://h1/m?sentinel_password=pw&sentinel_username=s",
            "redis+sentinel://h1/m?sentinel_password=***&sentinel_username=s",
        ),
        ("unix:///run/redis.sock?password=pw&db=1", "unix:///run/redis.sock?password=***&db=1"),
        ("redis+sentinel://h1,h2/m", "redis+sentinel://h1,h2/m"),
        ("redis://[::1/0", "<unparsable URL>"),
    ],
)
def test_display_url_masks_sentinel_passwords(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_repr_masks_the_sentinel_password() -> None:
    shown = repr(Config(redis_url="redis+sentinel://:a1@h/m?sentinel_password=b2"))
    assert "a1" not in shown
    assert "b2" not in shown


async def test_a_sentinel_url_gives_a_checking_pool_on_the_master_with_our_settings() -> None:
    url = (
        "rediss+sentinel://u:pw@h1:26379,h2:26380/mymaster/2?sentinel_password=spw"
        "&ssl_ca_certs=/ca.pem"
    )
    config = Config(redis_url=url, redis_timeout=1.5)
    client = redis_client(url, config, read_timeout=False)
    pool = client.connection_pool
    try:
        assert isinstance(pool, SentinelPool)
        assert isinstance(pool, BufferCheckingPool)  # the same pre-command check
        assert (
            pool.shown_url
            == "rediss+sentinel://u:***@h1:26379,h2:26380/mymaster/2?sentinel_password=***"
            "&ssl_ca_certs=/ca.pem"
        )
        assert pool.service_name == "mymaster"
        assert pool.is_master
        assert pool.connection_class is SentinelManagedSSLConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (2, "u", "pw")
        assert kwargs["socket_timeout"] is None
        assert kwargs["socket_connect_timeout"] == 1.5
        retry = kwargs["retry"]
        assert isinstance(retry._backoff, NoBackoff)
        assert retry._retries == 1
        assert kwargs["retry_on_error"] == [RedisConnectionError]
        manager = pool.sentinel_manager
        assert isinstance(manager, NewestSentinel)
        addresses = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ]
        assert addresses == [("h1", 26379), ("h2", 26380)]
        sentinel_kwargs = manager.sentinels[0].connection_pool.connection_kwargs
        assert sentinel_kwargs["password"] == "spw"  # the Sentinels' own, not the master's
        assert sentinel_kwargs["socket_timeout"] == 1.5
        # TLS as the URL says, to the master and to the Sentinels alike.
        for tls in (kwargs, sentinel_kwargs):
            assert (tls["ssl_ca_certs"], tls["ssl_cert_reqs"]) == ("/ca.pem", "required")
    finally:
        await client.aclose(close_connection_pool=True)


def test_the_worker_builds_arqs_pool_itself_with_retries_on_sentinel() -> None:
    url = "redis+sentinel://h1:26379,h2:26380/mymaster/1"
    config = Config(redis_url=url, prefix="p")
    settings = worker_settings(build_app(config), config)
    pool = settings["redis_pool"].connection_pool
    assert isinstance(pool, SentinelPool)  # not arq's create_pool, which drops both:
    assert pool.connection_kwargs["retry"]._retries == 4
    assert pool.connection_kwargs["socket_connect_timeout"] == config.redis_timeout
    # What `arq --check` builds from the same settings points at the same Sentinels.
    arq_settings = _redis_settings(config)
    assert arq_settings.sentinel is True
    assert arq_settings.host == [("h1", 26379), ("h2", 26380)]
    assert (arq_settings.sentinel_master, arq_settings.database) == ("mymaster", 1)
    assert arq_settings.ssl is False
    secure = Config(redis_url="rediss+sentinel://h1/m?ssl_ca_certs=/ca.pem", prefix="p")
    assert (_redis_settings(secure).ssl, _redis_settings(secure).ssl_ca_certs) == (True, "/ca.pem")


def test_a_watch_is_only_made_for_sentinel_pools() -> None:
    plain = redis_client("redis://h/0", Config())
    on_sentinel = redis_client("redis+sentinel://h/m", Config())
    assert FailoverWatch.for_pools(plain.connection_pool, connect_timeout=1) is None
    watch = FailoverWatch.for_pools(
        plain.connection_pool, on_sentinel.connection_pool, connect_timeout=1
    )
    assert watch is not None
    assert not watch.running


class _FakeSentinel:
    """What `SENTINEL MASTER` / `SENTINEL REPLICAS` answer on one Sentinel."""

    def __init__(
        self,
        master: dict[str, Any] | Exception,
        replicas: list[dict[str, Any]] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.master = master
        self.replicas = replicas or []
        self.delay = delay

    async def sentinel_master(self, name: str) -> dict[str, Any]:
        await asyncio.sleep(self.delay)
        if isinstance(self.master, Exception):
            raise self.master
        return self.master

    async def sentinel_slaves(self, name: str) -> list[dict[str, Any]]:
        return self.replicas


def _master(port: int, epoch: int, flags: str = "master", **more: Any) -> dict[str, Any]:
    return {
        "ip": "10.0.0.1",
        "port": port,
        "config-epoch": epoch,
        "flags": flags,
        "is_master": "master" in flags.split(","),
        "is_sdown": "s_down" in flags.split(","),
        "is_odown": "o_down" in flags.split(","),
        "num-other-sentinels": 2,
        **more,
    }


def _discover(*sentinels: _FakeSentinel) -> tuple[str, int]:
    manager = NewestSentinel([])  # type: ignore[no-untyped-call]
    manager.sentinels = list(sentinels)  # type: ignore[arg-type]
    result: tuple[str, int] = asyncio.run(manager.discover_master("m"))
    return result


def test_discovery_believes_the_newest_configuration_not_the_first_answer() -> None:
    stale_but_fast = _FakeSentinel(_master(6379, epoch=3))
    current = _FakeSentinel(_master(6380, epoch=4), delay=0.01)
    assert _discover(stale_but_fast, current) == ("10.0.0.1", 6380)


def test_discovery_follows_a_promotion_before_it_is_announced() -> None:
    # The Sentinel failing over has told 6380 to become master; it will announce the
    # switch only after the replica's next INFO. The others know nothing yet.
    promoting = _FakeSentinel(
        _master(
            6379,
            epoch=3,
            flags="master,failover_in_progress",
            **{"failover-state": "wait_promotion"},
        ),
        replicas=[{"ip": "10.0.0.2", "port": 6380, "flags": "slave,promoted"}],
    )
    unaware = _FakeSentinel(_master(6379, epoch=3))
    assert _discover(unaware, promoting) == ("10.0.0.2", 6380)
    # Before the replica was told (select_slave), the old master still takes the writes.
    selecting = _FakeSentinel(
        _master(
            6379, epoch=3, flags="master,failover_in_progress", **{"failover-state": "select_slave"}
        ),
        replicas=[{"ip": "10.0.0.2", "port": 6380, "flags": "slave,promoted"}],
    )
    assert _discover(unaware, selecting) == ("10.0.0.1", 6379)


def test_discovery_skips_dead_sentinels_and_down_masters() -> None:
    dead = _FakeSentinel(RedisConnectionError("refused"))
    down = _FakeSentinel(_master(6379, epoch=5, flags="master,s_down"))
    alive = _FakeSentinel(_master(6380, epoch=4))
    assert _discover(dead, down, alive) == ("10.0.0.1", 6380)
    with pytest.raises(MasterNotFoundError, match="refused"):
        _discover(dead, down)


async def test_the_watch_drops_once_per_change_and_goes_back_on_an_abort() -> None:
    client = redis_client("redis+sentinel://h1,h2/mymaster", Config())
    other = redis_client("redis://h/0", Config())
    watch = FailoverWatch.for_pools(
        client.connection_pool, other.connection_pool, connect_timeout=1
    )
    assert watch is not None
    names = frozenset({"mymaster"})

    async def hear(channel: str, data: str) -> int:
        await watch._on_message({"channel": channel.encode(), "data": data.encode()}, names)
        return watch.switches

    promotion = "slave 10.0.0.2:6380 10.0.0.2 6380 @ mymaster 10.0.0.1 6379"
    switch = "mymaster 10.0.0.1 6379 10.0.0.2 6380"
    try:
        assert await hear("+failover-state-wait-promotion", promotion) == 1
        assert await hear("+switch-master", switch) == 1  # what the promotion acted on
        assert await hear("+switch-master", switch) == 1  # the other Sentinels' news
        assert await hear("-failover-abort-slave-timeout", "master mymaster 10.0.0.2 6380") == 1
        assert await hear("+switch-master", "othermaster 10.0.0.5 1 10.0.0.6 2") == 1
        # A promotion given up: back to the old master.
        back = "mymaster 10.0.0.2 6380 10.0.0.1 6379"
        promotion_back = "slave 10.0.0.1:6379 10.0.0.1 6379 @ mymaster 10.0.0.2 6380"
        assert await hear("+failover-state-wait-promotion", promotion_back) == 2
        assert await hear("-failover-abort-slave-timeout", "master mymaster 10.0.0.2 6380") == 3
        assert await hear("+switch-master", back) == 4  # once the switch is announced after all
    finally:
        await client.aclose(close_connection_pool=True)
        await other.aclose(close_connection_pool=True)

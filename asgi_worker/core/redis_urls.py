"""The Redis URLs the package connects with: their grammar, TLS options and display.

`redis://`, `rediss://` and `unix://` go to redis-py as they are; `redis+sentinel://`
(and `rediss+`) name Sentinels and a master, `redis+cluster://` (and `rediss+`) the seed
nodes of a Cluster. `Config` checks its URLs with this grammar when it is made, so an
error shows at start; the Redis clients (`backends/redis/clients.py`) read them with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
URL_SCHEMES = REDIS_SCHEMES | SENTINEL_SCHEMES | CLUSTER_SCHEMES
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
_SENTINEL_PARAMETERS = ("sentinel_password", "sentinel_username")
# TLS query parameters of rediss+sentinel:// and rediss+cluster:// URLs, named as redis-py
# names them in its own rediss:// URLs (see `TLSOptions`).
_TLS_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_CERT_REQS = ("required", "optional", "none")
# Query parameters whose value display_url masks (redis-py takes `?password=` too).
_SECRET_PARAMETERS = frozenset({"password", "sentinel_password"})
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
"""How a URL parameter or an environment variable says true."""
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
"""How a URL parameter or an environment variable says false."""


def display_url(url: str) -> str:
    """`url` with its passwords masked (`user:***@`, `?sentinel_password=***`), for output."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. an unbalanced "[" in the host: show nothing that may be secret
        return "<unparsable URL>"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_parameter = any(name in _SECRET_PARAMETERS for name, _ in pairs)
    if password is None and not secret_parameter:
        return url
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if secret_parameter:
        masked = [(n, "***" if n in _SECRET_PARAMETERS else v) for n, v in pairs]
        parts = parts._replace(query=urlencode(masked, safe="*/"))  # paths stay readable
    # Not geturl(): it drops the "//" of an empty host (unix:///path).
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path}{query}{fragment}"


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How a `rediss+sentinel://` or `rediss+cluster://` client checks its servers.

    Taken from the URL's `ssl_*` query parameters (the names redis-py gives them in its
    own `rediss://` URLs). They apply to every server the URL leads to alike: each
    Sentinel and the master, or each Cluster node. `clients.tls_kwargs` turns them
    into redis-py's keyword arguments.
    """

    ca_certs: str | None = None
    """`ssl_ca_certs`: path of a CA bundle (PEM) the servers' certificates must chain to,
    instead of the system's CAs: for a private CA."""
    certfile: str | None = None
    """`ssl_certfile`: path of the client certificate (PEM) shown to the servers, for
    servers with `tls-auth-clients yes`. Given with `keyfile`."""
    keyfile: str | None = None
    """`ssl_keyfile`: path of the client certificate's private key (PEM)."""
    cert_reqs: str = "required"
    """`ssl_cert_reqs`: `required` (a server whose certificate does not verify is refused),
    `optional` or `none` (not checked: the traffic is encrypted, but any server is
    trusted)."""
    check_hostname: bool = False
    """`ssl_check_hostname`: the server's certificate must also name the host connected to
    (as the URL or the Sentinels give it, often an IP address). Off by default, as in
    redis-py 5."""


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A `redis+sentinel://` URL taken apart (see `parse_sentinel_url`)."""

    sentinels: tuple[tuple[str, int], ...]
    """The Sentinels asked for the master, as (host, port), in the URL's order."""
    master: str
    """The name the Sentinels monitor the master under (`sentinel monitor <name> ...`)."""
    db: int = 0
    username: str | None = None
    """For the master (and its replicas), not for the Sentinels."""
    password: str | None = field(default=None, repr=False)
    """For the master (and its replicas), not for the Sentinels."""
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: TLSOptions | None = None
    """`rediss+sentinel://`: TLS to the Sentinels and to the master, as these options say;
    None for `redis+sentinel://`."""

    @property
    def ssl(self) -> bool:
        """True for `rediss+sentinel://`: TLS to the Sentinels and to the master."""
        return self.tls is not None


def is_sentinel_url(url: str) -> bool:
    """True for a `redis+sentinel://` or `rediss+sentinel://` URL."""
    return _scheme(url) in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """Take apart `redis+sentinel://[user:password@]host1[:port1],host2.../master[/db]`.

    Ports default to 26379. Query parameters: `sentinel_password` and
    `sentinel_username`, the Sentinels' own credentials (the ones before the `@` are the
    master's); with `rediss+sentinel://`, the `ssl_*` ones of `TLSOptions`, for the
    Sentinels and the master alike. Raises `ValueError` saying what is wrong; its message
    never holds a password.
    """
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("is not a redis+sentinel:// or rediss+sentinel:// URL")
    # Not urlsplit: it would read "h1:26379,h2" as a host with a bad port.
    rest, hash_sign, _ = rest.partition("#")
    if hash_sign:
        raise ValueError("has a #fragment; a Sentinel URL takes none")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    username, password, hosts = _credentials(netloc)
    sentinels = tuple(_sentinel_address(entry) for entry in hosts.split(","))
    names = [unquote(part) for part in path.split("/")] if slash else []
    if not names or not names[0]:
        raise ValueError("needs the master's name after the hosts: .../mymaster or .../mymaster/0")
    if len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise ValueError("path must be /<master name> or /<master name>/<db number>")
    options = _query(query, _SENTINEL_PARAMETERS)
    return SentinelURL(
        sentinels=sentinels,
        master=names[0],
        db=int(names[1]) if len(names) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password"),
        tls=_tls_options(scheme.lower(), options),
    )


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A `redis+cluster://` URL taken apart (see `parse_cluster_url`)."""

    nodes: tuple[tuple[str, int], ...]
    """Startup nodes, as (host, port): any reachable one tells the client the rest."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSOptions | None = None
    """`rediss+cluster://`: TLS to every node, as these options say; None for
    `redis+cluster://`."""

    @property
    def ssl(self) -> bool:
        """True for `rediss+cluster://`: TLS to every node."""
        return self.tls is not None


def is_cluster_url(url: str) -> bool:
    """True for a `redis+cluster://` or `rediss+cluster://` URL."""
    return _scheme(url) in CLUSTER_SCHEMES


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """`[user:password@]hosts` taken apart: (username, password, hosts), unquoted."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, unquote(secret) if colon else None, hosts


def parse_cluster_url(url: str) -> ClusterURL:
    """Take apart `redis+cluster://[user:password@]host1[:port1][,host2[:port2]...][/]`.

    Ports default to 6379. A Cluster has one database: the path may only be `/` or `/0`.
    The only query parameters are the `ssl_*` ones of `TLSOptions`, with
    `rediss+cluster://`. Raises `ValueError` saying what is wrong; its message never holds
    a password.
    """
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError("is not a redis+cluster:// or rediss+cluster:// URL")
    if "#" in rest:
        raise ValueError("has a #fragment; a Cluster URL takes none")
    rest, _, query = rest.partition("?")
    options = _query(query, ())
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("has a database; a Cluster has only database 0 (end the URL with /)")
    username, password, hosts = _credentials(netloc)
    nodes = tuple(_address(entry, _REDIS_PORT, "node") for entry in hosts.split(","))
    return ClusterURL(
        nodes=nodes,
        username=username,
        password=password,
        tls=_tls_options(scheme.lower(), options),
    )


def _query(query: str, own: tuple[str, ...]) -> dict[str, str]:
    """A Sentinel or Cluster URL's query parameters: `own` ones and the TLS ones."""
    supported = (*own, *_TLS_PARAMETERS)
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in supported:
            listed = ", ".join(supported)
            raise ValueError(f"has an unknown query parameter {name!r} (supported: {listed})")
        options[name] = value
    return options


def _tls_options(scheme: str, options: Mapping[str, str]) -> TLSOptions | None:
    """The `ssl_*` parameters in `options`, checked: None for a scheme without TLS."""
    given = {name: value for name, value in options.items() if name in _TLS_PARAMETERS}
    if not scheme.startswith("rediss+"):
        if given:
            secure = scheme.replace("redis+", "rediss+", 1)
            raise ValueError(
                f"has {next(iter(given))!r}, a TLS parameter, but {scheme}:// is not TLS "
                f"(use {secure}://)"
            )
        return None
    for name, value in given.items():
        if not value:
            raise ValueError(f"has an empty {name!r}")
    cert_reqs = given.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(
            f"has ssl_cert_reqs={given['ssl_cert_reqs']!r}; it takes {', '.join(_CERT_REQS)}"
        )
    check_hostname = given.get("ssl_check_hostname", "false").lower()
    if check_hostname not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(
            f"has ssl_check_hostname={given['ssl_check_hostname']!r}; it takes true or false"
        )
    if check_hostname in TRUE_WORDS and cert_reqs == "none":
        raise ValueError(
            "has ssl_check_hostname=true with ssl_cert_reqs=none: a certificate that is not "
            "verified names no host"
        )
    if ("ssl_certfile" in given) != ("ssl_keyfile" in given):
        raise ValueError(
            "has only one of ssl_certfile and ssl_keyfile; a client certificate needs both"
        )
    return TLSOptions(
        ca_certs=given.get("ssl_ca_certs"),
        certfile=given.get("ssl_certfile"),
        keyfile=given.get("ssl_keyfile"),
        cert_reqs=cert_reqs,
        check_hostname=check_hostname in TRUE_WORDS,
    )


def _sentinel_address(entry: str) -> tuple[str, int]:
    """One `host[:port]` (or `[v6]:port`) of a Sentinel URL."""
    return _address(entry, _SENTINEL_PORT, "Sentinel")


def _address(entry: str, default_port: int, kind: str) -> tuple[str, int]:
    """One `host[:port]` (or `[v6]:port`) of a Sentinel or Cluster URL."""
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"has a malformed IPv6 {kind} address {quote(entry)!r}")
        port = port[1:]
    else:
        host, _, port = entry.partition(":")
    if not host:
        raise ValueError("needs host[:port] entries separated by commas, with no empty one")
    if port == "":
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"has a bad {kind} port {port!r} (for {host!r})")
    return host, int(port)

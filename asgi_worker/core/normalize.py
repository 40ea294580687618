"""Canonical forms of a request's parts, so that spellings of one request share one key.

Pure functions, no I/O. Applied to the key *and* the replay: the app sees what was keyed.

- Percent-encoding (RFC 3986 section 6.2.2): escapes of unreserved characters are
  decoded (`%31` is `1`, `%7E` is `~`) and the hex digits of the others uppercased
  (`%2f` is `%2F`), in the query string and the raw path.
- The query: empty segments go (`a=1&`, `&&`); parameters whose names match
  `Config.ignore_params` go; with `Config.sort_query` the rest are put in order of name,
  repeated names keeping their order.
- The host: `Config.allowed_hosts` names the hosts served (see `keys.normalize_host` for
  the host's own canonical form).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from asgi_worker.core.config import Config

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def normalize_percent(raw: bytes) -> bytes:
    """`raw` with unreserved characters decoded and other escapes in upper case."""
    if b"%" not in raw:
        return raw

    def canonical(match: re.Match[bytes]) -> bytes:
        byte = int(match[1], 16)
        return bytes((byte,)) if byte in _UNRESERVED else b"%" + match[1].upper()

    return _ESCAPE.sub(canonical, raw)


def _patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.DOTALL)


@dataclass(frozen=True, slots=True)
class KeyRules:
    """The normalisations a `Config` asks for, compiled once."""

    ignore_params: re.Pattern[str] | None = None
    sort_query: bool = False
    allowed_hosts: re.Pattern[str] | None = None

    @classmethod
    def from_config(cls, config: Config) -> KeyRules:
        """The rules of `config`."""
        return cls(
            _patterns(config.ignore_params), config.sort_query, _patterns(config.allowed_hosts)
        )

    def query(self, query: bytes) -> bytes:
        """The canonical query string: see the module's doc."""
        if (
            self.ignore_params is None
            and not self.sort_query
            and b"%" not in query
            and b"&&" not in query
            and not query.startswith(b"&")
            and not query.endswith(b"&")
        ):
            return query  # already canonical: the common case costs four scans
        parts = [normalize_percent(part) for part in query.split(b"&") if part]
        if self.ignore_params is not None:
            ignored = self.ignore_params
            parts = [part for part in parts if not ignored.match(_name(part))]
        if self.sort_query:
            parts.sort(key=lambda part: part.partition(b"=")[0])  # stable: repeats keep order
        return b"&".join(parts)

    def allows(self, host: str) -> bool:
        """True if the (normalised) `host[:port]` is served."""
        if self.allowed_hosts is None:
            return True
        name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
        return self.allowed_hosts.match(name) is not None


def _name(part: bytes) -> str:
    """A query parameter's name, decoded as a form decodes it, for matching patterns."""
    name = part.partition(b"=")[0].replace(b"+", b" ")
    return unquote_to_bytes(name).decode("utf-8", "replace")

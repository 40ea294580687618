"""What an invalidation selects: its targets and their matching rules (no I/O).

- `ByPath("/foo")`: every stored query variant of `/foo`, on every host;
- `ByGlob("/reports/*")`: every path matching (a prefix is a glob ending in `*`);
- `ByQuery("/foo", (("a", "1"),))`: the `/foo` entries whose query string holds all the
  given `name=value` pairs, compared after percent-decoding, in any order, repeated names
  allowed;
- `ByTag("report-42")`: every entry whose response carried the tag (`Surrogate-Key`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class ByPath:
    """Every entry of one path."""

    path: str


@dataclass(frozen=True, slots=True)
class ByGlob:
    """Every entry whose path matches a shell-style pattern (`*` also matches `/`)."""

    pattern: str

    def matches(self, path: str) -> bool:
        """True if `path` is selected."""
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclass(frozen=True, slots=True)
class ByQuery:
    """The entries of one path whose query holds all of `params`."""

    path: str
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ByTag:
    """Every entry whose response carried the tag."""

    tag: str


Target = ByPath | ByGlob | ByQuery | ByTag


def query_matches(query: bytes, params: tuple[tuple[str, str], ...]) -> bool:
    """True if every `(name, value)` in `params` occurs in the raw query string."""
    present = set(parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"))
    wanted = {
        (name.encode().decode("latin-1"), value.encode().decode("latin-1"))
        for name, value in params
    }
    return wanted <= present


def glob_range(pattern: str) -> tuple[bytes, bytes]:
    """The ZRANGEBYLEX bounds that hold every path the pattern can match."""
    literal = _GLOB_CHARS.split(pattern, maxsplit=1)[0].encode("utf-8", "surrogatepass")
    if not literal:
        return b"-", b"+"
    # UTF-8 never contains 0xff: every string starting with `literal` sorts in between.
    return b"[" + literal, b"[" + literal + b"\xff"

"""Running a Lua script by its SHA-1, with the whole script where Redis has lost it.

Every script of the package runs through `Script`: the store's (one Cluster slot each),
the enqueue and the worker's take. A pipeline sends `Script.command` and, on a
`NoScriptError` reply, calls the script (`Script.__call__` then sends it whole).
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError


class Script:
    """A Lua script run by its SHA-1 (EVALSHA), and sent whole (EVAL) where it is missing.

    Not redis-py's `register_script`, which on a miss loads the script on the nodes its
    client believes are masters and tries EVALSHA once more: on a Cluster whose slot has
    just moved, or whose replica has just been promoted, that second try can meet a node
    without the script again. EVAL follows the key to whichever node serves it now (MOVED
    and ASK) and leaves the script cached there.
    """

    def __init__(self, client: Redis | RedisCluster, text: str) -> None:
        self._client: Any = client  # redis-py types eval/evalsha for one client class each
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        """The script's reply for `keys` and `args`."""
        try:
            return await self._client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or restarted node, or one the slot just moved to
            return await self._client.eval(self.text, len(keys), *keys, *args)

    def command(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        """The EVALSHA of `__call__`, for a pipeline; a `NoScriptError` reply: call it."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

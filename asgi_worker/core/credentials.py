"""Per-credential cache entries (`Config.key_credentials`): keyed by a MAC, carried sealed.

By default a request with `Authorization` or `Cookie` bypasses the cache (RFC 9111 3.5).
With `key_credentials=True` it gets its own entry instead: the key holds a keyed BLAKE2b
of the credential headers (so nobody can test guesses against keys without the secret),
and the job carries the credentials to the worker sealed with Fernet (AES-128-CBC and
HMAC-SHA256, from the `cryptography` package), so they never rest in Redis in clear.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

CREDENTIAL_HEADERS = (b"authorization", b"cookie")
"""Request headers that identify a client; a shared cache must not mix their answers."""

_INSTALL_HINT = "pip install 'asgi-worker[credentials]'"


class CredentialGuard:
    """Identifies and seals request credentials with one secret."""

    def __init__(self, secret: str) -> None:
        material = hashlib.sha256(b"asgi-worker credentials\0" + secret.encode()).digest()
        self._mac_key = material
        self._fernet: Any = None
        self._fernet_key = base64.urlsafe_b64encode(
            hashlib.sha256(b"asgi-worker seal\0" + secret.encode()).digest()
        )

    def identify(self, credentials: tuple[tuple[bytes, bytes], ...]) -> bytes:
        """A MAC of the credential headers: equal for the same client, opaque otherwise."""
        mac = hashlib.blake2b(key=self._mac_key, digest_size=16)
        for name, value in credentials:
            mac.update(len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value)
        return mac.digest()

    def seal(self, data: bytes) -> bytes:
        """Encrypt and authenticate `data` for the trip through the queue."""
        return bytes(self._cipher().encrypt(data))

    def open(self, token: bytes) -> bytes:
        """Undo `seal`; `ValueError` if the token was not sealed with this secret."""
        from cryptography.fernet import InvalidToken

        try:
            return bytes(self._cipher().decrypt(token))
        except InvalidToken:
            raise ValueError("sealed credentials do not open with this secret") from None

    def _cipher(self) -> Any:
        if self._fernet is None:
            self._fernet = fernet(self._fernet_key)
        return self._fernet


def fernet(key: bytes) -> Any:
    """A `cryptography` Fernet, or an ImportError that says what to install."""
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        raise ImportError(f"sealing credentials needs cryptography: {_INSTALL_HINT}") from None
    return Fernet(key)


def sealing_available() -> bool:
    """True if the `cryptography` package can be imported."""
    try:
        import cryptography.fernet  # noqa: F401
    except ImportError:
        return False
    return True

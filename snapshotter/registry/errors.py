"""Registry errors: one line each, naming host/repo/digest and never a credential.

Callers catch ``RegistryError``; subclasses say what went wrong so the fetch layer can
decide (retry later, fail the read, fall back to a full pull).
"""
from __future__ import annotations


class RegistryError(Exception):
    """Base class. ``str()`` is one line, safe to log (no secrets, no signed URLs)."""

    def __init__(self, message: str, *, host: str = "", repo: str = "", digest: str = "") -> None:
        where = " ".join(p for p in (f"host={host}" if host else "",
                                     f"repo={repo}" if repo else "",
                                     f"digest={digest}" if digest else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.host = host
        self.repo = repo
        self.digest = digest


class InvalidReferenceError(RegistryError, ValueError):
    """An image reference that cannot be parsed."""


class AuthError(RegistryError):
    """Credentials missing, rejected, or a token could not be obtained."""


class NotFoundError(RegistryError):
    """The manifest, blob, tag or repository does not exist."""


class UnavailableError(RegistryError):
    """Retries exhausted or the per-read deadline passed (5xx, 429, resets, timeouts)."""


class ProtocolError(RegistryError):
    """The registry answered something we cannot use (bad Content-Range, bad JSON, 416)."""


class DigestMismatchError(RegistryError):
    """Bytes received do not hash to the digest asked for."""


class PlatformError(RegistryError):
    """An image index has no manifest for the requested platform."""


class ConfigError(RegistryError):
    """hosts.toml, docker config.json or a credential helper is unusable."""

"""Registry credentials kubelet sent with PullImage, kept in memory per registry host.

Why: in Kubernetes the image pull secrets travel kubelet → CRI → containerd and never
reach a proxy snapshotter, so without them every lazy pull of a private image falls back.
The CRI proxy (``snapshotter.cri.proxy``) hands each PullImage's ``AuthConfig`` to
``CriCredentials.remember``; the registry client asks ``get`` before docker's config.json.
Entries expire (kubelet sends them again with every pull), live only in this process and
are never logged: ``Credentials`` redacts itself.
"""
from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from snapshotter.registry.credentials import Credentials
from snapshotter.registry.reference import Reference

__all__ = ["CriCredentials", "from_auth_config"]

DEFAULT_TTL_S = 3600.0
MAX_HOSTS = 1024


@dataclass(slots=True, frozen=True)
class _Entry:
    creds: Credentials
    expires: float


def from_auth_config(username: str, password: str, auth: str, identity_token: str,
                     registry_token: str) -> Credentials | None:
    """The CRI ``AuthConfig`` fields as ``Credentials``; None when they carry nothing.

    Precedence as containerd's CRI plugin: an identity token, then a registry token,
    then username/password, then ``auth`` (base64 ``user:password``).
    """
    if identity_token:
        return Credentials(username=username, identity_token=identity_token)
    if registry_token:
        return Credentials(registry_token=registry_token)
    if username:
        return Credentials(username, password)
    if auth:
        try:
            user, sep, secret = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(user, secret) if sep else None
    return None


class CriCredentials:
    """Thread-safe (the proxy and the registry client run on different loops).
    Implements ``snapshotter.registry.credentials.CredentialSource``."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[str, _Entry] = {}

    def remember(self, image: str, creds: Credentials) -> str | None:
        """Keep ``creds`` for the registry of ``image``; returns that host (None: bad ref)."""
        try:
            host = Reference.parse(image).registry
        except ValueError:
            return None
        now = self._clock()
        with self._lock:
            self._hosts.pop(host, None)
            self._hosts[host] = _Entry(creds, now + self.ttl_s)
            while len(self._hosts) > MAX_HOSTS:  # oldest first (insertion order)
                del self._hosts[next(iter(self._hosts))]
        return host

    def get(self, host: str) -> Credentials | None:
        now = self._clock()
        with self._lock:
            entry = self._hosts.get(host)
            if entry is None:
                return None
            if entry.expires <= now:
                del self._hosts[host]
                return None
            return entry.creds

    def hosts(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [h for h, e in self._hosts.items() if e.expires > now]

"""Where credentials come from: docker ``config.json`` and ``docker-credential-*`` helpers.

The same file docker, skopeo and containerd's CRI users already have: ``auths`` entries
(``auth`` = base64 user:password, or ``username``/``password``, or ``identitytoken``),
``credHelpers`` per registry and ``credsStore`` as the default helper. Secrets live only
in ``Credentials``, whose repr is redacted.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from snapshotter.registry.errors import ConfigError
from snapshotter.registry.reference import DOCKER_HUB

_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(slots=True, frozen=True)
class Credentials:
    """A username with a password, an OAuth2 refresh token (``identity_token``), or a
    bearer token for the registry itself (``registry_token``, from a CRI AuthConfig)."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=<redacted>)"

    __str__ = __repr__


class CredentialSource(Protocol):
    """Credentials learnt at run time (the CRI proxy's), asked before docker's config."""

    def get(self, host: str) -> Credentials | None:
        """Credentials for a registry host (``host[:port]``, ``docker.io``), or None."""
        ...


def default_docker_config() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _normalise(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port``; Docker Hub aliases → ``docker.io``."""
    if key in _HUB_KEYS:
        return DOCKER_HUB
    netloc = urlsplit(key if "://" in key else f"//{key}").netloc or key
    return DOCKER_HUB if netloc in _HUB_KEYS else netloc


class DockerCredentials:
    """Credentials for a registry host from a docker config file (read lazily, once)."""

    def __init__(self, path: Path | None = None, *, helper_timeout: float = 30.0) -> None:
        self.path = Path(path) if path else default_docker_config()
        self.helper_timeout = helper_timeout
        self._doc: dict[str, Any] | None = None
        self._cache: dict[str, Credentials | None] = {}

    def _load(self) -> dict[str, Any]:
        if self._doc is None:
            try:
                self._doc = json.loads(self.path.read_text())
            except FileNotFoundError:
                self._doc = {}
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read docker config {self.path}: {exc}") from None
            if not isinstance(self._doc, dict):
                raise ConfigError(f"docker config {self.path} is not a JSON object")
        return self._doc

    async def get(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (a registry name or endpoint netloc), or None."""
        key = _normalise(host)
        if key not in self._cache:
            self._cache[key] = await self._lookup(key)
        return self._cache[key]

    def forget(self, host: str) -> None:
        self._cache.pop(_normalise(host), None)

    async def _lookup(self, key: str) -> Credentials | None:
        doc = self._load()
        helpers = doc.get("credHelpers") or {}
        for name, helper in helpers.items():
            if _normalise(name) == key:
                return await self._helper(str(helper), name)
        for name, entry in (doc.get("auths") or {}).items():
            if _normalise(name) == key and isinstance(entry, dict):
                creds = self._from_entry(entry, name)
                if creds is not None:
                    return creds
        store = doc.get("credsStore")
        if store:
            server = "https://index.docker.io/v1/" if key == DOCKER_HUB else key
            return await self._helper(str(store), server)
        return None

    def _from_entry(self, entry: dict[str, Any], name: str) -> Credentials | None:
        if entry.get("identitytoken"):
            return Credentials(username=str(entry.get("username", "")),
                               identity_token=str(entry["identitytoken"]))
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise ConfigError(f"docker config {self.path}: bad 'auth' for {name}") from None
            if not sep:
                raise ConfigError(f"docker config {self.path}: bad 'auth' for {name}")
            return Credentials(user, password)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
        return None

    async def _helper(self, helper: str, server: str) -> Credentials | None:
        """Run ``docker-credential-<helper> get`` with the server URL on stdin."""
        prog = f"docker-credential-{helper}"
        try:
            proc = await asyncio.create_subprocess_exec(
                prog, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise ConfigError(f"credential helper {prog} not found in PATH") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(server.encode()), self.helper_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ConfigError(f"credential helper {prog} timed out") from None
        if proc.returncode != 0:
            msg = (out or err).decode(errors="replace").strip().splitlines()
            if msg and "credentials not found" in msg[0].lower():
                return None
            # The helper's own message may be useful but never echoes the secret.
            raise ConfigError(f"credential helper {prog} failed for {server}"
                              + (f": {msg[0][:200]}" if msg else ""))
        try:
            doc = json.loads(out)
            user, secret = str(doc.get("Username", "")), str(doc["Secret"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"credential helper {prog} returned malformed output") from None
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(user, secret)

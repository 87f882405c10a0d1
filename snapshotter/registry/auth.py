"""Registry authentication: ``WWW-Authenticate`` challenges, Bearer tokens, Basic.

One ``Authenticator`` per client. It learns each host's scheme from its first 401,
then authorises later requests up front (no extra round trip). Bearer tokens are cached
per (realm, service, scope) until ``expires_in`` (minus a margin). Credentials come from
docker config / helpers, or ECR; they are sent only to the registry host they belong to
and to its token realm, and never appear in logs or errors.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from snapshotter.log import get_logger
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.errors import AuthError

log = get_logger("lazysnap.registry.auth")
_PARAM_RE = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')

CredentialLookup = Callable[[str, str, bool], Awaitable[Credentials | None]]
"""(endpoint host, registry name, force refresh) → credentials or None."""


@dataclass(slots=True, frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` (first challenge only)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value or "")
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


@dataclass(slots=True)
class AuthStats:
    token_fetches: int = 0
    challenges: int = 0


@dataclass(slots=True)
class Authenticator:
    """Produces ``Authorization`` header values for (endpoint host, repository scope)."""

    session: aiohttp.ClientSession
    lookup: CredentialLookup
    timeout: aiohttp.ClientTimeout
    on_request: Callable[[str, int], None] = lambda purpose, nbytes: None
    stats: AuthStats = field(default_factory=AuthStats)
    _challenges: dict[str, Challenge] = field(default_factory=dict)
    _tokens: dict[tuple[str, str, str, str], _Token] = field(default_factory=dict)
    _locks: dict[tuple[str, str, str, str], asyncio.Lock] = field(default_factory=dict)

    async def header(self, host: str, registry: str, scope: str) -> str | None:
        """An Authorization value for a request, if this host is known to need one."""
        ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "basic":
            creds = await self.lookup(host, registry, False)
            return creds.basic() if creds and creds.password else None
        if ch.scheme == "bearer":
            return "Bearer " + await self._token(host, registry, ch, scope, force=False)
        return None

    async def challenge(self, host: str, registry: str, scope: str, www_authenticate: str,
                        *, previous: str | None) -> str:
        """Handle a 401: return a fresh Authorization value or raise ``AuthError``.

        ``previous`` is what the rejected request carried; if it was already a fresh
        answer to the same challenge, the credentials are wrong and we stop here.
        """
        self.stats.challenges += 1
        ch = parse_challenge(www_authenticate)
        if ch is None or ch.scheme not in ("bearer", "basic"):
            raise AuthError("registry requires an unsupported authentication scheme "
                            f"{(ch.scheme if ch else 'none')!r}", host=host)
        self._challenges[host] = ch
        if ch.scheme == "basic":
            forced = previous is not None
            creds = await self.lookup(host, registry, forced)
            if creds is None or not (creds.password or creds.identity_token):
                raise AuthError("registry requires credentials and none are configured "
                                "(docker config.json or credential helper)", host=host)
            value = creds.basic()
            if previous == value:
                raise AuthError(f"credentials for user {creds.username!r} were rejected", host=host)
            return value
        want = ch.params.get("scope") or scope
        if previous is not None and previous.startswith("Bearer "):
            # A token we just got was refused: maybe expired early; fetch once more.
            key = (ch.params.get("realm", ""), ch.params.get("service", ""), want, host)
            tok = self._tokens.get(key)
            if tok is not None and "Bearer " + tok.value != previous:
                return "Bearer " + tok.value
            token = await self._token(host, registry, ch, want, force=True)
            if "Bearer " + token == previous:
                raise AuthError(f"access denied for scope {want!r}", host=host)
            return "Bearer " + token
        return "Bearer " + await self._token(host, registry, ch, want, force=False)

    async def _token(self, host: str, registry: str, ch: Challenge, scope: str, *, force: bool) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise AuthError("Bearer challenge without realm", host=host)
        service = ch.params.get("service", "")
        key = (realm, service, scope, host)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            tok = self._tokens.get(key)
            if tok is not None and not force and time.monotonic() < tok.expires:
                return tok.value
            creds = await self.lookup(host, registry, force)
            if creds is not None and creds.registry_token:
                return creds.registry_token  # a bearer token for the registry: no token server
            value, ttl = await self._fetch_token(host, realm, service, scope, creds)
            margin = min(30.0, ttl * 0.1)
            self._tokens[key] = _Token(value, time.monotonic() + max(1.0, ttl - margin))
            return value

    async def _fetch_token(self, host: str, realm: str, service: str, scope: str,
                           creds: Credentials | None) -> tuple[str, float]:
        self.stats.token_fetches += 1
        params = {"service": service} if service else {}
        if scope:
            params["scope"] = scope
        user = creds.username if creds else ""
        try:
            if creds is not None and creds.identity_token:
                form = dict(params, grant_type="refresh_token", client_id="lazysnap",
                            refresh_token=creds.identity_token)
                ctx = self.session.post(realm, data=form, timeout=self.timeout, allow_redirects=False)
            else:
                headers = {"Authorization": creds.basic()} if creds and creds.password else {}
                ctx = self.session.get(realm, params=params, headers=headers, timeout=self.timeout)
            async with ctx as resp:
                body = await resp.read()
                self.on_request("auth", len(body))
                if resp.status in (401, 403):
                    who = f" for user {user!r}" if user else " (anonymous)"
                    raise AuthError(f"token server refused the credentials{who}", host=host)
                if resp.status != 200:
                    raise AuthError(f"token server answered HTTP {resp.status}", host=host)
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    raise AuthError("token server returned invalid JSON", host=host) from None
        except aiohttp.ClientError as exc:
            raise AuthError(f"token server unreachable: {type(exc).__name__}", host=host) from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not token:
            raise AuthError("token server returned no token", host=host)
        try:
            ttl = float(doc.get("expires_in") or 60)
        except (TypeError, ValueError):
            ttl = 60.0
        log.debug("token_fetched", host=host, scope=scope, ttl=round(ttl))
        return str(token), ttl

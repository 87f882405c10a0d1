"""Amazon ECR credentials: botocore ``GetAuthorizationToken`` → Basic ``AWS:<password>``.

ECR tokens last 12 h; we refresh a margin before ``expiresAt``. botocore is optional
(extra ``[ecr]``); its calls block, so they run in a worker thread. The ECR API endpoint
is configurable (``endpoint_url``, or botocore's own ``AWS_ENDPOINT_URL_ECR``), which is
how tests talk to a local moto server without patching anything.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from dataclasses import dataclass, field

from snapshotter.log import get_logger
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.errors import AuthError, ConfigError

log = get_logger("lazysnap.registry.ecr")
ECR_HOST_RE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?(?::\d+)?$")


@dataclass(slots=True, frozen=True)
class EcrHost:
    """How to get a token for one registry host."""

    region: str
    registry_id: str | None = None
    endpoint_url: str | None = None


def ecr_host_for(host: str, configured: dict[str, EcrHost]) -> EcrHost | None:
    if host in configured:
        return configured[host]
    m = ECR_HOST_RE.match(host)
    return EcrHost(region=m["region"], registry_id=m["account"]) if m else None


@dataclass(slots=True)
class _Cached:
    creds: Credentials
    refresh_at: float


@dataclass(slots=True)
class EcrTokenProvider:
    """Caches one token per (region, registry id, endpoint); refreshes early.

    ``refresh_margin`` seconds before ``expiresAt`` a new token is fetched; if the
    service reports an expiry that is already (nearly) past, the token is still used
    for ``min_lifetime`` seconds rather than fetched on every request.
    """

    refresh_margin: float = 1800.0
    min_lifetime: float = 60.0
    calls: int = 0
    _cache: dict[tuple[str, str | None, str | None], _Cached] = field(default_factory=dict)
    _locks: dict[tuple[str, str | None, str | None], asyncio.Lock] = field(default_factory=dict)

    async def get(self, host: str, cfg: EcrHost, *, force: bool = False) -> Credentials:
        key = (cfg.region, cfg.registry_id, cfg.endpoint_url)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(key)
            if cached and not force and time.time() < cached.refresh_at:
                return cached.creds
            creds, expires_at = await asyncio.to_thread(self._fetch, host, cfg)
            now = time.time()
            refresh_at = max(expires_at - self.refresh_margin, now + self.min_lifetime)
            if expires_at - now < self.refresh_margin:
                log.warning("ecr_token_short_lived", host=host, expires_in=round(expires_at - now))
            self._cache[key] = _Cached(creds, refresh_at)
            log.info("ecr_token_fetched", host=host, region=cfg.region, refresh_in=round(refresh_at - now))
            return creds

    def _fetch(self, host: str, cfg: EcrHost) -> tuple[Credentials, float]:
        try:
            import botocore.session
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise ConfigError(f"{host} is an ECR registry but botocore is not installed "
                              "(pip install 'lazysnap[ecr]')") from None
        self.calls += 1
        session = botocore.session.get_session()
        try:
            client = session.create_client("ecr", region_name=cfg.region, endpoint_url=cfg.endpoint_url)
            kwargs = {"registryIds": [cfg.registry_id]} if cfg.registry_id else {}
            resp = client.get_authorization_token(**kwargs)
            data = resp["authorizationData"][0]
            user, sep, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        except (BotoCoreError, ClientError) as exc:
            # botocore messages name the operation and error code, never the secret key.
            raise AuthError(f"ECR GetAuthorizationToken failed: {exc}", host=host) from None
        except (KeyError, IndexError, binascii.Error, UnicodeDecodeError):
            raise AuthError("ECR GetAuthorizationToken returned a malformed token", host=host) from None
        if not sep:
            raise AuthError("ECR authorization token is not user:password", host=host)
        expires = data.get("expiresAt")
        expires_at = expires.timestamp() if hasattr(expires, "timestamp") else time.time() + 12 * 3600
        return Credentials(user, password), expires_at

"""Client configuration: plain dataclasses passed down from the service or CLI."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.registry.credentials import CredentialSource
from snapshotter.registry.ecr import EcrHost


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Jittered exponential backoff with a hard per-operation deadline.

    Attempt ``n`` (1-based) waits ``uniform(0, min(max_delay, base_delay * 2**(n-1)))``
    ("full jitter"), or the server's ``Retry-After`` when given (capped by the deadline).
    """

    max_attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float = 60.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** (attempt - 1))))


@dataclass(slots=True, frozen=True)
class RegistryConfig:
    """Everything the client needs; all fields have working defaults.

    ``hosts_dir``: containerd hosts.toml directory (None: no mirrors; loopback → http).
    ``docker_config``: config.json path (None: ``$DOCKER_CONFIG`` or ~/.docker).
    ``per_host_concurrency``: in-flight requests per endpoint host.
    ``coalesce_gap``: ranges closer than this are fetched in one request.
    ``ecr_hosts``: hosts to treat as ECR beyond ``*.dkr.ecr.*.amazonaws.com``;
    ``ecr_endpoint_url`` overrides the ECR API endpoint for auto-detected hosts.
    ``mirror_cooldown``: seconds a mirror that refused connections is skipped.
    ``credential_source``: credentials asked before the docker config (the CRI proxy's).
    """

    hosts_dir: Path | None = None
    docker_config: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    per_host_concurrency: int = 16
    pool_size: int = 64
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    coalesce_gap: int = 64 << 10
    max_coalesced: int = 16 << 20
    ecr_hosts: dict[str, EcrHost] = field(default_factory=dict)
    ecr_endpoint_url: str | None = None
    mirror_cooldown: float = 5.0
    user_agent: str = "lazysnap/0.1"
    credential_source: CredentialSource | None = None

"""The lazy layer provider: indexes, registration in the FUSE fs, on-demand fetch."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.layers.options import LazyOptions
from snapshotter.layers.provider import LazyLayerProvider, ProvidedLayer

if TYPE_CHECKING:
    from snapshotter.config import Config
    from snapshotter.registry import RegistryConfig
    from snapshotter.registry.credentials import CredentialSource

__all__ = ["LazyLayerProvider", "LazyOptions", "ProvidedLayer", "build_provider"]


def build_provider(config: Config, options: LazyOptions | None = None, *,
                   registry_config: RegistryConfig | None = None,
                   credentials: CredentialSource | None = None) -> LazyLayerProvider:
    """The provider ``lazysnap serve`` injects into the service.

    ``config`` is the daemon's ``Config``: its ``[lazy]`` and ``[prefetch]`` tables are
    this provider's knobs (``options`` overrides ``[lazy]`` for tests), ``[registry]``
    and ``hosts_dir`` configure the registry client; ``credentials`` (the CRI proxy's)
    are asked before the docker config. Nothing starts until the first
    ``provide``/``restore`` (then the FUSE filesystem is mounted at ``<root>/mnt``).
    """
    from snapshotter.registry import RegistryClient
    from snapshotter.registry import RegistryConfig as ClientConfig
    from snapshotter.registry import RetryPolicy

    opts = dataclasses.replace(options or config.lazy).validate()
    if registry_config is None:
        reg = config.registry
        hosts = config.hosts_dir
        registry_config = ClientConfig(
            hosts_dir=Path(hosts) if hosts and os.path.isdir(hosts) else None,
            read_timeout=reg.timeout_seconds,
            retry=RetryPolicy(max_attempts=max(1, reg.retries + 1),
                              deadline=min(reg.timeout_seconds, opts.fetch_deadline_s)),
            credential_source=credentials)
    return LazyLayerProvider(Path(config.root), RegistryClient(registry_config), opts, config.prefetch)

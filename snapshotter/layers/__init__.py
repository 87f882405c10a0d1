"""The lazy layer provider: indexes, registration in the FUSE fs, on-demand fetch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from snapshotter.layers.options import LazyOptions
from snapshotter.layers.provider import LazyLayerProvider, ProvidedLayer

__all__ = ["LazyLayerProvider", "LazyOptions", "ProvidedLayer", "build_provider", "create_provider"]


def build_provider(config: Any, options: LazyOptions | None = None, *,
                   registry_config: Any | None = None) -> LazyLayerProvider:
    """The provider ``lazysnap serve`` injects into the service.

    ``config`` is ``snapshotter.config.Config``: root, hosts_dir, ``fetch`` and ``registry``
    sections are mapped here; ``options`` overrides the lazy-path knobs (a ``[lazy]``
    table of the config file once the lead adds it). Must be called with a running
    event loop only if the returned provider is used; nothing starts until the first
    ``provide``/``restore`` (then the FUSE filesystem is mounted at ``<root>/mnt``).
    """
    from snapshotter.registry import RegistryClient, RegistryConfig, RetryPolicy

    opts = options or LazyOptions()
    fetch = getattr(config, "fetch", None)
    if options is None and fetch is not None:
        opts.max_concurrency = int(getattr(fetch, "max_concurrency", opts.max_concurrency))
        opts.span_size = int(getattr(fetch, "span_bytes", opts.span_size))
        opts.small_layer_bytes = opts.span_size
    lazy = getattr(config, "lazy", None)  # optional [lazy] table (LazyOptions fields)
    if lazy is not None and options is None:
        for name in LazyOptions.__dataclass_fields__:  # type: ignore[attr-defined]
            if hasattr(lazy, name):
                setattr(opts, name, getattr(lazy, name))
    if registry_config is None:
        reg = getattr(config, "registry", None)
        hosts = getattr(config, "hosts_dir", None)
        timeout = float(getattr(reg, "timeout_seconds", 30.0))
        retries = int(getattr(reg, "retries", 3))
        registry_config = RegistryConfig(
            hosts_dir=Path(hosts) if hosts and os.path.isdir(hosts) else None,
            read_timeout=timeout,
            retry=RetryPolicy(max_attempts=max(1, retries + 1), deadline=min(timeout, opts.fetch_deadline_s)))
    prefetch = None
    try:
        from snapshotter.prefetch.options import PrefetchOptions

        prefetch = PrefetchOptions.from_config(config)
    except ImportError:
        pass
    return LazyLayerProvider(Path(config.root), RegistryClient(registry_config), opts, prefetch)


def create_provider(config: Any) -> LazyLayerProvider:
    """Alias used by ``snapshotter.cli.serve_cmds``."""
    return build_provider(config)

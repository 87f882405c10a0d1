"""Registry hosts and mirrors from containerd's ``hosts.toml`` directory layout.

``<hosts_dir>/<host[:port]>/hosts.toml`` (or ``_default/hosts.toml``) lists mirrors as
``[host."<url>"]`` tables tried in file order, then the upstream ``server``. Users
already configure containerd this way, so a pull-through cache or a P2P agent becomes a
mirror with no lazysnap-specific setting. Without a file, loopback hosts use plain http.
"""
from __future__ import annotations

import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from snapshotter.registry.errors import ConfigError
from snapshotter.registry.reference import DOCKER_HUB, DOCKER_HUB_API

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})


@dataclass(slots=True, frozen=True)
class Endpoint:
    """One place to send API requests. ``api_root`` ends in ``/v2`` unless
    ``override_path``; ``host`` is the netloc (the auth/concurrency key)."""

    scheme: str
    host: str
    api_root: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.api_root}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.scheme != "https":
            return True
        if self.skip_verify:
            return False
        if not self.ca and not self.client_certs:
            return True
        ctx = ssl.create_default_context()
        for ca in self.ca:
            ctx.load_verify_locations(cafile=ca)
        for cert, key in self.client_certs:
            ctx.load_cert_chain(cert, key)
        return ctx


def is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or host
    return name in ("localhost", "::1") or name.startswith("127.")


def _endpoint(url: str, *, capabilities: frozenset[str], mirror: bool,
              table: dict[str, Any], base_dir: Path) -> Endpoint:
    if "://" not in url:
        url = ("http://" if is_loopback(url) else "https://") + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"hosts.toml: invalid host URL {url!r}")
    path = parts.path.rstrip("/")
    if not table.get("override_path", False):
        path = path + "/v2" if not path.endswith("/v2") else path

    def as_paths(value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, list) else ([value] if value else [])
        return tuple(str(p if os.path.isabs(p) else base_dir / p) for p in items)

    certs: list[tuple[str, str | None]] = []
    client = table.get("client")
    for item in (client if isinstance(client, list) else ([client] if client else [])):
        if isinstance(item, list):
            certs.append((str(item[0]), str(item[1]) if len(item) > 1 else None))
        else:
            certs.append((str(item), None))
    headers = table.get("header") or {}
    hdrs = tuple((str(k), str(v[0] if isinstance(v, list) else v)) for k, v in headers.items())
    return Endpoint(scheme=parts.scheme, host=parts.netloc, api_root=path,
                    capabilities=capabilities, skip_verify=bool(table.get("skip_verify", False)),
                    ca=as_paths(table.get("ca")), client_certs=tuple(certs), headers=hdrs,
                    mirror=mirror)


def _host_dir_names(registry: str) -> list[str]:
    names = [registry]
    if ":" in registry:  # containerd also accepts host_port_ for directory-unsafe names
        host, port = registry.rsplit(":", 1)
        names.append(f"{host}_{port}_")
    return names


@dataclass(slots=True)
class HostsConfig:
    """Looks up the ordered endpoints for a registry name. ``hosts_dir`` may not exist."""

    hosts_dir: Path | None = None
    _cache: dict[str, list[Endpoint]] = field(default_factory=dict)

    def endpoints(self, registry: str, capability: str = "pull") -> list[Endpoint]:
        """Mirrors (in file order) having ``capability``, then the upstream server."""
        if registry not in self._cache:
            self._cache[registry] = self._load(registry)
        eps = [e for e in self._cache[registry] if capability in e.capabilities]
        if not eps:
            raise ConfigError(f"no host for {registry} has capability {capability!r}")
        return eps

    def _load(self, registry: str) -> list[Endpoint]:
        default_server = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        path = self._find(registry)
        if path is None:
            return [_endpoint(default_server, capabilities=ALL_CAPABILITIES, mirror=False,
                              table={}, base_dir=Path("."))]
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        base_dir = path.parent
        out: list[Endpoint] = []
        for url, table in (doc.get("host") or {}).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [host.{url!r}] must be a table")
            caps = frozenset(table.get("capabilities") or ALL_CAPABILITIES)
            unknown = caps - ALL_CAPABILITIES
            if unknown:
                raise ConfigError(f"{path}: unknown capabilities {sorted(unknown)}")
            out.append(_endpoint(url, capabilities=caps, mirror=True, table=table, base_dir=base_dir))
        # Like containerd, the upstream always comes last (``server`` or the default).
        server = str(doc.get("server") or default_server)
        caps = frozenset(doc.get("capabilities") or ALL_CAPABILITIES)
        out.append(_endpoint(server, capabilities=caps, mirror=False, table=doc, base_dir=base_dir))
        return out

    def _find(self, registry: str) -> Path | None:
        if self.hosts_dir is None:
            return None
        for name in _host_dir_names(registry) + ["_default"]:
            p = Path(self.hosts_dir) / name / "hosts.toml"
            if p.is_file():
                return p
        return None

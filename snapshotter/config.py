"""Daemon configuration: a TOML file mapped onto plain dataclasses, flags override it.

Configuration enters at the top (``lazysnap serve``) and is passed down as these
dataclasses; lower packages never read files or the environment themselves.

Example (see deploy/config.toml)::

    root = "/var/lib/lazysnap"
    address = "/run/lazysnap/lazysnap.sock"
    hosts_dir = "/etc/containerd/certs.d"
    metrics_address = "127.0.0.1:9746"
    log_level = "info"

    [lazy]                  # snapshotter.layers.options.LazyOptions
    fetch_deadline_s = 30.0

    [prefetch]              # snapshotter.prefetch.options.PrefetchOptions
    background = true

    [registry]
    timeout_seconds = 30
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.layers.options import LazyOptions
from snapshotter.prefetch.options import PrefetchOptions

__all__ = ["Config", "ConfigError", "CriConfig", "RegistryConfig", "RemoteConfig", "load_config"]

DEFAULT_ROOT = "/var/lib/lazysnap"
DEFAULT_ADDRESS = "/run/lazysnap/lazysnap.sock"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_CRI_ADDRESS = "/run/lazysnap/cri.sock"
DEFAULT_CONTAINERD_CRI = "/run/containerd/containerd.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The config file is unreadable or has a wrong key/type (one-line message)."""


@dataclass(slots=True)
class RegistryConfig:
    """Registry client settings (used by the registry package)."""

    timeout_seconds: float = 30.0
    retries: int = 3


@dataclass(slots=True)
class RemoteConfig:
    """The remote-snapshot hook: off means every layer is downloaded by containerd."""

    enabled: bool = True


@dataclass(slots=True)
class CriConfig:
    """The CRI proxy for kubelet (``snapshotter.cri``): off unless enabled.

    ``address``: the socket kubelet's ``--container-runtime-endpoint`` names;
    ``containerd_address``: containerd's CRI socket every call is forwarded to;
    ``credential_ttl_s``: how long a PullImage's credentials are kept (kubelet sends them
    again with every pull, so an hour covers the pulls and background fills of a start).
    """

    enabled: bool = False
    address: str = DEFAULT_CRI_ADDRESS
    containerd_address: str = DEFAULT_CONTAINERD_CRI
    credential_ttl_s: float = 3600.0


@dataclass(slots=True)
class Config:
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    hosts_dir: str = DEFAULT_HOSTS_DIR
    metrics_address: str | None = None
    log_level: str = "info"
    health_probe_seconds: float = 2.0
    lazy: LazyOptions = field(default_factory=LazyOptions)
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    cri: CriConfig = field(default_factory=CriConfig)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def validate(self) -> Config:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not self.root:
            raise ConfigError("root must not be empty")
        if not self.address:
            raise ConfigError("address must not be empty")
        if self.health_probe_seconds <= 0:
            raise ConfigError("health_probe_seconds must be positive")
        if self.cri.enabled and (not self.cri.address or not self.cri.containerd_address):
            raise ConfigError("cri.address and cri.containerd_address must not be empty")
        if self.cri.credential_ttl_s <= 0:
            raise ConfigError("cri.credential_ttl_s must be positive")
        try:
            self.lazy.validate()
            self.prefetch.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.prefetch.publish_recorded_profiles and not self.lazy.publish_sign_key:
            raise ConfigError("prefetch.publish_recorded_profiles needs lazy.publish_sign_key: nodes use only "
                              "signed profiles")
        return self


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        f = fields.get(key.replace("-", "_"))
        if f is None:
            raise ConfigError(f"unknown config key {where}{key}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} must be a table")
            kwargs[f.name] = _build(type(default), value, f"{where}{key}.")
            continue
        if default is None:  # optional knob (e.g. lazy.store_limit_bytes): any scalar of the TOML kinds
            if not isinstance(value, (int, float, str)) or isinstance(value, bool):
                raise ConfigError(f"config key {where}{key} must be a number or string")
            kwargs[f.name] = value
            continue
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"config key {where}{key} must be {expected.__name__}, got {type(value).__name__}")
        kwargs[f.name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read ``path`` (if any), then apply non-None ``overrides`` (command-line flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {path}: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib decodes before it parses
            raise ConfigError(f"invalid TOML in {path}: not UTF-8 text (byte {exc.start})") from None
    cfg: Config = _build(Config, data, "")
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg.validate()

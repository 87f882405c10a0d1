"""Snapshot records shared by the store, the mount logic and the gRPC layer."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    """Same numbers as ``containerd.services.snapshots.v1.Kind`` on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(slots=True, frozen=True)
class Info:
    """What Stat/List/Update return: the public face of a snapshot."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(slots=True, frozen=True)
class Layer:
    """One snapshot in a parent chain, enough to find its directory."""

    id: int
    name: str
    layer_digest: str | None = None  # set for remote (provider-served) layers
    remote_dir: str | None = None

    @property
    def remote(self) -> bool:
        return self.layer_digest is not None


@dataclass(slots=True, frozen=True)
class Snapshot:
    """An active or view snapshot with its parents, nearest first (what Mounts needs)."""

    id: int
    name: str
    kind: Kind
    parents: tuple[Layer, ...] = ()


@dataclass(slots=True, frozen=True)
class RemoteRecord:
    """A committed snapshot whose content is a provider directory."""

    id: int
    name: str
    layer_digest: str
    remote_dir: str
    labels: dict[str, str]

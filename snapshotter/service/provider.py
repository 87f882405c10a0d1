"""The remote-snapshot hook: who makes a layer's tree available without a download.

The service asks a :class:`LayerProvider` (injected through its constructor) when a
Prepare carries ``containerd.io/snapshot.ref`` plus image identity labels. The FUSE
provider lives in the layers package; here are the protocol, the request record parsed
from labels, and the provider used when remote layers are off.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import grpc

__all__ = ["LABEL_SNAPSHOT_REF", "RemoteLayerRequest", "ProviderError", "LayerProvider", "NoRemoteProvider",
           "parse_remote_request"]

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
# CRI plugin (needs disable_snapshot_annotations = false)
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
# stargz-snapshotter's ctr-remote `images rpull`
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"


@dataclass(slots=True, frozen=True)
class RemoteLayerRequest:
    """One layer containerd is about to unpack, identified from the Prepare labels."""

    key: str
    parent: str
    chain_id: str
    labels: dict[str, str]
    image_ref: str
    layer_digest: str
    manifest_digest: str | None
    image_layers: tuple[str, ...]


class ProviderError(Exception):
    """The layer cannot be served remotely; ``reason`` is short and machine-readable."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or "_".join(message.lower().split())[:48] or "error"


@runtime_checkable
class LayerProvider(Protocol):
    async def provide(self, req: RemoteLayerRequest) -> Path:
        """Make the layer available; return the directory holding its tree."""
        ...

    async def restore(self, layer_digest: str, labels: Mapping[str, str]) -> Path:
        """After a restart: make a previously provided layer available again."""
        ...

    async def release(self, layer_digest: str) -> None:
        """No snapshot uses the layer any more."""
        ...

    async def restore_finished(self, referenced: Collection[str]) -> None:
        """After a restart, once every snapshot's layer was restored (or failed to be):
        ``referenced`` are the layers some snapshot still uses; whatever else the previous
        process left serving (a FUSE holder keeps layers across restarts) can go."""
        ...

    def add_services(self, server: grpc.aio.Server) -> None:
        """Register the provider's own gRPC services on the daemon's socket (the lazy
        provider's ``lazysnap.v1.Control``: recordings and profiles)."""
        ...


class NoRemoteProvider:
    """Remote layers are disabled: every layer is downloaded by containerd."""

    async def provide(self, req: RemoteLayerRequest) -> Path:
        raise ProviderError("remote layers disabled", reason="disabled")

    async def restore(self, layer_digest: str, labels: Mapping[str, str]) -> Path:
        raise ProviderError("remote layers disabled", reason="disabled")

    async def release(self, layer_digest: str) -> None:
        return None

    async def restore_finished(self, referenced: Collection[str]) -> None:
        return None

    def add_services(self, server: grpc.aio.Server) -> None:
        return None


def _split_layers(value: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in value.split(",") if d.strip())


def parse_remote_request(key: str, parent: str, labels: Mapping[str, str]) -> RemoteLayerRequest | None:
    """The request a Prepare describes, or None if it lacks a chain ID or image identity."""
    chain_id = labels.get(LABEL_SNAPSHOT_REF, "")
    if not chain_id:
        return None
    image_ref = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or ""
    layer_digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST) or ""
    if not image_ref or not layer_digest:
        return None
    layers = labels.get(CRI_IMAGE_LAYERS) or labels.get(STARGZ_LAYERS) or ""
    return RemoteLayerRequest(key=key, parent=parent, chain_id=chain_id, labels=dict(labels),
                              image_ref=image_ref, layer_digest=layer_digest,
                              manifest_digest=labels.get(CRI_MANIFEST_DIGEST) or None,
                              image_layers=_split_layers(layers))

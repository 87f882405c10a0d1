"""Publishing a start-up profile: the artifact (the profile, and a pack of its chunks from
this node's store), signed, as ``lazysnap profile push`` and the daemon's recorded first
starts (``[prefetch] publish_recorded_profiles``) both do it.

Nodes use a published profile only if a key they trust signed it
(``snapshotter.registry.signatures``), so the daemon publishes only with a signing key.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.prefetch import pack as packs
from snapshotter.prefetch.profile import ARTIFACT_TYPE, MEDIA_TYPE, Profile, dumps
from snapshotter.registry import Descriptor, RegistryClient
from snapshotter.registry.signatures import push_signature
from snapshotter.store import ChunkStore


@dataclass(slots=True, frozen=True)
class Published:
    artifact: Descriptor
    pushed_bytes: int  # the profile and its pack
    pack_chunks: int  # 0: no pack
    signed: bool


def build_pack(root: Path, store: ChunkStore, profile: Profile) -> tuple[bytes, int] | None:
    """The pack of the profile's chunks found in ``store`` (hashed again before they leave
    it), in first-access order over all layers, with their count; None if there are none.
    Worker thread: it reads and hashes every chunk."""
    from snapshotter.layers.indexes import open_local
    from snapshotter.native import sha256

    order = sorted(((a.first_us, n, lp.digest, a.chunk) for lp in profile.layers
                    for n, a in enumerate(lp.accesses)), key=lambda t: (t[0], t[1]))
    indexes: dict[str, Any] = {}
    found: list[tuple[str, int, bytes]] = []
    try:
        for _, _, layer, chunk in order:
            if layer not in indexes:
                indexes[layer] = open_local(root, layer)
            index = indexes[layer]
            if index is None or not 0 <= chunk < index.chunk_count:
                continue
            digest = index.chunk(chunk).digest
            data = store.read(digest)
            if data is not None and sha256(data) == digest:
                found.append((layer, chunk, data))
    finally:
        for index in indexes.values():
            if index is not None:
                index.close()
    if not found:
        return None
    return packs.build_pack(profile.manifest, found)


async def publish_profile(client: RegistryClient, ref: str, subject: Descriptor, profile: Profile,
                          pack: tuple[bytes, int] | None, signer: Any | None) -> Published:
    """Push the profile (and its pack) as an artifact of ``subject``, signed by ``signer``."""
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    blobs: list[tuple[str, bytes]] = [(MEDIA_TYPE, dumps(profile))]
    if pack is not None:
        blobs.append((packs.MEDIA_TYPE, pack[0]))
    desc = await client.push_artifact(ref, subject=subject, artifact_type=ARTIFACT_TYPE, blobs=blobs,
                                      annotations={"org.opencontainers.image.created": created})
    if signer is not None:
        await push_signature(client, ref, desc.digest, signer)
    return Published(desc, sum(len(b) for _, b in blobs), pack[1] if pack else 0, signer is not None)

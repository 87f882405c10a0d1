"""Finding an image's profile: the daemon's root first, then the image's registry.

A published profile is a referrer of the image manifest, used only if someone the node
trusts vouches for it (a cosign signature by one of ``[lazy] trusted_keys``, as for
published indexes: a profile cannot change a byte an image serves, but it decides what a
node fetches first and how much); its profile blob is size-capped on download and must
name exactly this manifest. It may carry a pack (``prefetch.pack``) as a second blob:
only its descriptor is looked at here, the prefetcher streams it. Whatever is wrong with a profile, the caller gets None
and a ``profile_rejected`` log line: an image starts without a profile, never with a bad one.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.log import get_logger
from snapshotter.prefetch import metrics
from snapshotter.prefetch import pack as packs
from snapshotter.prefetch.profile import (
    ARTIFACT_TYPE,
    MAX_PROFILE_BYTES,
    MEDIA_TYPE,
    Profile,
    ProfileError,
    load,
    loads,
    save,
)
from snapshotter.registry.signatures import Voucher


log = get_logger("lazysnap.prefetch")
CREATED = "org.opencontainers.image.created"
MAX_ARTIFACTS = 16  # profile artifacts of one image looked at, newest first


@dataclass(slots=True, frozen=True)
class PackRef:
    digest: str
    size: int


@dataclass(slots=True, frozen=True)
class Found:
    profile: Profile
    source: str  # "local" | artifact digest
    pack: PackRef | None = None  # only for a profile fetched from the registry
    vouched: str = "local"  # who vouched for a published one: "signed:<key fingerprint>"
    ref: str = ""  # where a published one was found (its pack is there too)


async def published_profile(client: Any, ref: str, manifest: str, voucher: Voucher) -> Found | None:
    """The newest usable profile artifact referring to ``manifest`` (profile, artifact, pack),
    or None. Artifacts are tried newest first (``MAX_ARTIFACTS`` at most): one that is not
    vouched for, malformed, too large or for another image is logged (``profile_rejected``)
    and the next one is tried, so a bad newer artifact cannot hide a good older one.
    Raises ``ProfileError`` if artifacts were found and none was usable."""
    arts = await client.referrers(ref, manifest, ARTIFACT_TYPE)
    if not arts:
        return None
    arts.sort(key=lambda d: d.annotations.get(CREATED, ""), reverse=True)
    reasons: list[str] = []
    for art in arts[:MAX_ARTIFACTS]:
        try:
            vouched = await voucher.vouch(client, ref, art.digest)
            if vouched is None:
                raise ProfileError(f"artifact {art.digest} is not signed by a trusted key")
            return await _profile_of(client, ref, manifest, art.digest, vouched)
        except ProfileError as exc:
            reason = str(exc).splitlines()[0][:300]
            reasons.append(reason)
            metrics.PROFILE_LOOKUPS.labels("rejected").inc()
            log.warning("profile_rejected", source="registry", image=ref, manifest=manifest,
                        artifact=art.digest, reason=reason)
    raise ProfileError(f"none of {min(len(arts), MAX_ARTIFACTS)} profile artifact(s) is usable: {reasons[0]}")


async def _profile_of(client: Any, ref: str, manifest: str, artifact: str, vouched: str) -> Found:
    body, _, _ = await client.get_manifest(ref, artifact)
    try:
        doc = json.loads(body)
        layers = [d for d in doc.get("layers") or [] if d.get("mediaType") == MEDIA_TYPE]
        pack_layers = [d for d in doc.get("layers") or [] if d.get("mediaType") == packs.MEDIA_TYPE]
        subject = (doc.get("subject") or {}).get("digest")
    except (ValueError, AttributeError) as exc:
        raise ProfileError(f"artifact {artifact} is not a manifest: {exc}") from None
    if subject != manifest:
        raise ProfileError(f"artifact {artifact} has subject {subject}, not {manifest}")
    if len(layers) != 1:
        raise ProfileError(f"artifact {artifact} has {len(layers)} profile blobs, expected 1")
    size = int(layers[0].get("size") or 0)
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"published profile is {size} bytes, over the {MAX_PROFILE_BYTES}-byte limit")
    data = await client.fetch_blob(ref, str(layers[0]["digest"]), MAX_PROFILE_BYTES, purpose="profile")
    pack = None
    if len(pack_layers) == 1:
        try:
            pack = PackRef(str(pack_layers[0]["digest"]), int(pack_layers[0]["size"]))
        except (KeyError, TypeError, ValueError):
            log.warning("pack_rejected", image=ref, manifest=manifest, reason="bad descriptor")
    return Found(loads(data, expect_manifest=manifest), artifact, pack, vouched, ref)


async def first_published(client: Any, refs: Sequence[str], manifest: str, voucher: Voucher, *,
                          tolerate: Callable[[str, Exception], None] | None = None,
                          ) -> tuple[Found | None, ProfileError | None]:
    """The first usable published profile in ``refs``, tried in turn (the image's repository,
    then the share registry's), and the first rejection met on the way: a place whose
    artifacts are all rejected does not hide a usable one in the next. Any other error is
    handed to ``tolerate`` (the daemon logs it and tries the next place) or, without it,
    raised (the CLI reports it)."""
    rejected: ProfileError | None = None
    for ref in refs:
        try:
            found = await published_profile(client, ref, manifest, voucher)
        except ProfileError as exc:
            rejected = rejected or exc
            continue
        except Exception as exc:  # noqa: BLE001 - handed to tolerate, or raised
            if tolerate is None:
                raise
            tolerate(ref, exc)
            continue
        if found is not None:
            return found, rejected
    return None, rejected


async def find(root: Path, client: Any, refs: Sequence[str], manifest: str, voucher: Voucher, *,
               registry: bool = True) -> Found | None:
    """Local profile, else the published one vouched for by ``voucher`` (cached locally)
    with its pack, looked for in each of ``refs`` in turn (the image's repository, then the
    share registry's); None if none is usable."""
    try:
        p = await asyncio.to_thread(load, root, manifest)
    except (ProfileError, OSError) as exc:
        metrics.PROFILE_LOOKUPS.labels("rejected").inc()
        log.warning("profile_rejected", source="local", manifest=manifest, reason=str(exc).splitlines()[0][:300])
        p = None
    if p is not None:
        metrics.PROFILE_LOOKUPS.labels("local").inc()
        log.info("profile_found", source="local", manifest=manifest, chunks=p.chunks, bytes=p.bytes,
                 recordings=p.recordings)
        return Found(p, "local")
    if not registry or client is None:
        metrics.PROFILE_LOOKUPS.labels("none").inc()
        return None

    def tolerate(ref: str, exc: Exception) -> None:  # no profile is never a reason to fail a start
        log.warning("profile_lookup_failed", source="registry", image=ref, manifest=manifest,
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")

    found, rejected = await first_published(client, refs, manifest, voucher, tolerate=tolerate)
    if found is None:
        if rejected is None:  # each rejected artifact was logged and counted
            metrics.PROFILE_LOOKUPS.labels("none").inc()
            log.info("profile_not_found", image=refs[0], manifest=manifest)
        return None
    p, art = found.profile, found.source
    metrics.PROFILE_LOOKUPS.labels("registry").inc()
    log.info("profile_found", source="registry", image=found.ref, manifest=manifest, artifact=art,
             vouched=found.vouched, chunks=p.chunks,
             bytes=p.bytes, recordings=p.recordings, pack_bytes=found.pack.size if found.pack else 0)
    try:
        await asyncio.to_thread(save, root, p)
    except (OSError, ProfileError) as exc:
        log.warning("profile_cache_failed", manifest=manifest, error=str(exc))
    return found

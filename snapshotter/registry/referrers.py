"""Pushing artifacts and finding them again: blob upload, manifest PUT, referrers.

lazysnap publishes layer indexes and start-up profiles as OCI artifacts whose
``subject`` is the image manifest. Registries with the referrers API
(``GET /v2/<name>/referrers/<digest>``) list them directly; for the others (Debian's
docker-registry 2.8 among them) we maintain the OCI fallback tag ``sha256-<hex>``: an
image index whose ``manifests`` are the referrers.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from snapshotter.log import get_logger
from snapshotter.registry.errors import NotFoundError, ProtocolError
from snapshotter.registry.manifest import (
    EMPTY_JSON,
    INDEX_TYPES,
    MAX_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    parse_json,
    sha256_digest,
)
from snapshotter.registry.reference import Reference, as_reference, check_digest

T = TypeVar("T")


class RegistryTransport(Protocol):
    """What publishing and finding referrers needs of the registry client
    (``RegistryClient``): its requests with mirror fall-through and auth, its retry
    policy, its bounded body reads, manifests, and one lock per fallback tag."""

    fallback_tag_locks: dict[str, asyncio.Lock]

    def request(self, ref: Reference, method: str, path: str, *, purpose: str, capability: str = ...,
                headers: dict[str, str] | None = ..., data: bytes | None = ..., blob: str | None = ...,
                ok: tuple[int, ...] = ...) -> AbstractAsyncContextManager[tuple[Any, Any]]: ...

    async def retrying(self, ref: Reference, digest: str, what: str, op: Callable[[], Awaitable[T]]) -> T: ...

    async def read_body(self, resp: Any, purpose: str, limit: int) -> bytes: ...

    async def get_manifest(self, ref: str | Reference, obj: str | None = None) -> tuple[bytes, str, str]: ...

log = get_logger("lazysnap.registry")

FALLBACK_ATTEMPTS = 5  # writes of one entry into a fallback tag that concurrent writers keep undoing
FALLBACK_SETTLE_S = 0.1  # then jittered up to twice that: how long a concurrent PUT may take to land


def fallback_tag(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}-{hexpart}"[:128]


async def push_blob(client: RegistryTransport, ref: str | Reference, data: bytes,
                    media_type: str = "application/octet-stream") -> Descriptor:
    """Upload a blob (monolithic POST + PUT) unless the registry already has it."""
    r = as_reference(ref)
    desc = Descriptor.for_bytes(media_type, data)
    path = f"/{r.repository}/blobs/{desc.digest}"

    async def exists() -> bool:
        try:
            async with client.request(r, "HEAD", path, purpose="push", capability="push",
                                  blob=desc.digest, ok=(200,)):
                return True
        except NotFoundError:
            return False

    async def upload() -> None:
        async with client.request(r, "POST", f"/{r.repository}/blobs/uploads/", purpose="push",
                              capability="push", data=b"", ok=(202,)) as (ep, resp):
            location = resp.headers.get("Location")
            await resp.read()
        if not location:
            raise ProtocolError("upload started without a Location", host=ep.host, repo=r.repository)
        url = urljoin(ep.url("/"), location)
        sep = "&" if urlsplit(url).query else "?"
        async with client.request(r, "PUT", f"{url}{sep}digest={desc.digest}", purpose="push",
                              capability="push", data=data, ok=(201, 204),
                              headers={"Content-Type": "application/octet-stream"}) as (_, resp):
            await resp.read()

    if not await client.retrying(r, desc.digest, "blob exists", exists):
        await client.retrying(r, desc.digest, "blob upload", upload)
    return desc


async def push_manifest(client: RegistryTransport, ref: str | Reference, manifest: bytes | dict[str, Any],
                        media_type: str | None = None, *, tag: str | None = None) -> Descriptor:
    """PUT a manifest by tag (``tag`` or the ref's tag) or by digest; returns its descriptor."""
    desc, _ = await put_manifest(client, as_reference(ref), manifest, media_type, tag=tag)
    return desc


async def put_manifest(client: RegistryTransport, r: Reference, manifest: bytes | dict[str, Any],
                        media_type: str | None, *, tag: str | None) -> tuple[Descriptor, bool]:
    body = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
    doc = parse_json(body, "manifest")
    mt = media_type or doc.get("mediaType") or OCI_MANIFEST
    desc = Descriptor(mt, sha256_digest(body), len(body), artifact_type=doc.get("artifactType"),
                      annotations=dict(doc.get("annotations") or {}))
    target = tag or r.tag or desc.digest
    if r.digest and not tag:
        target = desc.digest

    async def put() -> bool:
        async with client.request(r, "PUT", f"/{r.repository}/manifests/{target}", purpose="push",
                              capability="push", data=body, ok=(201, 200),
                              headers={"Content-Type": mt}) as (_, resp):
            await resp.read()
            return "OCI-Subject" in resp.headers

    has_subject_support = await client.retrying(r, desc.digest, "manifest push", put)
    return desc, has_subject_support


async def push_artifact(client: RegistryTransport, ref: str | Reference, *, subject: Descriptor,
                        artifact_type: str, blobs: list[tuple[Any, ...]],
                        annotations: dict[str, str] | None = None) -> Descriptor:
    """Publish an artifact referring to ``subject``; return its manifest descriptor.

    ``blobs`` are ``(media_type, data)`` or ``(media_type, data, annotations)``
    tuples, one layer each. The manifest is pushed by digest; when the registry does
    not confirm the subject (no ``OCI-Subject`` header), the ``sha256-<hex>``
    fallback index is updated so ``referrers`` finds it.
    """
    r = as_reference(ref)
    check_digest(subject.digest)
    await push_blob(client, r, EMPTY_JSON, OCI_EMPTY)
    layers = []
    for item in blobs:
        media_type, data = item[0], item[1]
        ann = dict(item[2]) if len(item) > 2 and item[2] else {}
        d = await push_blob(client, r, data, media_type)
        layers.append(Descriptor(media_type, d.digest, d.size, annotations=ann).to_dict())
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": 2},
        "layers": layers,
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    pinned = Reference(r.registry, r.repository, None, None)
    desc, supported = await put_manifest(client, pinned, manifest, OCI_MANIFEST, tag=None)
    desc = Descriptor(OCI_MANIFEST, desc.digest, desc.size, annotations=dict(annotations or {}),
                      artifact_type=artifact_type)
    if not supported:
        await _add_to_fallback(client, r, subject.digest, desc)
    log.info("artifact_pushed", host=r.registry, repo=r.repository, subject=subject.digest,
             artifact=desc.digest, artifact_type=artifact_type, fallback_tag=not supported)
    return desc


async def _add_to_fallback(client: RegistryTransport, r: Reference, subject: str, desc: Descriptor) -> None:
    """Add ``desc`` to the fallback tag: a read-modify-write the registry cannot make atomic
    (no conditional manifest PUT in the distribution API). Writers in this process take
    turns; against other writers (other nodes, a CLI), the tag is read again after a settle
    and the entry merged in again while it is missing, so two artifacts published at the
    same instant are both listed."""
    tag = fallback_tag(subject)
    lock = client.fallback_tag_locks.setdefault(f"{r.registry}/{r.repository}@{subject}", asyncio.Lock())
    async with lock:
        for attempt in range(1, FALLBACK_ATTEMPTS + 1):
            index = await _fallback_index(client, r, tag)
            if attempt > 1 and desc.digest in _digests(index):
                return  # listed (re-read after the settle below)
            if attempt > 1:
                log.info("fallback_tag_rewrite", host=r.registry, repo=r.repository, tag=tag,
                         artifact=desc.digest, attempt=attempt, reason="a concurrent writer dropped the entry")
            manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict) and m.get("digest") != desc.digest]
            manifests.append(desc.to_dict())
            index["manifests"] = manifests
            await put_manifest(client, r, index, OCI_INDEX, tag=tag)
            # a writer that read the tag before our PUT lands its own PUT within a round trip
            await asyncio.sleep(FALLBACK_SETTLE_S * (1 + random.random()))
        if desc.digest not in _digests(await _fallback_index(client, r, tag)):
            raise ProtocolError(f"tag {tag} keeps losing artifact {desc.digest} to concurrent writers "
                                f"({FALLBACK_ATTEMPTS} attempts)", host=r.registry, repo=r.repository)


async def _fallback_index(client: RegistryTransport, r: Reference, tag: str) -> dict[str, Any]:
    try:
        body, mt, _ = await client.get_manifest(r, tag)
    except NotFoundError:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index = parse_json(body, "referrers index")
    if mt not in INDEX_TYPES:
        raise ProtocolError(f"tag {tag} is not an image index", host=r.registry, repo=r.repository)
    return index


def _digests(index: dict[str, Any]) -> set[str]:
    return {m.get("digest") for m in index.get("manifests") or [] if isinstance(m, dict)}


async def referrers(client: RegistryTransport, ref: str | Reference, subject_digest: str,
                    artifact_type: str | None = None) -> list[Descriptor]:
    """Artifacts whose subject is ``subject_digest`` (referrers API, else fallback tag)."""
    r = as_reference(ref)
    check_digest(subject_digest)
    query = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""

    async def api() -> dict[str, Any] | None:
        try:
            async with client.request(r, "GET", f"/{r.repository}/referrers/{subject_digest}{query}",
                                  purpose="referrers", headers={"Accept": OCI_INDEX},
                                  ok=(200,)) as (_, resp):
                return parse_json(await client.read_body(resp, "referrers", MAX_MANIFEST), "referrers")
        except NotFoundError:
            return None

    index = await client.retrying(r, subject_digest, "referrers", api)
    if index is None:
        try:
            body, _, _ = await client.get_manifest(r, fallback_tag(subject_digest))
        except NotFoundError:
            return []
        index = parse_json(body, "referrers index")
    found = [Descriptor.from_dict(m) for m in index.get("manifests") or []]
    if artifact_type:
        found = [d for d in found if d.artifact_type == artifact_type]
    return found

"""Manifests and descriptors: OCI and Docker media types, index → platform selection.

Only what lazysnap needs: layers (with digests, sizes, annotations) and the config
(``rootfs.diff_ids``). Unknown fields are kept in the raw dict the caller gets.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from snapshotter.registry.errors import PlatformError, ProtocolError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
MAX_MANIFEST = 4 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(slots=True, frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    platform: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        try:
            return cls(media_type=str(d.get("mediaType", "")), digest=str(d["digest"]),
                       size=int(d["size"]), annotations=dict(d.get("annotations") or {}),
                       artifact_type=d.get("artifactType"), platform=d.get("platform"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed descriptor: {exc}") from None

    @classmethod
    def for_bytes(cls, media_type: str, data: bytes, **kw: Any) -> Descriptor:
        return cls(media_type, sha256_digest(data), len(data), **kw)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


@dataclass(slots=True)
class ResolvedImage:
    """A reference resolved to one platform's manifest and config."""

    reference: str
    manifest_digest: str
    media_type: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    config: dict[str, Any]
    layers: list[Descriptor]
    index_digest: str | None = None

    @property
    def diff_ids(self) -> list[str]:
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def manifest_descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.manifest_digest, len(self.manifest_bytes))


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def media_type_of(doc: dict[str, Any], header: str | None) -> str:
    """The media type from the document, else Content-Type, else by shape."""
    mt = doc.get("mediaType") or (header or "").split(";")[0].strip()
    if mt in MANIFEST_TYPES or mt in INDEX_TYPES:
        return mt
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    raise ProtocolError(f"unsupported manifest media type {mt!r}")


def parse_platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PlatformError(f"invalid platform {text!r} (want os/arch[/variant])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def select_platform(index: dict[str, Any], platform: str) -> Descriptor:
    """Pick the manifest for ``platform`` from an image index (exact variant first)."""
    want_os, want_arch, want_var = parse_platform(platform)
    candidates = []
    seen = []
    for d in index.get("manifests") or []:
        desc = Descriptor.from_dict(d)
        p = desc.platform or {}
        seen.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x))
        if p.get("os") != want_os or p.get("architecture") != want_arch:
            continue
        var = p.get("variant") or _DEFAULT_VARIANT.get(want_arch)
        want = want_var or _DEFAULT_VARIANT.get(want_arch)
        rank = 0 if var == want else 1
        candidates.append((rank, desc))
    if not candidates:
        raise PlatformError(f"no manifest for platform {platform}; index has: "
                            + (", ".join(s for s in seen if s) or "none"))
    candidates.sort(key=lambda c: c[0])
    if want_var and candidates[0][0] != 0:
        raise PlatformError(f"no manifest for platform {platform}")
    return candidates[0][1]


def layers_of(manifest: dict[str, Any]) -> list[Descriptor]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ProtocolError("manifest has no layers list")
    return [Descriptor.from_dict(d) for d in layers]


def config_of(manifest: dict[str, Any]) -> Descriptor:
    cfg = manifest.get("config")
    if not isinstance(cfg, dict):
        raise ProtocolError("manifest has no config descriptor")
    return Descriptor.from_dict(cfg)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()

"""Cosign signatures on lazysnap's artifacts: sign when publishing, verify before trusting.

A published index decides which bytes of a layer every file serves, so a node may use one
only if someone it trusts vouches for it. We use cosign's key-based format, unchanged, so
the fleet's existing tooling works both ways: ``cosign verify --key cosign.pub
<repo>@<artifact digest>`` accepts what ``lazysnap index --push --sign-key`` signs, and
lazysnap accepts what ``cosign sign --key`` signs.

The format (sigstore/cosign "simple signing", tag scheme): the signatures of manifest
``sha256:<hex>`` live in the manifest tagged ``sha256-<hex>.sig`` in the same repository;
each of its layers is a payload blob (``application/vnd.dev.cosign.simplesigning.v1+json``)
naming the signed manifest digest, with the base64 signature of the payload's bytes in the
``dev.cosignproject.cosign/signature`` annotation (ECDSA P-256 / SHA-256 for cosign's
default keys; RSA and Ed25519 keys verify too).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.log import get_logger
from snapshotter.registry.errors import NotFoundError, RegistryError
from snapshotter.registry.manifest import OCI_MANIFEST, Descriptor, canonical_json

if TYPE_CHECKING:
    from snapshotter.registry.client import RegistryClient

log = get_logger("lazysnap.signatures")

PAYLOAD_MEDIA = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
MAX_PAYLOAD = 64 << 10  # a payload is a few hundred bytes; anything larger is not one
MAX_SIGNATURES = 64  # layers of one signature manifest we look at


class SignatureError(ValueError):
    """A key or signature that cannot be used (one line, for the operator)."""


def signature_tag(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}-{hexpart}.sig"


@dataclass(slots=True, frozen=True)
class TrustedKey:
    """A public key the node trusts, named by its file and fingerprint in logs."""

    name: str
    fingerprint: str  # sha256 of the DER SubjectPublicKeyInfo, first 16 hex digits
    key: Any  # cryptography public key

    def verifies(self, payload: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, payload)
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


def load_public_key(path: str | Path) -> TrustedKey:
    from cryptography.hazmat.primitives import serialization

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SignatureError(f"trusted key {p}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"trusted key {p}: not a PEM public key ({exc})") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(str(p), hashlib.sha256(der).hexdigest()[:16], key)


def load_public_keys(paths: list[str]) -> list[TrustedKey]:
    return [load_public_key(p) for p in paths]


def load_private_key(path: str | Path) -> Any:
    """A PEM private key (PKCS#8 or SEC1); encrypted ones take ``COSIGN_PASSWORD``.

    cosign's own encrypted key format is not read: sign with an openssl-made key
    (``openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256``) and give nodes
    its public half (``openssl pkey -pubout``), which cosign reads as well."""
    from cryptography.hazmat.primitives import serialization

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SignatureError(f"signing key {p}: {exc.strerror or exc}") from None
    if b"SIGSTORE PRIVATE KEY" in data:
        raise SignatureError(f"signing key {p}: cosign's encrypted key format is not supported; "
                             "use a PEM (PKCS#8) key")
    password = os.environ.get("COSIGN_PASSWORD")
    try:
        return serialization.load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {p}: {exc}") from None


def payload_for(manifest_digest: str, repository: str) -> bytes:
    body = {"critical": {"identity": {"docker-reference": repository},
                         "image": {"docker-manifest-digest": manifest_digest},
                         "type": PAYLOAD_TYPE},
            "optional": None}
    return json.dumps(body, separators=(",", ":")).encode()


def sign_payload(private_key: Any, payload: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(payload)
    raise SignatureError(f"signing key type {type(private_key).__name__} is not supported")


def signed_digest(payload: bytes) -> str | None:
    """The manifest digest a cosign payload vouches for, or None if it is not one."""
    try:
        body = json.loads(payload)
        critical = body["critical"]
        if critical["type"] != PAYLOAD_TYPE:
            return None
        digest = critical["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


async def push_signature(client: RegistryClient, ref: str, manifest_digest: str, private_key: Any) -> Descriptor:
    """Sign ``manifest_digest`` and add the signature to its ``.sig`` manifest (kept ones stay)."""
    from snapshotter.registry.reference import as_reference

    r = as_reference(ref)
    repository = f"{r.registry}/{r.repository}"
    payload = payload_for(manifest_digest, repository)
    sig = base64.b64encode(sign_payload(private_key, payload)).decode()
    pdesc = await client.push_blob(ref, payload, PAYLOAD_MEDIA)
    layers = [d for d in await _signature_layers(client, ref, manifest_digest)
              if d.get("annotations", {}).get(SIGNATURE_ANNOTATION) != sig]
    layers.append({"mediaType": PAYLOAD_MEDIA, "size": pdesc.size, "digest": pdesc.digest,
                   "annotations": {SIGNATURE_ANNOTATION: sig}})
    config = canonical_json({"architecture": "", "os": "", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]}})
    cdesc = await client.push_blob(ref, config, CONFIG_MEDIA)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": CONFIG_MEDIA, "size": cdesc.size, "digest": cdesc.digest},
                "layers": layers}
    return await client.push_manifest(ref, manifest, OCI_MANIFEST, tag=signature_tag(manifest_digest))


async def _signature_layers(client: RegistryClient, ref: str, manifest_digest: str) -> list[dict[str, Any]]:
    try:
        body, _, _ = await client.get_manifest(ref, signature_tag(manifest_digest))
    except NotFoundError:
        return []
    try:
        layers = json.loads(body).get("layers") or []
    except (ValueError, AttributeError):
        return []
    return [d for d in layers if isinstance(d, dict) and d.get("mediaType") == PAYLOAD_MEDIA][:MAX_SIGNATURES]


async def verified_by(client: RegistryClient, ref: str, manifest_digest: str,
                      keys: list[TrustedKey]) -> TrustedKey | None:
    """The first trusted key with a valid signature of ``manifest_digest``, else None."""
    if not keys:
        return None
    for layer in await _signature_layers(client, ref, manifest_digest):
        sig_b64 = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        digest = layer.get("digest")
        if not isinstance(sig_b64, str) or not isinstance(digest, str):
            continue
        try:
            signature = base64.b64decode(sig_b64, validate=True)
            payload = await client.fetch_blob(ref, digest, MAX_PAYLOAD, purpose="index")
        except (ValueError, OSError, RegistryError) as exc:
            log.warning("signature_unreadable", artifact=manifest_digest, payload=digest, error=str(exc))
            continue
        if signed_digest(payload) != manifest_digest:
            continue  # a signature of something else, copied here
        for key in keys:
            if key.verifies(payload, signature):
                return key
    return None


@dataclass(slots=True, frozen=True)
class Voucher:
    """Who may vouch for a published artifact that is not pinned by digest (a profile):
    in ``signed`` mode a cosign signature by one of ``keys``; in ``pinned`` and
    ``local-only`` mode nobody, so such artifacts are not used at all. ``unverified``
    vouches for anything: only for showing what is published (``lazysnap profile show``
    without keys), never for what a node uses."""

    mode: str
    keys: tuple[TrustedKey, ...] = ()

    async def vouch(self, client: RegistryClient, ref: str, artifact: str) -> str | None:
        """``signed:<key fingerprint>`` (or ``unverified``) if the artifact is vouched for,
        else None."""
        if self.mode == "unverified":
            return "unverified"
        if self.mode != "signed" or not self.keys:
            return None
        key = await verified_by(client, ref, artifact, list(self.keys))
        return None if key is None else f"signed:{key.fingerprint}"

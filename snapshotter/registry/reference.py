"""Image references: ``[host[:port]/]repo[:tag][@sha256:…]`` with Docker Hub defaults.

Parsing follows the distribution reference grammar closely enough for real-world refs:
the first component is a host when it has a ``.`` or ``:`` or is ``localhost``;
Docker Hub names get ``library/`` and the API host ``registry-1.docker.io``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from snapshotter.registry.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")


def valid_digest(digest: str) -> bool:
    return bool(_DIGEST_RE.match(digest))


def check_digest(digest: str) -> str:
    if not valid_digest(digest):
        raise InvalidReferenceError(f"invalid digest {digest[:80]!r}")
    return digest


@dataclass(slots=True, frozen=True)
class Reference:
    """A parsed reference. ``registry`` is the name users write (``docker.io``,
    ``127.0.0.1:5000``); ``repository`` the full path; ``tag``/``digest`` optional."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        s = text.strip()
        if not s or any(c.isspace() for c in s):
            raise InvalidReferenceError(f"invalid image reference {text!r}")
        s = s.removeprefix("docker://")
        digest = None
        if "@" in s:
            s, digest = s.split("@", 1)
            check_digest(digest)
        first, sep, rest = s.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, remainder = first, rest
        else:
            registry, remainder = DOCKER_HUB, s
        tag = None
        slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > slash:
            remainder, tag = remainder[:colon], remainder[colon + 1:]
            if not _TAG_RE.match(tag):
                raise InvalidReferenceError(f"invalid tag {tag!r} in {text!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in remainder:
                remainder = f"library/{remainder}"
        if not _REPO_RE.match(remainder):
            raise InvalidReferenceError(f"invalid repository name {remainder!r} in {text!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, remainder, tag, digest)

    @property
    def api_host(self) -> str:
        """The host serving the registry API when no hosts.toml says otherwise."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def object(self) -> str:
        """What to put after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def as_reference(ref: str | Reference) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def shared_in(ref: str | Reference, share: str) -> str:
    """``ref``'s repository under ``share`` (``host[:port][/prefix]``): where a node that may
    not push to the image's own repository publishes what it learns of the image (indexes,
    start-up profiles), and where nodes look for them after the image's own repository
    (``[lazy] share_registry``). The artifacts name the image's manifest as their subject."""
    r = as_reference(ref)
    host, _, prefix = share.strip().strip("/").partition("/")
    return str(Reference(host, f"{prefix}/{r.repository}" if prefix else r.repository, r.tag, r.digest))


def places(ref: str, share: str) -> list[str]:
    """Where what nodes learn of ``ref`` is published and looked for: its own repository,
    then the share registry's copy of that repository path when ``share`` is set. Publishers
    push to the last place."""
    return [ref, shared_in(ref, share)] if share else [ref]


def check_share_registry(share: str) -> str:
    """``share`` if it is ``host[:port][/prefix]`` with a registry host, else
    InvalidReferenceError."""
    text = share.strip().strip("/")
    host = text.partition("/")[0]
    if not ("." in host or ":" in host or host == "localhost"):
        raise InvalidReferenceError(f"share_registry {share!r} must start with a registry host "
                                    "(host[:port][/prefix])")
    Reference.parse(f"{text}/probe")  # the prefix must be a repository path
    return share

"""Which build this is: the package version from its installed metadata (the one truth:
``pyproject.toml`` at install time), the Python running it and the C core's build options.

The daemon reports it in its first log line, in the health service's response metadata
(``lazysnap-version``) and as ``lazysnap_build_info``; ``lazysnap --version`` and
``lazysnap version --json`` print it.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from importlib import metadata

__all__ = ["DIST_NAME", "METADATA_KEY", "VersionInfo", "package_version", "version_info"]

DIST_NAME = "lazysnap"
METADATA_KEY = "lazysnap-version"  # gRPC metadata key on the health service's answers
UNKNOWN = "0+unknown"  # running from a tree that was never installed


def package_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return UNKNOWN


@dataclass(slots=True, frozen=True)
class VersionInfo:
    version: str
    python: str
    python_implementation: str
    core: dict[str, object]  # snapshotter.native.BuildInfo as a dict

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def version_info() -> VersionInfo:
    """Everything ``lazysnap version --json`` prints (imports the C core)."""
    from snapshotter.native import build_info

    return VersionInfo(package_version(), platform.python_version(), platform.python_implementation(),
                       asdict(build_info()))

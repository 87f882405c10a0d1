"""Kubernetes credentials for lazy pulls: a CRI v1 proxy between kubelet and containerd
that keeps each PullImage's registry credentials in memory (``lazysnap serve --cri-proxy``;
kubelet and containerd settings in deploy/kubernetes/cri-proxy.md)."""
from __future__ import annotations

from snapshotter.cri.credentials import CriCredentials, from_auth_config

__all__ = ["CriCredentials", "from_auth_config"]

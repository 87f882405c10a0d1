"""Between the wire messages and the service's own records."""
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.service.model import Info, Kind
from snapshotter.service.mounts import Mount

__all__ = ["info_to_pb", "info_from_pb", "mounts_to_pb"]


def _ts(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=info.kind.name, created_at=_ts(info.created_ns),
                   updated_at=_ts(info.updated_ns), labels=info.labels)


def info_from_pb(msg: pb.Info) -> Info:
    return Info(name=msg.name, parent=msg.parent, kind=Kind(msg.kind) if msg.kind in Kind._value2member_map_
                else Kind.UNKNOWN, created_ns=msg.created_at.ToNanoseconds(), updated_ns=msg.updated_at.ToNanoseconds(),
                labels=dict(msg.labels))


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]

"""The committed generated code matches proto/ and the wire layout in DESIGN.md."""
from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as FD

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.types import mount_pb2

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "api"
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen-proto"), "--out", str(out)], check=True,
                   capture_output=True)
    committed = REPO / "snapshotter" / "api"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    have = sorted(p.relative_to(committed) for p in committed.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == have, "file set differs: run scripts/gen-proto"
    stale = [str(p) for p in fresh if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code (run scripts/gen-proto): {stale}"


# (message, field number, name, type, repeated) straight from DESIGN.md's table
S, I64, MSG, ENUM = FD.TYPE_STRING, FD.TYPE_INT64, FD.TYPE_MESSAGE, FD.TYPE_ENUM
EXPECTED: dict[str, list[tuple[int, str, int, bool]]] = {
    "PrepareSnapshotRequest": [(1, "snapshotter", S, False), (2, "key", S, False), (3, "parent", S, False),
                               (4, "labels", MSG, True)],
    "ViewSnapshotRequest": [(1, "snapshotter", S, False), (2, "key", S, False), (3, "parent", S, False),
                            (4, "labels", MSG, True)],
    "PrepareSnapshotResponse": [(1, "mounts", MSG, True)],
    "ViewSnapshotResponse": [(1, "mounts", MSG, True)],
    "MountsResponse": [(1, "mounts", MSG, True)],
    "MountsRequest": [(1, "snapshotter", S, False), (2, "key", S, False)],
    "RemoveSnapshotRequest": [(1, "snapshotter", S, False), (2, "key", S, False)],
    "StatSnapshotRequest": [(1, "snapshotter", S, False), (2, "key", S, False)],
    "UsageRequest": [(1, "snapshotter", S, False), (2, "key", S, False)],
    "CommitSnapshotRequest": [(1, "snapshotter", S, False), (2, "name", S, False), (3, "key", S, False),
                              (4, "labels", MSG, True), (5, "parent", S, False)],
    "StatSnapshotResponse": [(1, "info", MSG, False)],
    "UpdateSnapshotResponse": [(1, "info", MSG, False)],
    "UpdateSnapshotRequest": [(1, "snapshotter", S, False), (2, "info", MSG, False), (3, "update_mask", MSG, False)],
    "ListSnapshotsRequest": [(1, "snapshotter", S, False), (2, "filters", S, True)],
    "ListSnapshotsResponse": [(1, "info", MSG, True)],
    "UsageResponse": [(1, "size", I64, False), (2, "inodes", I64, False)],
    "CleanupRequest": [(1, "snapshotter", S, False)],
    "Info": [(1, "name", S, False), (2, "parent", S, False), (3, "kind", ENUM, False), (4, "created_at", MSG, False),
             (5, "updated_at", MSG, False), (6, "labels", MSG, True)],
}


def _fields(desc) -> list[tuple[int, str, int, bool]]:  # noqa: ANN001
    return sorted((f.number, f.name, f.type, f.is_repeated) for f in desc.fields)


def test_messages_match_design_table() -> None:
    assert pb.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    for name, fields in EXPECTED.items():
        assert _fields(pb.DESCRIPTOR.message_types_by_name[name]) == sorted(fields), name
    info = pb.DESCRIPTOR.message_types_by_name["Info"]
    assert info.fields_by_name["created_at"].message_type.full_name == "google.protobuf.Timestamp"
    assert pb.DESCRIPTOR.message_types_by_name["UpdateSnapshotRequest"].fields_by_name[
        "update_mask"].message_type.full_name == "google.protobuf.FieldMask"
    assert {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["Kind"].values} == {
        "UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}
    assert mount_pb2.DESCRIPTOR.package == "containerd.types"
    assert _fields(mount_pb2.Mount.DESCRIPTOR) == [(1, "type", S, False), (2, "source", S, False),
                                                   (3, "target", S, False), (4, "options", S, True)]


def test_service_methods() -> None:
    svc = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    methods = {m.name: (m.input_type.name, m.output_type.full_name, m.server_streaming) for m in svc.methods}
    assert methods == {
        "Prepare": ("PrepareSnapshotRequest", "containerd.services.snapshots.v1.PrepareSnapshotResponse", False),
        "View": ("ViewSnapshotRequest", "containerd.services.snapshots.v1.ViewSnapshotResponse", False),
        "Mounts": ("MountsRequest", "containerd.services.snapshots.v1.MountsResponse", False),
        "Commit": ("CommitSnapshotRequest", "google.protobuf.Empty", False),
        "Remove": ("RemoveSnapshotRequest", "google.protobuf.Empty", False),
        "Stat": ("StatSnapshotRequest", "containerd.services.snapshots.v1.StatSnapshotResponse", False),
        "Update": ("UpdateSnapshotRequest", "containerd.services.snapshots.v1.UpdateSnapshotResponse", False),
        "List": ("ListSnapshotsRequest", "containerd.services.snapshots.v1.ListSnapshotsResponse", True),
        "Usage": ("UsageRequest", "containerd.services.snapshots.v1.UsageResponse", False),
        "Cleanup": ("CleanupRequest", "google.protobuf.Empty", False),
    }

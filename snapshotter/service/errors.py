"""Typed snapshotter errors, one per containerd errdefs class the API can return.

The store and the snapshotter raise these; only the gRPC layer turns them into status
codes, so the logic stays testable without a server.
"""
from __future__ import annotations

import grpc

__all__ = ["SnapshotError", "NotFound", "AlreadyExists", "FailedPrecondition", "InvalidArgument",
           "Unavailable", "Unimplemented"]


class SnapshotError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(SnapshotError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(SnapshotError):
    code = grpc.StatusCode.UNIMPLEMENTED

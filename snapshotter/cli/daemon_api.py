"""A blocking client of the daemon's ``lazysnap.v1.Node`` service for ``status`` and ``prune``."""
from __future__ import annotations

import json
import os
from typing import Any

from snapshotter.cli import CLIError


def _target(address: str) -> str:
    return address if address.startswith("unix:") else f"unix:{address}"


def daemon_answers(address: str) -> bool:
    """Something listens on the socket (a stale socket file refuses the connection)."""
    import socket

    path = address.removeprefix("unix:")
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def _call(address: str, method: str, request: Any, timeout: float) -> Any:
    import grpc

    from snapshotter.api.lazysnap.v1 import control_pb2_grpc

    try:
        with grpc.insecure_channel(_target(address)) as channel:
            return getattr(control_pb2_grpc.NodeStub(channel), method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise CLIError(f"daemon {address}: it does not serve lazysnap.v1.Node (an older lazysnap?)") from None
        raise CLIError(f"daemon {address}: {exc.code().name}: {exc.details()}") from None


def get_status(address: str, timeout: float) -> dict[str, Any]:
    from snapshotter.api.lazysnap.v1 import control_pb2 as pb

    resp = _call(address, "GetStatus", pb.GetStatusRequest(), timeout)
    doc = json.loads(resp.status_json)
    if not isinstance(doc, dict):
        raise CLIError(f"daemon {address}: the status answer is not a JSON object")
    return doc


def prune(address: str, apply: bool, timeout: float) -> Any:
    from snapshotter.api.lazysnap.v1 import control_pb2 as pb

    return _call(address, "Prune", pb.PruneRequest(apply=apply), timeout)

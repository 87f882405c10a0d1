"""``lazysnap.v1.Control`` on the daemon's socket: start/stop recordings, read profiles.

The recorder lives on the layer provider's event loop (next to the filesystem); each call
hops there and back (``on_loop``). The lazy provider registers it (``add_services``).
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from snapshotter.api.lazysnap.v1 import control_pb2 as pb
from snapshotter.api.lazysnap.v1 import control_pb2_grpc as pb_grpc
from snapshotter.log import get_logger
from snapshotter.prefetch.profile import ProfileError

if TYPE_CHECKING:
    from snapshotter.prefetch.manager import ProfileManager

log = get_logger("lazysnap.prefetch")
SERVICE_NAME = "lazysnap.v1.Control"
T = TypeVar("T")
OnLoop = Callable[[Coroutine[Any, Any, T]], Awaitable[T]]


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, profiles: ProfileManager, on_loop: OnLoop[Any]) -> None:
        self._profiles = profiles
        self._on_loop = on_loop

    async def StartRecording(self, request: pb.StartRecordingRequest, context: grpc.aio.ServicerContext) -> Any:
        if not request.image_ref and not request.manifest_digest:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image_ref or manifest_digest is required")
        try:
            rec_id, manifest = await self._on_loop(self._profiles.start_recording(
                request.image_ref, request.manifest_digest, list(request.layer_digests)))
        except Exception as exc:  # noqa: BLE001 - e.g. the image cannot be resolved
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}"[:500])
        return pb.StartRecordingResponse(recording_id=rec_id, manifest_digest=manifest)

    async def StopRecording(self, request: pb.StopRecordingRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            profile, path = await self._on_loop(
                self._profiles.stop_recording(request.recording_id, save_profile=not request.discard))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no active recording {request.recording_id!r}")
        except (ProfileError, OSError) as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc)[:500])
        return pb.StopRecordingResponse(manifest_digest=profile.manifest, path=str(path or ""),
                                        summary_json=json.dumps(profile.summary()).encode())

    async def GetProfile(self, request: pb.GetProfileRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            data = self._profiles.profile_bytes(request.manifest_digest)
        except ProfileError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc)[:500])
        return pb.GetProfileResponse(found=data is not None, profile_json=data or b"")


def add_control(server: grpc.aio.Server, profiles: ProfileManager, on_loop: OnLoop[Any]) -> None:
    """Serve ``profiles`` as lazysnap.v1.Control; ``on_loop`` runs a coroutine on the loop
    the profiles live on."""
    pb_grpc.add_ControlServicer_to_server(ControlServicer(profiles, on_loop), server)

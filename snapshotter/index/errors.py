"""Errors raised by the index package.

Every error is a one-line, user-presentable message naming the problem, so the CLI and
the daemon can report bad input without a traceback. Layer *data* errors raised by the C
core (``snapshotter.native.LayerError`` and subclasses) derive from :class:`LayerDataError`
and its subclasses here, so one ``except`` catches both.
"""
from __future__ import annotations


class LayerIndexError(Exception):
    """Base class of every index-package error."""


class IndexFormatError(LayerIndexError):
    """An index file is not one we can read: wrong magic, version, truncated, corrupt."""


class IndexBuildError(LayerIndexError):
    """The layer's tar content cannot be represented safely (escaping path, bad link)."""


class LayerDataError(LayerIndexError):
    """The layer bytes themselves are bad (pure-Python scanner/decoder)."""


class CorruptLayerError(LayerDataError):
    """Compressed or tar data is malformed."""


class TruncatedLayerError(LayerDataError):
    """The layer (or a fetched range of it) ends early."""


class UnknownFormatError(LayerDataError):
    """The blob is neither gzip, zstd nor tar."""


class WindowMissingError(LayerIndexError):
    """A checkpoint's window is published apart from the index and is not local (or does not
    match its digest) yet: fetch it (``fetch.windows.WindowCache``) before decoding there."""


class ChunkVerificationError(LayerIndexError):
    """Decoded bytes do not match the chunk's SHA-256: never returned to a reader."""

    def __init__(self, chunk_id: int, layer: str, detail: str = "") -> None:
        self.chunk_id = chunk_id
        self.layer = layer
        msg = f"chunk {chunk_id} of layer {layer} failed SHA-256 verification"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class EntryNotFoundError(LayerIndexError):
    """No entry at the requested path."""


class NotRegularFileError(LayerIndexError):
    """Content was requested from a directory, symlink, device or fifo."""


LAYER_ERRORS: tuple[type[BaseException], ...] = (LayerDataError,)
"""Exception classes meaning "the layer bytes are bad". The C core's errors
(``snapshotter.native.LayerError``, ``CorruptLayerError``, ``TruncatedLayerError``) derive
from these classes (and from ValueError), so this one class catches both families."""

"""Errors raised by the index package.

Every error is a one-line, user-presentable message naming the problem, so the CLI and
the daemon can report bad input without a traceback. Layer *data* errors raised by the C
core (``snapshotter.native.LayerError`` and subclasses) are re-exported through
:data:`LAYER_ERRORS` so callers can catch both families with one ``except``.
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


def _layer_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [LayerDataError]
    try:
        from snapshotter import native
    except ImportError:
        return tuple(errors)
    base = getattr(native, "LayerError", None)
    if isinstance(base, type) and issubclass(base, BaseException):
        errors.append(base)
    return tuple(errors)


LAYER_ERRORS: tuple[type[BaseException], ...] = _layer_errors()
"""Exception classes meaning "the layer bytes are bad", from Python and from C."""

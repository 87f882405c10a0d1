"""Checkpoint windows published apart from the index: fetched by range where a read decodes
from them, verified, kept across restarts, and never used when they do not match."""
from __future__ import annotations

import asyncio
import gzip
import io
import random
import tarfile
from pathlib import Path

import pytest

from snapshotter.fetch import Fetcher, FetchOptions, Priority
from snapshotter.fetch.sources import FileBlobSource, IndexCodec
from snapshotter.fetch.windows import WindowCache, windows_path
from snapshotter.index.builder import index_file
from snapshotter.index.errors import IndexFormatError, WindowMissingError
from snapshotter.index.format import IndexFile, serialize_split
from snapshotter.store import ChunkStore


class CountingSource(FileBlobSource):
    """A local blob that counts range requests and can flip a byte in what it returns."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ranges: list[tuple[int, int]] = []
        self.corrupt = False

    async def read_range(self, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        await asyncio.sleep(0.01)  # let concurrent callers pile up
        data = await super().read_range(start, end)
        if self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, bytes]:
    """(blob, index head, windows blob, tar): ~1.5 MB of mixed text and noise, 32 KiB spans."""
    d = tmp_path_factory.mktemp("windows")
    rng = random.Random(7)
    tar = d / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(60):
            words = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta", b"%d" % i]) for _ in range(4000))
            data = rng.randbytes(16000) + words[:12000] if i % 3 else words
            info = tarfile.TarInfo(f"pkg/f{i:03d}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = tar.read_bytes()
    blob = d / "blob"
    blob.write_bytes(gzip.compress(raw, 6))
    head, windows = serialize_split(index_file(str(blob), span=32 << 10, chunk_size=16 << 10))
    (d / "idx").write_bytes(head)
    (d / "win-blob").write_bytes(windows)
    return blob, d / "idx", d / "win-blob", raw


def _open(layer: tuple[Path, Path, Path, bytes], root: Path) -> tuple[IndexFile, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "x.idx").write_bytes(layer[1].read_bytes())
    return IndexFile.open(root / "x.idx"), root / "x.idx"


def _with_window(idx: IndexFile) -> list[int]:
    """Checkpoints that need a window (not stream or member starts)."""
    return [c for c in range(idx.checkpoint_count) if idx.window_extent(c)[1]]


def test_reads_fetch_only_the_windows_they_decode_from(layer, tmp_path: Path) -> None:
    blob, _, win_blob, raw = layer
    idx, path = _open(layer, tmp_path / "node")
    assert idx.windows_apart and idx.checkpoint_count > 20
    source = CountingSource(win_blob)

    async def main() -> None:
        windows = WindowCache(idx, windows_path(path), source)
        store = ChunkStore(tmp_path / "store")
        fetcher = Fetcher(store, FetchOptions(readahead_spans=False, whole_spans=False, deadline_s=5))
        lf = fetcher.layer("L", IndexCodec(idx, windows), FileBlobSource(blob))
        picks = [3, idx.chunk_count // 2, idx.chunk_count - 2]
        await lf.ensure(picks, Priority.ON_DEMAND)
        for c in picks:
            ch = idx.chunk(c)
            assert store.read(ch.digest) == raw[ch.uncompressed_offset:ch.uncompressed_offset + ch.length]
        fetched = len(source.ranges)
        assert 1 <= fetched <= len(picks)  # one window per span decoded, nothing else
        assert windows.bytes_fetched < win_blob.stat().st_size / 5
        assert lf.bytes_fetched >= windows.bytes_fetched  # counted as registry bytes of the read
        await lf.fetch_all(Priority.BACKGROUND)  # every chunk, every window it needs
        for c in range(idx.chunk_count):
            ch = idx.chunk(c)
            assert store.read(ch.digest) == raw[ch.uncompressed_offset:ch.uncompressed_offset + ch.length]
        lf.close()
        store.close()

    asyncio.run(main())
    idx.close()


def test_concurrent_asks_share_one_fetch_and_survive_a_restart(layer, tmp_path: Path) -> None:
    _, _, win_blob, _ = layer
    idx, path = _open(layer, tmp_path / "node")
    source = CountingSource(win_blob)
    wanted = _with_window(idx)[2:6]

    async def main() -> None:
        wc = WindowCache(idx, windows_path(path), source)
        await asyncio.gather(*(wc.ensure([c]) for c in wanted for _ in range(3)))
        assert len(source.ranges) <= len(wanted)  # adjacent windows may even share a range
        assert all(idx.checkpoint(c).window for c in wanted)
        wc.close()

    asyncio.run(main())
    idx.close()
    # a restarted daemon opens the same copy: what was fetched is used as it is
    again = IndexFile.open(path)
    source.ranges.clear()

    async def restart() -> None:
        wc = WindowCache(again, windows_path(path), source)
        await wc.ensure(wanted)
        assert source.ranges == []
        wc.close()

    asyncio.run(restart())
    again.close()


def test_a_corrupt_window_is_refused_and_never_stored(layer, tmp_path: Path) -> None:
    blob, _, win_blob, _ = layer
    idx, path = _open(layer, tmp_path / "node")
    source = CountingSource(win_blob)
    source.corrupt = True
    c = _with_window(idx)[3]

    async def main() -> None:
        wc = WindowCache(idx, windows_path(path), source)
        with pytest.raises(IndexFormatError, match="does not match its digest"):
            await wc.ensure([c])
        assert not wc.local(c)
        with pytest.raises(WindowMissingError):
            idx.checkpoint(c)
        # through the fetcher: the read fails (retried to its deadline), no chunk is stored
        store = ChunkStore(tmp_path / "store")
        fetcher = Fetcher(store, FetchOptions(readahead_spans=False, deadline_s=0.5, retry_base_s=0.05, fail_fast_s=0.0))
        lf = fetcher.layer("L", IndexCodec(idx, wc), FileBlobSource(blob))
        codec = IndexCodec(idx)
        target = next(t for t in range(idx.chunk_count) if codec.plan([t])[0].checkpoint == c)
        with pytest.raises(Exception):
            await lf.ensure([target], Priority.ON_DEMAND)
        assert not store.has(idx.chunk(target).digest)
        source.corrupt = False  # the registry recovers: the next read succeeds
        await lf.ensure([target], Priority.ON_DEMAND)
        assert store.has(idx.chunk(target).digest) and wc.local(c)
        lf.close()
        store.close()

    asyncio.run(main())
    idx.close()

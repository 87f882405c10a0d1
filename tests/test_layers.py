"""The lazy layer provider against a real registry, with a real FUSE mount.

Indexes come from each source the provider knows (published artifact, local cache,
streaming build, whole fetch of small layers); untrusted indexes are rejected; an index
that lies about its blob is quarantined after the completeness check.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gzip
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from harness.proxy import start_proxy
from harness.registry import push_image, start_registry
from harness.signing import publisher_keys, sign_flags
from snapshotter.index.builder import index_file
from snapshotter.index.format import serialize_index
from snapshotter.layers import LazyLayerProvider, LazyOptions, indexes
from snapshotter.prefetch.options import PrefetchOptions
from snapshotter.registry import NotFoundError, RegistryClient, RegistryConfig, RetryPolicy
from snapshotter.registry.reference import shared_in
from snapshotter.registry.signatures import load_private_key, push_signature, signature_tag
from snapshotter.service.provider import RemoteLayerRequest
from tests.test_fs import make_layer_tar

pytestmark = pytest.mark.root
# these tests measure the on-demand path: no profile prefetch, no background fill
NO_PROFILES = PrefetchOptions(prefetch=False, background=False, registry_lookup=False)
T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


class Loop:
    """The provider's event loop in a thread (the test thread does blocking FUSE reads)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def run(self, fn: Callable[[], Awaitable[T]], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(10)


def small_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in {"small/a.txt": b"alpha\n", "small/b.txt": b"beta\n" * 100}.items():
            import io

            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        big, small = tmp / "big.tar", tmp / "small.tar"
        make_layer_tar(big)
        small_tar(small)
        self.tars = [big, small]
        self.blobs = [gzip.compress(big.read_bytes(), 6), gzip.compress(small.read_bytes(), 6)]
        assert len(self.blobs[0]) > 4 << 20 > len(self.blobs[1])
        self.reg = start_registry(tmp / "reg")
        self.proxy = start_proxy(self.reg.url)
        self.ref = f"{self.proxy.host}/lazy/img:v1"
        self.loop = Loop()
        self.providers: list[LazyLayerProvider] = []

        async def push() -> dict[str, object]:
            async with RegistryClient(RegistryConfig()) as c:
                return await push_image(c, self.ref, self.blobs)

        pushed = self.loop.run(push)
        self.layers: list[str] = list(pushed["layer_digests"])  # type: ignore[arg-type]
        self.manifest: str = pushed["manifest_digest"]  # type: ignore[assignment]

    def provider(self, root: Path, **opts: object) -> LazyLayerProvider:
        cfg = RegistryConfig(retry=RetryPolicy(max_attempts=3, base_delay=0.05, deadline=5))

        async def make() -> LazyLayerProvider:
            opts.setdefault("trusted_keys", [str(publisher_keys().public)])
            # the session in this process: these tests are about layers (the holder has its own)
            opts.setdefault("fuse_holder", False)
            return LazyLayerProvider(root, RegistryClient(cfg), LazyOptions(fetch_deadline_s=5, **opts),
                                     NO_PROFILES)

        p = self.loop.run(make)
        self.providers.append(p)
        return p

    def request(self, i: int) -> RemoteLayerRequest:
        return RemoteLayerRequest(key=f"k{i}", parent="", chain_id=f"chain{i}", labels={
            "containerd.io/snapshot/remote/stargz.reference": self.ref}, image_ref=self.ref,
            layer_digest=self.layers[i], manifest_digest=None, image_layers=tuple(self.layers))

    def provide(self, p: LazyLayerProvider, i: int) -> Path:
        return self.loop.run(lambda: p.provide(self.request(i)))

    def push_index(self, root: Path) -> None:
        subprocess.run([sys.executable, "-m", "snapshotter", "index", self.ref, "--push", *sign_flags(),
                        "--windows-apart", "--root", str(root), "--span", str(1 << 20),
                        "--hosts-dir", str(self.tmp / "nohosts")], check=True, cwd=REPO, capture_output=True, timeout=120)

    def close(self) -> None:
        for p in self.providers:
            try:
                self.loop.run(p.close, timeout=30)
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
        self.loop.stop()
        self.proxy.stop()
        self.reg.stop()


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def _check_tree(d: Path, tar: Path) -> None:
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            name = m.name.removeprefix("./")
            if m.isreg() and "/.wh." not in "/" + name:
                assert (d / name).read_bytes() == tf.extractfile(m).read(), name


def _sample(reg_name: str, **labels: str) -> float:
    from snapshotter.store.metrics import REGISTRY

    return REGISTRY.get_sample_value(reg_name, labels) or 0.0


def test_published_index_makes_layers_lazy(env: Env, tmp_path: Path) -> None:
    env.push_index(tmp_path / "publisher")
    # no read-ahead: the next span, fetched in the background, would land in the byte count
    # below or not depending on timing
    p = env.provider(tmp_path / "node", readahead_spans=False)
    env.proxy.reset_stats()
    d0 = env.provide(p, 0)
    assert d0 == tmp_path / "node" / "mnt" / env.layers[0].split(":")[1]
    assert p.layer(env.layers[0]).source == "referrer"
    # the small layer was started by the first Prepare and fetched whole (wait for it, so
    # its download is not counted as the lazy read below)
    d1 = env.provide(p, 1)
    assert p.layer(env.layers[1]).source == "whole"
    before = env.proxy.stats.body_bytes
    assert (d0 / "etc/hostname").read_bytes() == b"lazy\n"
    assert env.proxy.stats.body_bytes - before < len(env.blobs[0]) // 4
    _check_tree(d1, env.tars[1])
    _check_tree(d0, env.tars[0])
    # fully read: the completeness check streams the blob once and verifies the index
    layer = p.layer(env.layers[0])
    # scheduled once the last span's chunks are written, which is just after its readers
    # were answered (from memory)
    deadline = time.monotonic() + 30
    while layer.verify_task is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert layer.verify_task is not None
    assert env.loop.run(lambda: p.wait_verified(env.layers[0], 60)) is True
    # lazily read once (+ span overlap) + the verification stream + the small layer
    assert env.proxy.stats.body_bytes < len(env.blobs[0]) * 2.3 + len(env.blobs[1]) + (1 << 20)


def test_build_by_streaming_then_restore_after_restart(env: Env, tmp_path: Path) -> None:
    root = tmp_path / "node"
    p = env.provider(root)
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"
    assert indexes.index_path(root, env.layers[0]).is_file()
    _check_tree(d0, env.tars[0])
    env.loop.run(p.close)
    env.providers.remove(p)
    assert not os.path.ismount(root / "mnt")
    # a new daemon on the same root: restore from the local index, no index work
    p2 = env.provider(root)
    labels = env.request(0).labels
    d0b = env.loop.run(lambda: p2.restore(env.layers[0], labels))
    assert d0b == d0
    _check_tree(d0b, env.tars[0])
    env.loop.run(lambda: p2.release(env.layers[0]))
    assert not (root / "mnt" / env.layers[0].split(":")[1]).exists()


class _BlobClient:
    """Serves one blob as ``stream_blob`` does, counting the streams."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.streams = blob, 0

    async def stream_blob(self, ref: str, digest: str, purpose: str):  # noqa: ANN201
        self.streams += 1
        for at in range(0, len(self.blob), 4096):
            yield self.blob[at:at + 4096]


@pytest.mark.parametrize("keep", [True, False])
def test_a_layer_c_declines_is_read_again_from_the_kept_blob(tmp_path: Path, keep: bool) -> None:
    """The streaming pass keeps no entries; a layer the C build leaves to the reference (a
    directory replaced by a file) is scanned again: from the kept blob, else the registry."""
    import hashlib
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in (("d", tarfile.DIRTYPE), ("d/f", tarfile.REGTYPE), ("d", tarfile.REGTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size = kind, 3 if kind == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(b"abc") if kind == tarfile.REGTYPE else None)
    blob = gzip.compress(buf.getvalue())
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    client = _BlobClient(blob)
    keep_blob = tmp_path / "blobs" / digest.split(":")[1] if keep else None
    ix = asyncio.run(indexes.build_by_streaming(client, "reg/x:1", digest, LazyOptions(), tmp_path / "root",
                                                keep_blob))
    try:
        assert [(e.path, e.type.name) for e in ix.entries()] == [("", "DIR"), ("d", "REG")]
    finally:
        ix.close()
    assert client.streams == (1 if keep else 2)
    assert keep_blob is None or keep_blob.read_bytes() == blob


def test_reads_from_the_kept_blob_are_not_registry_bytes(env: Env, tmp_path: Path) -> None:
    """A streamed layer's reads decode its kept blob: nothing more crosses the network, and
    lazysnap_registry_bytes_fetched (what operators watch) does not count them."""
    p = env.provider(tmp_path / "node")
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"
    streamed = env.proxy.stats.body_bytes
    before = _sample("lazysnap_registry_bytes_fetched_total", purpose="on_demand")
    _check_tree(d0, env.tars[0])
    assert p.layer(env.layers[0]).fetcher.bytes_fetched > 0  # read from the kept blob
    assert env.proxy.stats.body_bytes == streamed
    assert _sample("lazysnap_registry_bytes_fetched_total", purpose="on_demand") == before


def test_the_streaming_pass_stores_the_layer(env: Env, tmp_path: Path) -> None:
    """``store_streamed_chunks``: the one pass that learns an unindexed layer's tree also
    writes its chunks, so the layer is whole on the node when Prepare answers and reading
    every file costs the registry nothing more; the chunks are verified and pinned."""
    p = env.provider(tmp_path / "node", store_streamed_chunks=True, store_streamed_min_file_bytes=0,
                     keep_streamed_blobs=False)
    env.proxy.reset_stats()
    d0 = env.provide(p, 0)
    layer = p.layer(env.layers[0])
    assert layer.source == "built"
    streamed = env.proxy.stats.body_bytes
    assert streamed <= len(env.blobs[0]) + (64 << 10)
    digests = layer.index.chunk_digests()
    share = p.store.local_share(digests, [layer.index.chunk(i).length for i in range(layer.index.chunk_count)])
    assert share.chunks == share.verified == len(digests)
    assert all(p.store.is_pinned(d) for d in digests)
    _check_tree(d0, env.tars[0])
    assert env.proxy.stats.body_bytes == streamed


def test_a_layer_file_that_cannot_be_made_costs_only_speed(env: Env, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """``store_streamed_chunks`` on a store whose layer-file directory cannot be made (here a
    file is in its way): the layer is indexed and served all the same, its chunks fetched
    when read, and the node says why once."""
    root = tmp_path / "node"
    (root / "files").mkdir(parents=True)
    (root / "files" / "layers").write_bytes(b"in the way")
    p = env.provider(root, store_streamed_chunks=True, store_streamed_min_file_bytes=0)
    with caplog.at_level(logging.WARNING, logger="lazysnap.layers"):
        d0 = env.provide(p, 0)
    layer = p.layer(env.layers[0])
    assert layer.source == "built" and layer.data.layer_file is None
    assert [r.getMessage() for r in caplog.records].count("layer_file_unavailable") == 1
    _check_tree(d0, env.tars[0])


def test_index_for_another_layer_is_rejected(env: Env, tmp_path: Path) -> None:
    """A published artifact whose blob for layer 0 actually indexes layer 1: not used, even
    signed by a trusted key (a publisher's mistake is not a reason to serve wrong bytes)."""
    (tmp_path / "l1").write_bytes(env.blobs[1])
    wrong = serialize_index(index_file(str(tmp_path / "l1")))

    async def publish() -> None:
        async with RegistryClient(RegistryConfig()) as c:
            img = await c.resolve(env.ref)
            art = await c.push_artifact(env.ref, subject=img.manifest_descriptor, artifact_type=indexes.INDEX_ARTIFACT,
                                        blobs=[(indexes.INDEX_LAYER_MEDIA, wrong,
                                                {indexes.LAYER_ANNOTATION: env.layers[0]})])
            await push_signature(c, env.ref, art.digest, load_private_key(publisher_keys().private))

    env.loop.run(publish)
    before = _sample("lazysnap_layer_index_fallbacks_total", reason="wrong_layer")
    p = env.provider(tmp_path / "node")
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"
    assert _sample("lazysnap_layer_index_fallbacks_total", reason="wrong_layer") == before + 1
    _check_tree(d0, env.tars[0])


def _index_artifacts(env: Env, where: str | None = None) -> tuple[int, int]:
    """Index artifacts published for the image (in its own repository, or ``where``), and
    how many of them carry a signature."""
    where = where or env.ref

    async def count() -> tuple[int, int]:
        async with RegistryClient(RegistryConfig()) as c:
            img = await c.resolve(env.ref)
            arts = await c.referrers(where, img.manifest_digest, indexes.INDEX_ARTIFACT)
            signed = 0
            for art in arts:
                with contextlib.suppress(NotFoundError):
                    await c.get_manifest(where, signature_tag(art.digest))
                    signed += 1
            return len(arts), signed

    return env.loop.run(count)


def _wait_artifacts(env: Env, n: int, signed: int, where: str | None = None) -> None:
    deadline = time.monotonic() + 30
    while any(got < want for got, want in zip(_index_artifacts(env, where), (n, signed))):
        assert time.monotonic() < deadline, f"not {n} index artifacts published, {signed} signed"
        time.sleep(0.1)


def test_what_a_node_builds_reaches_the_next_node_when_signed(env: Env, tmp_path: Path) -> None:
    """[lazy] publish_built_indexes: the first node streams the layer once and publishes
    its index in the background; unsigned, the next node (default trust: signed) builds
    again; signed with publish_sign_key, the next node uses it and streams nothing."""
    a = env.provider(tmp_path / "a", publish_built_indexes=True)
    env.provide(a, 0)
    assert a.layer(env.layers[0]).source == "built"
    _wait_artifacts(env, 1, 0)
    b = env.provider(tmp_path / "b")
    before = _sample("lazysnap_layer_index_fallbacks_total", reason="unsigned")
    env.provide(b, 0)
    assert b.layer(env.layers[0]).source == "built"
    assert _sample("lazysnap_layer_index_fallbacks_total", reason="unsigned") > before

    c = env.provider(tmp_path / "c", publish_built_indexes=True, publish_sign_key=str(publisher_keys().private))
    env.provide(c, 0)
    assert c.layer(env.layers[0]).source == "built"
    _wait_artifacts(env, 1, 1)  # the same index, the same artifact: now signed
    d = env.provider(tmp_path / "d")
    d0 = env.provide(d, 0)
    assert d.layer(env.layers[0]).source == "referrer"
    _check_tree(d0, env.tars[0])


def test_a_node_without_push_rights_shares_through_the_share_registry(env: Env, tmp_path: Path) -> None:
    """[lazy] share_registry: what a node builds is published under the share registry (the
    image's repository path there), signed, and nothing in the image's own repository; a node
    with the same share_registry uses it and streams nothing, one without builds again."""
    share = start_registry(tmp_path / "share")
    try:
        place = f"{share.host}/fleet"
        a = env.provider(tmp_path / "a", publish_built_indexes=True, share_registry=place,
                         publish_sign_key=str(publisher_keys().private))
        env.provide(a, 0)
        assert a.layer(env.layers[0]).source == "built"
        shared = shared_in(env.ref, place)
        assert shared == f"{share.host}/fleet/lazy/img:v1"
        _wait_artifacts(env, 1, 1, where=shared)
        assert _index_artifacts(env) == (0, 0)
        b = env.provider(tmp_path / "b", share_registry=place)
        b0 = env.provide(b, 0)
        assert b.layer(env.layers[0]).source == "referrer"
        _check_tree(b0, env.tars[0])
        c = env.provider(tmp_path / "c")
        env.provide(c, 0)
        assert c.layer(env.layers[0]).source == "built"
    finally:
        share.stop()


def test_profiles_are_looked_for_in_the_share_registry_too(env: Env, tmp_path: Path) -> None:
    """A signed profile published under the share registry (as a node without push rights to
    the image's repository publishes what it records) is found there after the image's own
    repository, and its pack is fetched from where it was found; without the share registry
    in the places looked at, there is none."""
    from snapshotter.prefetch.lookup import find
    from snapshotter.prefetch.profile import ChunkAccess, LayerProfile, Profile
    from snapshotter.prefetch.publish import publish_profile
    from snapshotter.registry.signatures import Voucher, load_public_keys

    share = start_registry(tmp_path / "share")
    try:
        shared = shared_in(env.ref, f"{share.host}/fleet")
        profile = Profile(env.manifest, [LayerProfile(env.layers[1], 1, [ChunkAccess(0, 10, "f", 0, 10, [5])])])
        voucher = Voucher("signed", tuple(load_public_keys([str(publisher_keys().public)])))

        async def go() -> None:
            async with RegistryClient(RegistryConfig()) as c:
                resolved = await c.resolve(env.ref)
                await publish_profile(c, shared, resolved.manifest_descriptor, profile, None,
                                      load_private_key(str(publisher_keys().private)))
                assert await find(tmp_path / "r1", c, [env.ref], env.manifest, voucher) is None
                found = await find(tmp_path / "r2", c, [env.ref, shared], env.manifest, voucher)
                assert found is not None and found.ref == shared and found.profile == profile

        env.loop.run(go)
    finally:
        share.stop()


@pytest.mark.parametrize("bad", ["fleet", "https://reg.example/x", "reg.example/UPPER"])
def test_a_share_registry_that_names_no_registry_fails_the_start(bad: str) -> None:
    with pytest.raises(ValueError, match="share_registry|invalid repository"):
        LazyOptions(share_registry=bad).validate()


def test_an_unreadable_publish_sign_key_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="signing key"):
        LazyOptions(publish_built_indexes=True, publish_sign_key=str(tmp_path / "missing.key")).validate()


def test_pinned_trust_mode(env: Env, tmp_path: Path) -> None:
    env.push_index(tmp_path / "publisher")
    p = env.provider(tmp_path / "a", index_trust="pinned")
    env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"  # published but not pinned
    # what --push published: the index with its windows apart (deterministic from the local one)
    from snapshotter.cli.remote_cmds import _split

    pinned_blob = _split(indexes.index_path(tmp_path / "publisher", env.layers[0]).read_bytes())[0]
    import hashlib

    pin = {env.layers[0]: "sha256:" + hashlib.sha256(pinned_blob).hexdigest()}
    p2 = env.provider(tmp_path / "b", index_trust="pinned", pinned_indexes=pin)
    # a second FUSE fs in one process is not possible: release the first provider's mount
    env.loop.run(p.close)
    env.providers.remove(p)
    env.provide(p2, 0)
    assert p2.layer(env.layers[0]).source == "referrer"


def test_lying_index_is_quarantined(env: Env, tmp_path: Path) -> None:
    """An index with the right blob digest but a forged entry (setuid bit added) serves
    verified chunks, but the completeness check catches it and reads then fail loudly."""
    (tmp_path / "l0").write_bytes(env.blobs[0])
    honest = index_file(str(tmp_path / "l0"))
    forged = [dataclasses.replace(e, mode=e.mode | 0o4000) if e.path == "etc/hostname" else e
              for e in honest.entries]
    honest.entries[:] = forged
    root = tmp_path / "node"
    indexes.write_trusted(root, env.layers[0], serialize_index(honest), "built")
    p = env.provider(root)
    d0 = env.provide(p, 0)
    layer = p.layer(env.layers[0])
    assert layer.source == "local" and not layer.verified
    assert (d0 / "etc/hostname").read_bytes() == b"lazy\n"
    ok = env.loop.run(lambda: p.verify_layer(env.layers[0]))
    assert ok is False
    with pytest.raises(OSError) as exc:
        (d0 / "data/big.bin").read_bytes()
    assert exc.value.errno == errno.EIO
    assert not indexes.index_path(root, env.layers[0]).exists()
    assert list((root / "indexes" / "quarantine").iterdir())


def test_shared_content_is_fetched_once(tmp_path: Path) -> None:
    """Two images whose layers differ but share a big file: the second image's read of it
    is served from the node's chunk store, with no registry traffic for it."""
    big_tar = tmp_path / "a.tar"
    make_layer_tar(big_tar)
    with tarfile.open(big_tar) as tf:
        big = tf.extractfile("data/big.bin").read()
    other_tar = tmp_path / "b.tar"
    with tarfile.open(other_tar, "w") as tf:
        import io

        for name, data in {"other/readme": b"another image\n", "copy/big.bin": big}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    blobs = [gzip.compress(big_tar.read_bytes(), 6), gzip.compress(other_tar.read_bytes(), 6)]
    reg = start_registry(tmp_path / "reg")
    proxy = start_proxy(reg.url)
    loop = Loop()
    p = None
    try:
        refs = [f"{proxy.host}/lazy/one:v1", f"{proxy.host}/lazy/two:v1"]

        async def push() -> list[str]:
            async with RegistryClient(RegistryConfig()) as c:
                return [(await push_image(c, ref, [b]))["layer_digests"][0] for ref, b in zip(refs, blobs)]

        digests = loop.run(push)
        for ref in refs:
            subprocess.run([sys.executable, "-m", "snapshotter", "index", ref, "--push", *sign_flags(), "--root",
                            str(tmp_path / "publisher"), "--span", str(1 << 20)], check=True, cwd=REPO,
                           capture_output=True, timeout=120)

        async def make() -> LazyLayerProvider:
            return LazyLayerProvider(tmp_path / "node", RegistryClient(RegistryConfig()),
                                     LazyOptions(verify_complete_layers=False, fuse_holder=False,
                                                 trusted_keys=[str(publisher_keys().public)]), NO_PROFILES)

        p = loop.run(make)
        dirs = []
        for ref, digest in zip(refs, digests):
            req = RemoteLayerRequest(key=ref, parent="", chain_id=digest, labels={}, image_ref=ref,
                                     layer_digest=digest, manifest_digest=None, image_layers=(digest,))
            dirs.append(loop.run(lambda: p.provide(req)))
        assert (dirs[0] / "data/big.bin").read_bytes() == big
        proxy.reset_stats()
        assert (dirs[1] / "copy/big.bin").read_bytes() == big
        assert proxy.stats.body_bytes == 0  # every chunk of the copy was already on this node
        assert (dirs[1] / "other/readme").read_bytes() == b"another image\n"
        assert 0 < proxy.stats.body_bytes < len(blobs[1]) // 4
    finally:
        if p is not None:
            loop.run(p.close)
        loop.stop()
        proxy.stop()
        reg.stop()


def test_same_content_pairs_records_and_names_the_first_difference(tmp_path: Path) -> None:
    """The completeness check's comparison streams both indexes in their canonical record
    order; any change to an entry, a chunk or the set of paths is reported."""
    from snapshotter.index.format import IndexFile, write_index

    tar = tmp_path / "l.tar"
    make_layer_tar(tar)
    (tmp_path / "l.gz").write_bytes(gzip.compress(tar.read_bytes(), 6))
    honest = index_file(str(tmp_path / "l.gz"), span=64 << 10, chunk_size=64 << 10)

    def variant(name: str, change: Callable[[list], list]) -> IndexFile:  # type: ignore[type-arg]
        idx = dataclasses.replace(honest, entries=change(list(honest.entries)))
        write_index(tmp_path / name, idx)
        return IndexFile.open(tmp_path / name)

    a = variant("a.idx", lambda e: e)
    b = variant("b.idx", lambda e: list(reversed(e)))  # the same content, listed otherwise
    assert indexes.same_content(a, b) is None
    moved = variant("c.idx", lambda e: [dataclasses.replace(x, mtime_ns=x.mtime_ns + 1) if x.path == "etc/hostname"
                                         else x for x in e])
    assert indexes.same_content(a, moved) == "entries differ at etc/hostname"
    fewer = variant("d.idx", lambda e: [x for x in e if x.path != "etc/hostname"])
    assert indexes.same_content(a, fewer) == f"entry count {a.entry_count} != {a.entry_count - 1}"
    chunks = list(honest.chunks)
    chunks[1] = dataclasses.replace(chunks[1], digest=bytes(32))
    write_index(tmp_path / "e.idx", dataclasses.replace(honest, chunks=chunks))
    assert indexes.same_content(a, IndexFile.open(tmp_path / "e.idx")) == "chunk 1 differs"


def test_reindex_in_a_child_process_reports_a_bad_blob(tmp_path: Path) -> None:
    from snapshotter.index.errors import IndexBuildError
    from snapshotter.layers.provider import _index_elsewhere

    (tmp_path / "blob").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(5000))  # gzip magic, then garbage
    with pytest.raises(IndexBuildError, match="re-indexing the blob failed"):
        asyncio.run(_index_elsewhere(tmp_path / "blob", tmp_path / "out.idx", 1 << 20, 1 << 20))
    assert not (tmp_path / "out.idx").exists()

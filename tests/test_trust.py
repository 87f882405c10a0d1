"""A published artifact can never change what an image serves.

The attack: take the valid signed index of a layer, tamper with it (swap two files'
offsets, change a size, a mode, a name, a link target, a checkpoint window, inject a
whiteout), re-serialize it - its checksum is then valid, it names the right blob and only
chunks that are in it - and push it as the newest referrer of the image. Every row reads
the whole layer through a real FUSE mount on a node with background fill and the
completeness check off, and compares every name, attribute and byte with the tar.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.signing import make_key_pair, publisher_keys
from snapshotter.index.builder import index_file
from snapshotter.index.format import serialize_index
from snapshotter.index.layerindex import LayerIndex
from snapshotter.index.model import Checkpoint, Entry, EntryType
from snapshotter.layers import indexes
from snapshotter.registry import RegistryClient, RegistryConfig
from snapshotter.registry.signatures import push_signature, load_private_key, signature_tag
from tests import test_layers
from tests.test_layers import Env, _sample

env = test_layers.env  # the fixture, shared

pytestmark = pytest.mark.root
FUTURE = "2099-01-01T00:00:00Z"  # newer than anything the honest publisher pushed


def _entry(index: LayerIndex, path: str) -> int:
    return next(i for i, e in enumerate(index.entries) if e.path == path)


def swap_offsets(index: LayerIndex) -> None:
    a, b = _entry(index, "etc/hostname"), _entry(index, "many/f0004")
    x, y = index.entries[a], index.entries[b]
    index.entries[a] = dataclasses.replace(x, data_offset=y.data_offset, first_chunk=y.first_chunk,
                                           chunk_count=y.chunk_count, size=y.size)
    index.entries[b] = dataclasses.replace(y, data_offset=x.data_offset, first_chunk=x.first_chunk,
                                           chunk_count=x.chunk_count, size=x.size)


def change_size(index: LayerIndex) -> None:
    i = _entry(index, "etc/secret")
    index.entries[i] = dataclasses.replace(index.entries[i], size=50)


def add_setuid(index: LayerIndex) -> None:
    i = _entry(index, "etc/hostname")
    index.entries[i] = dataclasses.replace(index.entries[i], mode=index.entries[i].mode | 0o4000)


def rename(index: LayerIndex) -> None:
    i = _entry(index, "etc/hostname")
    index.entries[i] = dataclasses.replace(index.entries[i], path="etc/passwd")


def retarget_symlink(index: LayerIndex) -> None:
    i = _entry(index, "bin/link")
    index.entries[i] = dataclasses.replace(index.entries[i], linkname="/etc/secret")


def flip_window(index: LayerIndex) -> None:
    k = next(i for i, c in enumerate(index.checkpoints) if c.window)
    c = index.checkpoints[k]
    index.checkpoints[k] = Checkpoint(c.kind, c.compressed_offset, c.uncompressed_offset, c.bits,
                                      bytes(b ^ 0xFF for b in c.window))


def inject_whiteout(index: LayerIndex) -> None:
    index.entries.append(Entry("etc/.wh.hostname", EntryType.REG, 0o644, 0, 0, 0, 0))


TAMPERINGS: dict[str, Callable[[LayerIndex], None]] = {
    "offset-swap": swap_offsets, "size": change_size, "mode": add_setuid, "name": rename,
    "symlink-target": retarget_symlink, "window-bytes": flip_window, "whiteout-injection": inject_whiteout,
}


def _publish_forged(env: Env, tmp: Path, tamper: Callable[[LayerIndex], None], *, sign_with: Path | None) -> str:
    (tmp / "l0").write_bytes(env.blobs[0])
    forged = index_file(str(tmp / "l0"), span=256 << 10)
    tamper(forged)
    data = serialize_index(forged)

    async def publish() -> str:
        async with RegistryClient(RegistryConfig()) as c:
            img = await c.resolve(env.ref)
            blob = (indexes.INDEX_LAYER_MEDIA, data, {indexes.LAYER_ANNOTATION: env.layers[0]})
            art = await c.push_artifact(env.ref, subject=img.manifest_descriptor, artifact_type=indexes.INDEX_ARTIFACT,
                                        blobs=[blob], annotations={"org.opencontainers.image.created": FUTURE})
            if sign_with is not None:
                await push_signature(c, env.ref, art.digest, load_private_key(sign_with))
            return art.digest

    return env.loop.run(publish)


def check_layer(d: Path, tar: Path) -> None:
    """Every name, kind, mode, owner, size, link target and byte the mount shows is the tar's
    (as containerd applies it: a hard link's header sets the mode and owner of the inode it
    shares with its target)."""
    attrs: dict[str, tuple[int, int, int]] = {}
    links: dict[str, str] = {}
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.name.removeprefix("./").rstrip("/") not in ("", ".")]
        for m in members:
            name = m.name.removeprefix("./").rstrip("/")
            if m.islnk():
                links[name] = m.linkname
                attrs[m.linkname] = (m.mode, m.uid, m.gid)
            attrs[name] = (m.mode, m.uid, m.gid)
        for name, target in links.items():
            attrs[name] = attrs[target]
        seen: set[str] = set()
        for m in members:
            name = m.name.removeprefix("./").rstrip("/")
            parent, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                continue  # an opaque directory: an xattr of its parent, not a name
            if base.startswith(".wh."):  # shown as overlayfs shows a whiteout: a 0/0 char device
                shown_as = f"{parent}/{base[4:]}".lstrip("/")
                st = os.lstat(d / shown_as)
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, shown_as
                seen.add(shown_as)
                continue
            seen.add(name)
            st = os.lstat(d / name)
            mode, uid, gid = attrs[name]
            assert stat.S_IMODE(st.st_mode) == mode, name
            if m.issym():
                assert os.readlink(d / name) == m.linkname, name
                continue
            assert (st.st_uid, st.st_gid) == (uid, gid), name
            if m.isreg() or m.islnk():
                data = tf.extractfile(tf.getmember(links.get(name, m.name))).read()
                assert (st.st_size, (d / name).read_bytes()) == (len(data), data), name
    shown = {str(p.relative_to(d)) for p in d.rglob("*")}
    implicit = {str(parent) for name in seen for parent in Path(name).parents if str(parent) != "."}
    assert shown - implicit - seen == set(), "names the layer does not have"
    assert seen - shown == set(), "names the layer has, hidden"


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_newer_artifact_changes_nothing(env: Env, tmp_path: Path, name: str) -> None:
    """Unsigned tampered index, newest: the older signed one is used, bytes are the tar's."""
    env.push_index(tmp_path / "publisher")
    _publish_forged(env, tmp_path, TAMPERINGS[name], sign_with=None)
    before = _sample("lazysnap_layer_index_fallbacks_total", reason="unsigned")
    p = env.provider(tmp_path / "node", verify_complete_layers=False)
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "referrer"  # the good older artifact, not hidden
    assert _sample("lazysnap_layer_index_fallbacks_total", reason="unsigned") == before + 1
    check_layer(d0, env.tars[0])


def test_index_signed_by_an_untrusted_key_is_not_used(env: Env, tmp_path: Path) -> None:
    stranger = make_key_pair(tmp_path / "stranger")
    _publish_forged(env, tmp_path, swap_offsets, sign_with=stranger.private)
    p = env.provider(tmp_path / "node", verify_complete_layers=False)
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"  # indexed from the blob itself
    check_layer(d0, env.tars[0])


def test_signature_copied_from_another_artifact_is_not_used(env: Env, tmp_path: Path) -> None:
    """A trusted signature of the honest artifact, copied under the forged one's tag."""
    env.push_index(tmp_path / "publisher")
    forged = _publish_forged(env, tmp_path, swap_offsets, sign_with=None)

    async def copy_signature() -> None:
        async with RegistryClient(RegistryConfig()) as c:
            img = await c.resolve(env.ref)
            honest = [a for a in await c.referrers(env.ref, img.manifest_digest, indexes.INDEX_ARTIFACT)
                      if a.digest != forged][0]
            body, media, _ = await c.get_manifest(env.ref, signature_tag(honest.digest))
            await c.push_manifest(env.ref, body, media, tag=signature_tag(forged))

    env.loop.run(copy_signature)
    p = env.provider(tmp_path / "node", verify_complete_layers=False)
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "referrer"
    check_layer(d0, env.tars[0])
    cached = indexes.open_local(tmp_path / "node", env.layers[0])  # the honest index, cached as such
    assert cached is not None
    cached.close()
    assert indexes.provenance(tmp_path / "node", env.layers[0]) == f"signed:{_fingerprint()}"


def test_no_trusted_keys_means_no_published_index(env: Env, tmp_path: Path) -> None:
    env.push_index(tmp_path / "publisher")
    p = env.provider(tmp_path / "node", trusted_keys=[])
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"
    check_layer(d0, env.tars[0])


def test_cached_index_without_provenance_is_not_served(env: Env, tmp_path: Path) -> None:
    """What an older version cached from any referrer (no provenance record): indexed again."""
    root = tmp_path / "node"
    (tmp_path / "l0").write_bytes(env.blobs[0])
    forged = index_file(str(tmp_path / "l0"))
    swap_offsets(forged)
    path = indexes.index_path(root, env.layers[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(serialize_index(forged))
    p = env.provider(root, trusted_keys=[], verify_complete_layers=False)
    d0 = env.provide(p, 0)
    assert p.layer(env.layers[0]).source == "built"
    check_layer(d0, env.tars[0])
    assert indexes.provenance(root, env.layers[0]) == "built"


def _fingerprint() -> str:
    from snapshotter.registry.signatures import load_public_key

    return load_public_key(publisher_keys().public).fingerprint

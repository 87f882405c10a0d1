"""The image builder other tests rely on: what it pushes is exactly what the spec says.

Layers are read back from the registry over HTTP (not from the local layout), so these
tests also prove the push kept every byte.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import (
    Device, Dir, Fifo, File, HardLink, ImageBuildError, LayerSpec, Symlink, Tree,
    build_image, busybox_rootfs, layer_members, write_layer_tar,
)
from harness.registry import Registry, start_registry

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "reg")
    try:
        yield reg
    finally:
        reg.stop()


def _blob(reg: Registry, repo: str, digest: str, dest: Path) -> Path:
    with urllib.request.urlopen(f"{reg.url}/v2/{repo}/blobs/{digest}") as r:
        dest.write_bytes(r.read())
    return dest


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in layer_members(path)}


def _tar_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:  # transparent gzip/plain
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


SPEC = LayerSpec(
    entries=[
        File("/data/a", b"hello", mode=0o600, uid=12, gid=34, mtime=1234567890,
             xattrs={"user.note": "x"}),
        HardLink("/data/b", "/data/a"),
        Symlink("/data/s", "a"),
        Fifo("/data/fifo"),
        Device("/data/null", "char", 1, 3),
        Dir("/opt/keep", mode=0o700),
    ],
    delete=["/etc/hosts"],
    opaque=["/usr/sbin"],
)


@pytest.mark.parametrize("compression,media,magic", [
    ("gzip", "application/vnd.oci.image.layer.v1.tar+gzip", b"\x1f\x8b"),
    ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd", b"\x28\xb5\x2f\xfd"),
    ("none", "application/vnd.oci.image.layer.v1.tar", b"usr"),
])
def test_pushed_layer_has_spec_entries(tmp_path: Path, registry: Registry, compression: str,
                                       media: str, magic: bytes) -> None:
    img = build_image(tmp_path / "b", [LayerSpec.files({"/etc/hosts": b"x"}), SPEC],
                      cmd=["cat", "/data/a"], ref=f"{registry.host}/t/spec:{compression}",
                      compression=compression)  # type: ignore[arg-type]
    assert img.layer_media_types == [media, media]
    blob = _blob(registry, "t/spec", img.layer_digests[1], tmp_path / "layer")
    raw = blob.read_bytes()
    assert raw.startswith(magic)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == img.layer_digests[1]
    assert img.layer_sizes[1] == len(raw)
    assert img.blob(img.layer_digests[1]).read_bytes() == raw

    m = _members(blob)
    names = list(m)
    # opaque marker right after its directory, whiteout present, parents before children
    assert names.index("usr/sbin/.wh..wh..opq") == names.index("usr/sbin") + 1
    assert "etc/.wh.hosts" in m and "etc/hosts" not in m
    assert names.index("data") < names.index("data/a") < names.index("data/b")
    a = m["data/a"]
    assert (a.mode, a.uid, a.gid, a.mtime, a.size) == (0o600, 12, 34, 1234567890, 5)
    assert a.pax_headers.get("SCHILY.xattr.user.note") == "x"
    assert m["data/b"].islnk() and m["data/b"].linkname == "data/a"
    assert m["data/s"].issym() and m["data/s"].linkname == "a"
    assert m["data/fifo"].isfifo()
    assert m["data/null"].ischr() and (m["data/null"].devmajor, m["data/null"].devminor) == (1, 3)
    assert m["opt/keep"].isdir() and m["opt/keep"].mode == 0o700

    # diff ID = sha256 of the uncompressed tar; config carries the command
    plain = tmp_path / "plain.tar"
    if compression == "gzip":
        plain.write_bytes(gzip.decompress(raw))
    elif compression == "zstd":
        import zstandard
        plain.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(raw))
    else:
        plain.write_bytes(raw)
    assert img.diff_ids[1] == "sha256:" + hashlib.sha256(plain.read_bytes()).hexdigest()
    assert _tar_bytes(plain, "data/a") == b"hello"
    cfg = json.loads(_blob(registry, "t/spec", img.config_digest, tmp_path / "cfg").read_bytes())
    assert cfg["config"]["Cmd"] == ["cat", "/data/a"]
    manifest = json.loads(img.manifest)
    assert [layer["digest"] for layer in manifest["layers"]] == img.layer_digests


def test_same_spec_same_digests(tmp_path: Path, registry: Registry) -> None:
    """Builds are reproducible: fixed mtimes and history dates give equal digests."""
    one = build_image(tmp_path / "1", [SPEC], cmd=["true"], ref=f"{registry.host}/t/r:1")
    two = build_image(tmp_path / "2", [SPEC], cmd=["true"], ref=f"{registry.host}/t/r:2")
    assert one.layer_digests == two.layer_digests
    assert one.manifest_digest == two.manifest_digest
    other = build_image(tmp_path / "3", [LayerSpec.files({"/x": b"y"})], cmd=["true"],
                        ref=f"{registry.host}/t/r:3")
    assert other.layer_digests != one.layer_digests


def test_tree_truncates_mtimes_and_keeps_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    f = src / "pkg" / "mod.py"
    f.write_text("x = 1\n")
    os.utime(f, ns=(1_700_000_001_900_000_000, 1_700_000_001_900_000_000))  # 0.9 s: rounding would give ...002
    os.link(f, src / "pkg" / "alias.py")
    os.symlink("mod.py", src / "pkg" / "link.py")
    out = tmp_path / "layer.tar"
    write_layer_tar(LayerSpec(trees=[Tree(src, "/usr/lib")]), out)
    m = _members(out)
    # walk is name-sorted: alias.py comes first and holds the data, mod.py links to it
    assert m["usr/lib/pkg/alias.py"].isreg() and m["usr/lib/pkg/alias.py"].mtime == 1_700_000_001
    assert m["usr/lib/pkg/mod.py"].islnk() and m["usr/lib/pkg/mod.py"].linkname == "usr/lib/pkg/alias.py"
    assert m["usr/lib/pkg/link.py"].linkname == "mod.py"
    assert list(m)[:2] == ["usr", "usr/lib"]


@ROOT
def test_tree_overlay_upper_markers(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc" / "conf.d").mkdir(parents=True)
    os.mknod(upper / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "etc" / "conf.d", "trusted.overlay.opaque", b"y")
    (upper / "etc" / "conf.d" / "new").write_text("n")
    out = tmp_path / "layer.tar"
    write_layer_tar(LayerSpec(trees=[Tree(upper, overlay_upper=True)]), out)
    m = _members(out)
    assert "etc/.wh.gone" in m and "etc/gone" not in m
    assert "etc/conf.d/.wh..wh..opq" in m and "etc/conf.d/new" in m


@pytest.mark.parametrize("spec,msg", [
    (LayerSpec(entries=[File("/../escape", b"")]), "invalid image path"),
    (LayerSpec(entries=[HardLink("/a", "/missing")]), "not earlier in the layer"),
])
def test_bad_spec_is_rejected(tmp_path: Path, spec: LayerSpec, msg: str) -> None:
    with pytest.raises(ImageBuildError, match=msg):
        write_layer_tar(spec, tmp_path / "x.tar")


def test_push_failure_is_one_clear_error(tmp_path: Path, registry: Registry) -> None:
    registry.stop()
    with pytest.raises(ImageBuildError, match="skopeo push failed"):
        build_image(tmp_path, [SPEC], cmd=["true"], ref=f"{registry.host}/t/down:1")


@ROOT
@pytest.mark.root
def test_busybox_image_runs_in_containerd(tmp_path: Path, registry: Registry) -> None:
    from harness.containerd import start_containerd

    layers = [busybox_rootfs(),
              LayerSpec.files({"/data/msg": b"from layer two\n"}, delete=["/etc/hosts"])]
    img = build_image(tmp_path / "b", layers, cmd=["/bin/sh", "-c", "cat /data/msg; ls /etc"],
                      ref=f"{registry.host}/t/bb:1")
    with start_containerd(tmp_path / "ctrd") as cd:
        cd.ctr("images", "pull", "--plain-http", img.ref)
        out = cd.ctr("run", "--rm", img.ref, "bb1").stdout
    assert "from layer two" in out
    assert "passwd" in out and "hosts" not in out  # the whiteout hid /etc/hosts

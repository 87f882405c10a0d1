"""Build OCI images from file specs with ``umoci`` and push them with ``skopeo``.

Tests need images whose layers hold exactly what the test says: odd file types, owners,
mtimes, hard links, whiteouts and opaque directories. So each layer tar is written here
with :mod:`tarfile` (full control, deterministic) and appended verbatim with
``umoci raw add-layer``; ``umoci config`` sets the command, ``skopeo`` (re)compresses
and pushes to a loopback registry over plain HTTP.

Usage::

    layers = [busybox_rootfs(), LayerSpec.files({"/data/a": b"hello"}, delete=["/etc/motd"])]
    img = build_image(tmp_path, layers, cmd=["cat", "/data/a"], ref=f"{reg.host}/t/a:v1")
    img.manifest_digest, img.layer_digests, img.blob(img.layer_digests[0])
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

__all__ = [
    "File", "Dir", "Symlink", "HardLink", "Fifo", "Device", "Tree", "Entry",
    "LayerSpec", "PushedImage", "ImageBuildError",
    "write_layer_tar", "build_layout", "push_layout", "build_image", "read_pushed",
    "busybox_rootfs", "busybox_entries", "ensure_busybox", "layer_members",
]

#: Default mtime for in-memory entries: a fixed second keeps layers reproducible.
DEFAULT_MTIME = 1_700_000_000
Compression = Literal["gzip", "zstd", "none"]
_TAG = "build"

MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"


class ImageBuildError(RuntimeError):
    """A tool (umoci, skopeo) failed or a spec is invalid; the message says which."""


# ---------------------------------------------------------------- layer entries


@dataclass(slots=True, frozen=True)
class File:
    """A regular file with literal content."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(slots=True, frozen=True)
class HardLink:
    """A hard link to ``target``, an earlier regular file of the same layer."""

    path: str
    target: str


@dataclass(slots=True, frozen=True)
class Fifo:
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(slots=True, frozen=True)
class Device:
    path: str
    kind: Literal["char", "block"] = "char"
    major: int = 0
    minor: int = 0
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(slots=True, frozen=True)
class Tree:
    """A directory tree on disk added below ``dest``.

    Owners, modes, links, devices and fifos are kept; mtimes are truncated to whole
    seconds (pip's .pyc files record the source mtime in whole seconds: a rounded mtime
    would make every .pyc stale). Sockets are skipped; xattrs are not copied.
    With ``overlay_upper`` the tree is an overlayfs upper directory: its whiteouts (char
    device 0/0) become ``.wh.`` entries and ``trusted.overlay.opaque=y`` directories
    get an opaque marker, which is how containerd turns a container's changes into a layer.
    """

    source: Path
    dest: str = "/"
    overlay_upper: bool = False


Entry = File | Dir | Symlink | HardLink | Fifo | Device


@dataclass(slots=True)
class LayerSpec:
    """One layer: entries in order, whiteouts, opaque directories, trees from disk.

    In the tar, opaque markers come first, then whiteouts, then ``entries`` in the given
    order (missing parent directories are inserted before their first child when
    ``parents`` is true), then ``trees``.
    """

    entries: Sequence[Entry] = ()
    delete: Sequence[str] = ()
    opaque: Sequence[str] = ()
    trees: Sequence[Tree] = ()
    parents: bool = True

    @classmethod
    def files(cls, mapping: Mapping[str, bytes | str], *, mode: int = 0o644,
              delete: Sequence[str] = (), opaque: Sequence[str] = ()) -> LayerSpec:
        """A layer of regular files from ``{path: content}``."""
        entries = [File(p, d.encode() if isinstance(d, str) else d, mode=mode)
                   for p, d in mapping.items()]
        return cls(entries=entries, delete=delete, opaque=opaque)


# ---------------------------------------------------------------- tar writing


def _norm(path: str) -> str:
    """Tar member name for an absolute or relative image path; rejects escapes."""
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        raise ImageBuildError(f"invalid image path {path!r}")
    return "/".join(parts)


def _info(name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: int = DEFAULT_MTIME, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode & 0o7777
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = int(mtime)
    ti.size = size
    return ti


def _xattr_headers(xattrs: Mapping[str, str]) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}


class _LayerWriter:
    """Streams entries into a PAX tar, adding implicit parent directories once."""

    def __init__(self, fileobj: io.BufferedWriter, parents: bool) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)
        self.parents = parents
        self.seen: set[str] = set()
        self.count = 0

    def _ensure_parents(self, name: str) -> None:
        if not self.parents:
            return
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self.count += 1
                self.tar.addfile(_info(d, tarfile.DIRTYPE, mode=0o755))

    def add(self, ti: tarfile.TarInfo, data: io.IOBase | None = None) -> None:
        self._ensure_parents(ti.name)
        self.seen.add(ti.name)
        self.count += 1
        self.tar.addfile(ti, data)

    def entry(self, e: Entry) -> None:
        name = _norm(e.path)
        if isinstance(e, File):
            ti = _info(name, tarfile.REGTYPE, mode=e.mode, uid=e.uid, gid=e.gid,
                       mtime=e.mtime, size=len(e.data))
            ti.pax_headers = _xattr_headers(e.xattrs)
            self.add(ti, io.BytesIO(e.data))
        elif isinstance(e, Dir):
            ti = _info(name, tarfile.DIRTYPE, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime)
            ti.pax_headers = _xattr_headers(e.xattrs)
            self.add(ti)
        elif isinstance(e, Symlink):
            ti = _info(name, tarfile.SYMTYPE, mode=0o777, uid=e.uid, gid=e.gid, mtime=e.mtime)
            ti.linkname = e.target
            self.add(ti)
        elif isinstance(e, HardLink):
            target = _norm(e.target)
            if target not in self.seen:
                raise ImageBuildError(f"hard link {e.path!r} names {e.target!r}, not earlier in the layer")
            ti = _info(name, tarfile.LNKTYPE, mode=0o644)
            ti.linkname = target
            self.add(ti)
        elif isinstance(e, Fifo):
            self.add(_info(name, tarfile.FIFOTYPE, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime))
        elif isinstance(e, Device):
            kind = tarfile.CHRTYPE if e.kind == "char" else tarfile.BLKTYPE
            ti = _info(name, kind, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime)
            ti.devmajor, ti.devminor = e.major, e.minor
            self.add(ti)
        else:  # pragma: no cover - typing guards this
            raise ImageBuildError(f"unknown entry {e!r}")

    def whiteout(self, path: str) -> None:
        name = _norm(path)
        parent, _, base = name.rpartition("/")
        wh = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
        self.add(_info(wh, tarfile.REGTYPE, mode=0o644))

    def opaque(self, path: str) -> None:
        name = _norm(path)
        if name not in self.seen:
            self.add(_info(name, tarfile.DIRTYPE, mode=0o755))
        self.add(_info(f"{name}/.wh..wh..opq", tarfile.REGTYPE, mode=0o644))

    def tree(self, t: Tree) -> None:
        src = Path(t.source)
        if not src.is_dir():
            raise ImageBuildError(f"tree source {src} is not a directory")
        dest = t.dest.strip("/")
        links: dict[tuple[int, int], str] = {}
        for path in _walk(src):
            rel = path.relative_to(src).as_posix()
            name = "/".join(x for x in (dest, "" if rel == "." else rel) if x)
            if not name:
                continue  # the tree root itself when dest is "/"
            st = path.lstat()
            m = st.st_mode
            ti = _info(name, tarfile.REGTYPE, mode=stat.S_IMODE(m), uid=st.st_uid,
                       gid=st.st_gid, mtime=int(st.st_mtime))
            if t.overlay_upper and stat.S_ISCHR(m) and st.st_rdev == 0:
                self.whiteout(name)
            elif stat.S_ISDIR(m):
                ti.type = tarfile.DIRTYPE
                self.add(ti)
                if t.overlay_upper and _is_opaque(path):
                    self.add(_info(f"{name}/.wh..wh..opq", tarfile.REGTYPE, mode=0o644))
            elif stat.S_ISLNK(m):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                self.add(ti)
            elif stat.S_ISREG(m):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
                    self.add(ti)
                    continue
                links[key] = name
                ti.size = st.st_size
                with open(path, "rb") as f:
                    self.add(ti, f)
            elif stat.S_ISFIFO(m):
                ti.type = tarfile.FIFOTYPE
                self.add(ti)
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(m) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                self.add(ti)
            # sockets and other oddities are not representable in a layer: skipped

    def close(self) -> None:
        self.tar.close()


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _walk(root: Path) -> Iterator[Path]:
    """Depth-first, sorted walk (root first) without following symlinks."""
    yield root
    stack = [root]
    while stack:
        d = stack.pop()
        children = sorted(d.iterdir(), key=lambda p: p.name)
        subdirs = []
        for c in children:
            yield c
            if c.is_dir() and not c.is_symlink():
                subdirs.append(c)
        # process subdirectories in name order after listing this directory
        stack.extend(reversed(subdirs))


def write_layer_tar(spec: LayerSpec, out: Path) -> int:
    """Write ``spec`` as an uncompressed PAX tar at ``out``; returns the entry count."""
    with open(out, "wb") as f:
        w = _LayerWriter(f, spec.parents)
        for p in spec.opaque:
            w.opaque(p)
        for p in spec.delete:
            w.whiteout(p)
        for e in spec.entries:
            w.entry(e)
        for t in spec.trees:
            w.tree(t)
        w.close()
    return w.count


# ---------------------------------------------------------------- OCI layout + push


@dataclass(slots=True)
class PushedImage:
    """What the registry holds after a push (read back from it, not assumed)."""

    ref: str
    manifest_digest: str
    layer_digests: list[str]
    layer_sizes: list[int]
    layer_media_types: list[str]
    diff_ids: list[str]
    config_digest: str
    manifest: bytes
    layout: Path | None = None

    @property
    def repo(self) -> str:
        """``host/name`` without tag."""
        return _split_ref(self.ref)[0]

    @property
    def digest_ref(self) -> str:
        """``host/name@sha256:…``: the pushed manifest pinned by digest."""
        return f"{self.repo}@{self.manifest_digest}"

    @property
    def compressed_size(self) -> int:
        return sum(self.layer_sizes)

    def blob(self, digest: str) -> Path:
        """Path of a blob in the local layout (OCI or skopeo ``dir:``) pushed from."""
        if self.layout is None:
            raise ImageBuildError("image has no local layout")
        algo, _, hexd = digest.partition(":")
        p = self.layout / "blobs" / algo / hexd
        if not p.exists():
            p = self.layout / hexd
        if not p.exists():
            raise ImageBuildError(f"blob {digest} not in layout {self.layout}")
        return p


def _split_ref(ref: str) -> tuple[str, str]:
    """``host:port/name:tag`` → (``host:port/name``, ``tag``)."""
    if "@" in ref:
        repo, _, dig = ref.partition("@")
        return repo, dig
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, "latest"


def _run(argv: Sequence[str], what: str, timeout: float = 1800) -> subprocess.CompletedProcess[bytes]:
    try:
        cp = subprocess.run(list(argv), capture_output=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what}: {argv[0]} not installed") from exc
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip().splitlines()
        raise ImageBuildError(f"{what} failed (exit {cp.returncode}): {' | '.join(err[-5:])}")
    return cp


def build_layout(layout: Path, layers: Sequence[LayerSpec | Path], *, cmd: Sequence[str] | None,
                 env: Sequence[str] = (), entrypoint: Sequence[str] | None = None,
                 workdir_in_image: str | None = None, tmpdir: Path | None = None,
                 history: Sequence[str] | None = None) -> Path:
    """Create an OCI layout (gzip layers, tag ``build``) at ``layout``.

    A layer is a :class:`LayerSpec` or the path of an already written uncompressed tar.
    """
    if layout.exists():
        raise ImageBuildError(f"layout {layout} already exists")
    _run(["umoci", "init", "--layout", str(layout)], "umoci init")
    image = f"{layout}:{_TAG}"
    _run(["umoci", "new", "--image", image], "umoci new")
    scratch = Path(tempfile.mkdtemp(prefix="layer-", dir=tmpdir or layout.parent))
    try:
        for i, spec in enumerate(layers):
            if isinstance(spec, LayerSpec):
                tar = scratch / f"layer{i}.tar"
                write_layer_tar(spec, tar)
            else:
                tar = Path(spec)
            comment = history[i] if history else f"layer {i}"
            _run(["umoci", "raw", "add-layer", "--image", image,
                  "--history.created", "2023-11-14T22:13:20Z", "--history.created_by", comment, str(tar)], "umoci raw add-layer")
            if isinstance(spec, LayerSpec):
                tar.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cfg = ["umoci", "config", "--image", image, "--no-history",
           "--created", "2023-11-14T22:13:20Z", "--author", "lazysnap-harness"]
    if entrypoint is not None:
        cfg += [f"--config.entrypoint={a}" for a in entrypoint]
    if cmd is not None:
        cfg += [f"--config.cmd={a}" for a in cmd]
    cfg += [f"--config.env={e}" for e in env]
    if workdir_in_image:
        cfg += [f"--config.workingdir={workdir_in_image}"]
    _run(cfg, "umoci config")
    _run(["umoci", "gc", "--layout", str(layout)], "umoci gc")
    return layout


def _recompress(layout: Path, compression: Compression) -> tuple[Path, str]:
    """The layout's image with layers in ``compression``: (path, skopeo transport).

    gzip is umoci's own output; zstd and uncompressed copies go through skopeo's ``dir:``
    transport (the only one that honours ``--dest-decompress``), cached next to the layout.
    """
    if compression == "gzip":
        return layout, "oci"
    argv = ["skopeo", "copy", "-q"]
    if compression == "zstd":
        argv += ["--dest-compress", "--dest-compress-format", "zstd"]
    elif compression == "none":
        argv += ["--dest-decompress"]
    else:
        raise ImageBuildError(f"unknown compression {compression!r} (gzip, zstd, none)")
    out = layout.with_name(layout.name + f"-{compression}")
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(argv + [f"oci:{layout}:{_TAG}", f"dir:{tmp}"], f"skopeo recompress {compression}")
        tmp.rename(out)
    return out, "dir"


def push_layout(layout: Path, ref: str, *, compression: Compression = "gzip",
                tls_verify: bool = False, creds: tuple[str, str] | None = None) -> PushedImage:
    """Push the layout's ``build`` tag to ``ref`` (``host:port/name:tag``), read it back."""
    src, transport = _recompress(layout, compression)
    argv = ["skopeo", "copy", "-q", "--preserve-digests",
            f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    if creds:
        argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    source = f"oci:{src}:{_TAG}" if transport == "oci" else f"dir:{src}"
    _run(argv + [source, f"docker://{ref}"], "skopeo push")
    img = read_pushed(ref, tls_verify=tls_verify, creds=creds)
    img.layout = src
    return img


def read_pushed(ref: str, *, tls_verify: bool = False,
                creds: tuple[str, str] | None = None) -> PushedImage:
    """Manifest, layer and config digests of ``ref`` as the registry serves them."""
    base = ["skopeo", "inspect", "--raw", f"--tls-verify={'true' if tls_verify else 'false'}"]
    if creds:
        base += ["--creds", f"{creds[0]}:{creds[1]}"]
    raw = _run(base + [f"docker://{ref}"], "skopeo inspect").stdout
    manifest = json.loads(raw)
    cfg = json.loads(_run(base + ["--config", f"docker://{ref}"], "skopeo inspect --config").stdout)
    layers = manifest["layers"]
    return PushedImage(
        ref=ref,
        manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        layer_digests=[layer["digest"] for layer in layers],
        layer_sizes=[int(layer["size"]) for layer in layers],
        layer_media_types=[layer["mediaType"] for layer in layers],
        diff_ids=list(cfg.get("rootfs", {}).get("diff_ids", [])),
        config_digest=manifest["config"]["digest"],
        manifest=raw,
    )


def build_image(workdir: Path, layers: Sequence[LayerSpec | Path], *, cmd: Sequence[str] | None,
                ref: str, compression: Compression = "gzip", tls_verify: bool = False,
                env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
                entrypoint: Sequence[str] | None = None,
                creds: tuple[str, str] | None = None) -> PushedImage:
    """Build ``layers`` into a fresh OCI layout under ``workdir`` and push it to ``ref``."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="image-", dir=workdir))
    layout = build_layout(base / "oci", layers, cmd=cmd, env=env, entrypoint=entrypoint)
    return push_layout(layout, ref, compression=compression, tls_verify=tls_verify, creds=creds)


# ---------------------------------------------------------------- reading layers back


def layer_members(blob: Path) -> list[tarfile.TarInfo]:
    """The tar members of a layer blob (gzip, zstd or plain), in order."""
    with open(blob, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        import gzip
        fobj: io.IOBase = gzip.open(blob, "rb")
    elif magic == b"\x28\xb5\x2f\xfd":
        import zstandard
        fobj = zstandard.ZstdDecompressor().stream_reader(open(blob, "rb"))
    else:
        fobj = open(blob, "rb")
    with fobj, tarfile.open(fileobj=fobj, mode="r|") as tar:
        out = []
        for ti in tar:
            out.append(ti)
        return out


# ---------------------------------------------------------------- busybox rootfs

BUSYBOX = Path("/bin/busybox")


def ensure_busybox() -> Path:
    """Path of a static busybox; installs Debian's ``busybox-static`` when missing (root)."""
    if BUSYBOX.exists():
        return BUSYBOX
    if os.geteuid() != 0:
        raise ImageBuildError("/bin/busybox missing: apt-get install busybox-static")
    _run(["apt-get", "install", "-y", "-q", "busybox-static"], "apt-get install busybox-static", 900)
    if not BUSYBOX.exists():
        raise ImageBuildError("busybox-static installed but /bin/busybox missing")
    return BUSYBOX


def busybox_entries() -> list[Entry]:
    """Entries of a tiny runnable rootfs: static busybox, applet symlinks, /etc basics."""
    bb = ensure_busybox()
    data = bb.read_bytes()
    applets = _run([str(bb), "--list-full"], "busybox --list-full").stdout.decode().split()
    entries: list[Entry] = [Dir(d) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin",
                                              "etc", "root", "proc", "sys", "dev", "run", "var")]
    entries.append(Dir("tmp", mode=0o1777))
    entries.append(File("bin/busybox", data, mode=0o755))
    for a in sorted(set(applets)):
        if a.strip("/") != "bin/busybox":
            entries.append(Symlink(a, "/bin/busybox"))
    entries += [
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        File("etc/hosts", b"127.0.0.1 localhost\n"),
    ]
    return entries


def busybox_rootfs(extra: Iterable[Entry] = ()) -> LayerSpec:
    """A layer with a runnable busybox rootfs (plus ``extra`` entries)."""
    return LayerSpec(entries=[*busybox_entries(), *extra])

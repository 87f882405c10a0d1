"""``lazysnap index REF --push`` and ``lazysnap cat REF PATH`` end to end: real gzip
images built with harness.images (umoci + skopeo) in a loopback docker-registry, the
CLI run as a subprocess, bytes compared with what the layers hold."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.images import Dir, File, HardLink, LayerSpec, Symlink, build_image
from harness.registry import start_registry
from harness.signing import publisher_keys

REPO = Path(__file__).resolve().parent.parent
BIG = os.urandom(3 << 20) + b"compressible " * 200_000  # ~5.6 MiB, several 1 MiB spans


def lazysnap(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, env=e,
                          cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"lazysnap {args} failed: {proc.stderr.decode()}")
    return proc


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("cli")
    with start_registry(work / "reg") as reg:
        layers = [
            LayerSpec(entries=[File("/etc/a", b"a from layer 1\n"), File("/etc/b", b"b\n"),
                               File("/data/big", BIG), File("/dir/x", b"x\n"), File("/dir/y", b"y\n"),
                               Dir("/usr/lib/real"), File("/usr/lib/real/f", b"real f\n"),
                               File("/gone/deep/file", b"deep\n")]),
            LayerSpec(entries=[File("/etc/a", b"a from layer 2\n"), File("/dir/z", b"z\n"),
                               File("/data/new", b"hard linked content\n"), HardLink("/data/hl", "/data/new"),
                               Symlink("/lib", "usr/lib"), Symlink("/abs", "/usr/lib/real/f")],
                      delete=["/etc/b", "/gone"], opaque=["/dir"]),
            LayerSpec.files({"/top": b"top layer\n"}),
        ]
        img = build_image(work, layers, cmd=["/bin/true"], ref=f"{reg.host}/lazysnap/cli:v1")
        yield reg, img, work


def test_index_push_then_cat_uses_published_index(image, tmp_path: Path) -> None:
    reg, img, _ = image
    keys = publisher_keys()
    out = lazysnap("index", img.ref, "--push", "--sign-key", str(keys.private), "--span", str(1 << 20),
                   "--root", str(tmp_path / "r1"))
    text = out.stdout.decode()
    assert f"layers={len(img.layer_digests)}" in text and "pushed=sha256:" in text and "signature=sha256-" in text
    for dg in img.layer_digests:
        assert (tmp_path / "r1" / "indexes" / f"{dg.replace(':', '-')}.idx").is_file()
    # a fresh root: the indexes come from the registry (referrers fallback tag), not rebuilt
    root2 = str(tmp_path / "r2")
    res = lazysnap("cat", img.ref, "/data/big", "--offset", str(4 << 20), "--length", "5000",
                   "--stats", "--root", root2, "--trusted-key", str(keys.public))
    assert res.stdout == BIG[4 << 20:(4 << 20) + 5000]
    stats = json.loads(res.stderr.decode().strip().splitlines()[-1])
    assert set(stats["index_sources"].values()) == {"referrer"}
    range_bytes = stats["bytes_by_purpose"]["range"]
    assert 0 < range_bytes < (2 << 20)  # one ~1 MiB span, not the ~3.7 MB layer
    assert stats["registry_bytes"] < img.layer_sizes[0]
    assert "layer" not in stats["bytes_by_purpose"]  # no layer was downloaded whole
    assert 0 < stats["bytes_by_purpose"]["index"] < img.layer_sizes[0]
    # a node that does not trust the publisher's key never uses the published index
    res = lazysnap("cat", img.ref, "/data/big", "--offset", str(4 << 20), "--length", "5000",
                   "--stats", "--root", str(tmp_path / "r3"))
    assert res.stdout == BIG[4 << 20:(4 << 20) + 5000]
    assert set(json.loads(res.stderr.decode().strip().splitlines()[-1])["index_sources"].values()) == {"built"}


def test_index_push_windows_apart_then_cat(tmp_path: Path) -> None:
    """Windows published apart: the node fetches the small index, then only the windows of
    the checkpoints its reads decode from. (An image of its own: with two index artifacts
    of one manifest, which one a node picks is not this test's business.)"""
    with start_registry(tmp_path / "reg") as reg:
        img = build_image(tmp_path, [LayerSpec.files({"/data/big": BIG})], cmd=None,
                          ref=f"{reg.host}/lazysnap/apart:v1")
        _apart_then_cat(img, tmp_path)


def _apart_then_cat(img, tmp_path: Path) -> None:
    keys = publisher_keys()
    out = lazysnap("index", img.ref, "--push", "--windows-apart", "--sign-key", str(keys.private),
                   "--root", str(tmp_path / "r1"))
    summary = out.stdout.decode().strip().splitlines()[-1]
    assert "pushed=sha256:" in summary and "windows_bytes=" in summary
    windows_total = int(summary.rsplit("windows_bytes=", 1)[1].split()[0])
    assert windows_total > 0
    res = lazysnap("cat", img.ref, "/data/big", "--offset", str(3 << 20), "--length", "5000",
                   "--stats", "--root", str(tmp_path / "r2"), "--trusted-key", str(keys.public))
    assert res.stdout == BIG[3 << 20:(3 << 20) + 5000]
    stats = json.loads(res.stderr.decode().strip().splitlines()[-1])
    assert set(stats["index_sources"].values()) == {"referrer"}
    assert stats["bytes_by_purpose"]["range"] < (1 << 20)  # from a checkpoint <= 256 KiB before it
    assert "layer" not in stats["bytes_by_purpose"]
    # the index heads plus the window the read decodes from, not every window
    heads = int(summary.split(" index_bytes=", 1)[1].split()[0])
    assert heads < stats["bytes_by_purpose"]["index"] < heads + windows_total
    assert lazysnap("index", img.ref, "--windows-apart", "--root", str(tmp_path / "r1"),
                    check=False).returncode == 2  # only meaningful when publishing


@pytest.mark.parametrize("path,expected", [
    ("/etc/a", b"a from layer 2\n"),          # top-most layer wins
    ("/dir/z", b"z\n"),
    ("/data/hl", b"hard linked content\n"),   # hard link resolved
    ("/lib/real/f", b"real f\n"),             # relative symlink in a parent component
    ("/abs", b"real f\n"),                    # absolute symlink
    ("/top", b"top layer\n"),
    ("/data/big", BIG),
])
def test_cat_merged_view(image, tmp_path: Path, path: str, expected: bytes) -> None:
    reg, img, work = image
    res = lazysnap("cat", img.ref, path, "--root", str(work / "shared-root"))
    assert res.stdout == expected


@pytest.mark.parametrize("path,why", [
    ("/etc/b", "no such file"),       # whiteout
    ("/dir/x", "no such file"),       # hidden by the opaque directory
    ("/gone/deep/file", "no such file"),  # whiteout of an ancestor
    ("/nope", "no such file"),
    ("/etc", "not a regular file"),
])
def test_cat_missing_paths_are_clear_errors(image, tmp_path: Path, path: str, why: str) -> None:
    reg, img, work = image
    res = lazysnap("cat", img.ref, path, "--root", str(work / "shared-root"), check=False)
    assert res.returncode == 1 and res.stdout == b""
    err = res.stderr.decode().strip()
    assert why in err and len(err.splitlines()) == 1, err


def test_cat_builds_index_when_none_published(tmp_path: Path) -> None:
    with start_registry(tmp_path / "reg") as reg:
        img = build_image(tmp_path, [LayerSpec.files({"/hello": b"hello lazysnap\n"})], cmd=None,
                          ref=f"{reg.host}/lazysnap/fresh:v1", compression="none")
        res = lazysnap("cat", img.ref, "hello", "--stats", "--root", str(tmp_path / "root"))
        assert res.stdout == b"hello lazysnap\n"
        assert json.loads(res.stderr.decode().splitlines()[-1])["index_sources"] == {
            img.layer_digests[0]: "built"}


def test_cli_auth_error_is_one_line_without_secret(tmp_path: Path) -> None:
    secret = "cli-Secret-123"
    with start_registry(tmp_path / "reg", htpasswd=("erin", secret)) as reg:
        img = build_image(tmp_path, [LayerSpec.files({"/f": b"auth ok\n"})], cmd=None,
                          ref=f"{reg.host}/lazysnap/auth:v1", creds=("erin", secret))
        cfg = tmp_path / "dockercfg"
        cfg.mkdir()

        def with_password(pw: str) -> dict[str, str]:
            auth = base64.b64encode(f"erin:{pw}".encode()).decode()
            (cfg / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
            return {"DOCKER_CONFIG": str(cfg)}

        ok = lazysnap("cat", img.ref, "/f", "--root", str(tmp_path / "root"), env=with_password(secret))
        assert ok.stdout == b"auth ok\n"
        bad = lazysnap("cat", img.ref, "/f", "--root", str(tmp_path / "root2"),
                       env=with_password("wrong-" + secret), check=False)
        err = bad.stderr.decode()
        assert bad.returncode == 1 and len(err.strip().splitlines()) == 1
        assert "erin" in err and "rejected" in err and secret not in err


def test_index_push_and_cat_through_a_share_registry(tmp_path: Path) -> None:
    """--share-registry: a publisher without push rights to the image's repository publishes
    under the share registry's copy of its path; `cat` finds the indexes there only when told
    to look, and a bad value is one usage error."""
    keys = publisher_keys()
    with start_registry(tmp_path / "reg") as reg:
        img = build_image(tmp_path, [LayerSpec.files({"/data/big": BIG})], cmd=None,
                          ref=f"{reg.host}/lazysnap/shared:v1")
        share = f"{reg.host}/fleet-cache"
        out = lazysnap("index", img.ref, "--push", "--sign-key", str(keys.private), "--share-registry", share,
                       "--root", str(tmp_path / "publisher"))
        assert "pushed=sha256:" in out.stdout.decode()

        def sources(root: str, *flags: str) -> set[str]:
            res = lazysnap("cat", img.ref, "/data/big", "--length", "4096", "--stats", "--root",
                           str(tmp_path / root), "--trusted-key", str(keys.public), *flags)
            assert res.stdout == BIG[:4096]
            return set(json.loads(res.stderr.decode().strip().splitlines()[-1])["index_sources"].values())

        assert sources("a") == {"built"}  # nothing in the image's own repository
        assert sources("b", "--share-registry", share) == {"referrer"}
        bad = lazysnap("cat", img.ref, "/data/big", "--share-registry", "not a registry", check=False)
        assert bad.returncode == 2 and "share_registry" in bad.stderr.decode()
        bad = lazysnap("index", img.ref, "--share-registry", share, check=False)
        assert bad.returncode == 2 and "needs --push" in bad.stderr.decode()


def test_profile_push_and_show_through_a_share_registry(tmp_path: Path) -> None:
    """A profile pushed with --share-registry lands there, not in the image's repository;
    `profile show` finds it there only when told to look."""
    from snapshotter.prefetch.profile import ChunkAccess, LayerProfile, Profile, save

    keys = publisher_keys()
    with start_registry(tmp_path / "reg") as reg:
        img = build_image(tmp_path, [LayerSpec.files({"/app": b"app\n"})], cmd=None,
                          ref=f"{reg.host}/lazysnap/profiled:v1")
        share = f"{reg.host}/fleet-cache"
        publisher = tmp_path / "publisher"
        save(publisher, Profile(img.manifest_digest, [LayerProfile(img.layer_digests[0], 1, [
            ChunkAccess(0, 4, "app", 0, 4, [100])])]))
        lazysnap("profile", "push", img.ref, "--no-pack", "--sign-key", str(keys.private), "--share-registry",
                 share, "--root", str(publisher))
        shown = lazysnap("profile", "show", img.ref, "--trusted-key", str(keys.public), "--share-registry",
                         share, "--root", str(tmp_path / "fresh"), "--json")
        doc = json.loads(shown.stdout)
        assert doc["chunks"] == 1 and doc["vouched"].startswith("signed:")
        assert f"in {share}/lazysnap/profiled:v1" in doc["source"]
        missing = lazysnap("profile", "show", img.ref, "--root", str(tmp_path / "fresh"), check=False)
        assert missing.returncode == 1 and "no profile" in missing.stderr.decode()

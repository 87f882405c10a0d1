"""Start-up profiles end to end: real containerd + runc + docker-registry + `lazysnap serve`.

Record an image's start on one node (`lazysnap record`), publish the profile
(`lazysnap profile push`), then start the image on a fresh node (empty daemon root): the
profile is found in the registry, prefetched at the first Prepare, and the start's first
reads hit local chunks (the daemon's `lazysnap_startup_chunk_reads_total` metric). A profile
made for another manifest is rejected with a log line and the start goes on. Background
fill then completes and verifies every layer; a SIGKILL in the middle of it loses nothing
that was verified.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.containerd import (
    Containerd,
    LazysnapDaemon,
    lazysnap_node,
    start_containerd,
    start_lazysnap,
    unmount_under,
)
from harness.images import File, LayerSpec, PushedImage, build_image, busybox_rootfs
from harness.proxy import Fault, Proxy, start_proxy
from harness.registry import Registry, start_registry
from harness.signing import publisher_keys, sign_flags

pytestmark = [pytest.mark.root, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
BIG = 32 * MiB
SKIPS = (3, 9, 17, 25)
CONF = {f"app/conf/c{i:02d}.txt": (f"setting {i}\n" * (i + 1)).encode() for i in range(40)}
CMD = ["/bin/sh", "-c", "cat /data/hello.txt; for s in " + " ".join(map(str, SKIPS)) +
       "; do dd if=/data/big.bin bs=1048576 skip=$s count=1 2>/dev/null | md5sum; done;"
       " cat /app/conf/*.txt | md5sum"]


def _big() -> bytes:
    seed = hashlib.sha256(b"profile-big").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(BIG // 32))


def _expected(big: bytes) -> str:
    out = ["hello profile"]
    out += [f"{hashlib.md5(big[s * MiB:(s + 1) * MiB]).hexdigest()}  -" for s in SKIPS]
    out.append(f"{hashlib.md5(b''.join(CONF[k] for k in sorted(CONF))).hexdigest()}  -")
    return "\n".join(out) + "\n"


def _lazysnap(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapshotter", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class World:
    reg: Registry
    proxy: Proxy
    img: PushedImage
    other: PushedImage
    expected: str
    tmp: Path

    def ref(self, img: PushedImage) -> str:
        return img.ref.replace(self.reg.host, self.proxy.host)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("profile-e2e")
    reg = start_registry(tmp / "reg")
    proxy = start_proxy(reg.url)
    try:
        big = _big()
        layers = [
            busybox_rootfs(),
            LayerSpec(entries=[File("/data/big.bin", big), File("/data/hello.txt", b"hello profile\n"),
                               *(File("/" + k, v) for k, v in CONF.items())]),
            LayerSpec(entries=[File("/data/extra.txt", b"top layer\n")]),
        ]
        img = build_image(tmp / "img", layers, cmd=CMD, ref=f"{reg.host}/prof/e2e:v1")
        # shares the two lower layers, not the manifest
        other = build_image(tmp / "img2", [*layers[:2], LayerSpec(entries=[File("/data/extra.txt", b"other\n")])],
                            cmd=CMD, ref=f"{reg.host}/prof/other:v1")
        assert other.manifest_digest != img.manifest_digest
        for i in (img, other):
            subprocess.run([sys.executable, "-m", "snapshotter", "index", i.ref, "--push", *sign_flags(), "--root",
                            str(tmp / "publisher"), "--hosts-dir", str(tmp / "nohosts")],
                           check=True, cwd=REPO, capture_output=True, timeout=300)
        yield World(reg, proxy, img, other, _expected(big), tmp)
    finally:
        proxy.stop()
        reg.stop()


@dataclass
class Node:
    daemon: LazysnapDaemon
    cd: Containerd

    def run(self, ref: str, name: str) -> str:
        self.cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
        return self.cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, name).stdout

    def metric(self, name: str, labels: str = "") -> float:
        return self.daemon.metric(name, labels)

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made: list[Node] = []

    def make(name: str) -> Node:
        daemon = start_lazysnap(tmp_path / name / "daemon", root=tmp_path / name / "root")
        try:
            cd = start_containerd(tmp_path / name / "ctrd", proxy_plugins={"lazysnap": daemon.address})
        except BaseException:
            daemon.stop()
            raise
        made.append(Node(daemon, cd))
        return made[-1]

    try:
        yield make  # type: ignore[misc]
    finally:
        for n in made:
            n.cd.stop()
            n.daemon.stop()
        unmount_under(tmp_path)


def _wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _share(node: Node) -> tuple[float, float]:
    return (node.metric("lazysnap_startup_chunk_reads_total", 'result="hit"'),
            node.metric("lazysnap_startup_chunk_reads_total", 'result="miss"'))


def test_record_push_prefetch_on_fresh_node(world: World, nodes) -> None:  # noqa: ANN001
    ref = world.ref(world.img)
    a: Node = nodes("a")
    r = _lazysnap("record", ref, "--address", a.daemon.address, "--containerd", a.cd.address,
                  "--hosts-dir", str(world.tmp / "nohosts"), "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout == world.expected
    assert "chunks=" in r.stderr
    root_a = a.daemon.root
    profile_file = root_a / "profiles" / f"{world.img.manifest_digest.replace(':', '-')}.json"
    doc = json.loads(profile_file.read_bytes())
    assert doc["manifest"] == world.img.manifest_digest and doc["chunks"] > 0
    hits_a, miss_a = _share(a)
    assert miss_a > 0, "the recording start had no misses: the metric cannot show what the profile buys"

    show = _lazysnap("profile", "show", ref, "--root", str(root_a), "--json", "--hosts-dir", "/nonexistent")
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert summary["chunks"] == doc["chunks"] and summary["files"] >= 1 + len(CONF)
    push = _lazysnap("profile", "push", ref, *sign_flags(), "--root", str(root_a), "--hosts-dir", "/nonexistent")
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines()[2].startswith("signature: sha256-"), push.stdout  # after the old lines
    assert push.stdout.splitlines()[1].startswith(f"pack: {doc['chunks']} of {doc['chunks']} chunks"), push.stdout

    # a fresh node: empty root; the profile and its pack come from the registry
    b: Node = nodes("b")
    world.proxy.reset_stats()
    assert b.run(ref, "fresh") == world.expected
    hits, misses = _share(b)
    assert hits + misses > 0
    assert hits / (hits + misses) >= 0.95, (hits, misses, b.log()[-3000:])
    assert b.metric("lazysnap_profile_lookups_total", 'result="registry"') == 1
    assert b.metric("lazysnap_packs_total", 'result="done"') == 1
    assert b.metric("lazysnap_pack_chunks_total", 'state="stored"') > 0
    assert b.metric("lazysnap_pack_chunks_total", 'state="rejected"') == 0

    # the profile alone (--no-pack, now the newest artifact): chunks come span by span
    push = _lazysnap("profile", "push", ref, "--no-pack", *sign_flags(), "--root", str(root_a),
                     "--hosts-dir", "/nonexistent")
    assert push.returncode == 0 and len(push.stdout.splitlines()) == 2, push.stdout + push.stderr
    c: Node = nodes("c")
    assert c.run(ref, "fresh-nopack") == world.expected
    hits, misses = _share(c)
    assert hits / (hits + misses) >= 0.95, (hits, misses, c.log()[-3000:])
    assert c.metric("lazysnap_packs_total") == 0
    assert c.metric("lazysnap_prefetch_chunks_total", 'state="fetched"') > 0
    # the same summary is printed from the registry copy
    show = _lazysnap("profile", "show", ref, "--root", str(b.daemon.root / "none"), "--hosts-dir", "/nonexistent")
    assert show.returncode == 0 and f"chunks      {doc['chunks']}" in show.stdout, show.stdout + show.stderr

    # background fill completes and verifies every layer of the image
    digests = world.img.layer_digests
    _wait(lambda: all((b.daemon.root / "complete" / d.replace(":", "-")).is_file() for d in digests), 60,
          "every layer complete")
    assert b.metric("lazysnap_layers_complete_total", 'result="failed"') == 0
    assert "layer_verified" in b.log()


def test_a_first_start_is_recorded_by_the_daemon_and_prefetched_next_time(world: World, tmp_path: Path) -> None:
    """[prefetch] record_first_start: no `lazysnap record`; the daemon records the image's
    first start and the next start of it (image and chunks gone, profile kept) prefetches."""
    ref = world.ref(world.img)
    config = "[prefetch]\nrecord_first_start = true\nrecord_first_start_s = 3\nregistry_lookup = false\n"
    with lazysnap_node(tmp_path / "n", config=config) as (daemon, cd):
        node = Node(daemon, cd)
        assert node.run(ref, "first") == world.expected
        profile_file = daemon.root / "profiles" / f"{world.img.manifest_digest.replace(':', '-')}.json"
        _wait(profile_file.exists, 30, "the profile of the first start")
        doc = json.loads(profile_file.read_bytes())
        assert doc["manifest"] == world.img.manifest_digest and doc["chunks"] > 0 and doc["recordings"] == 1
        cd.ctr("images", "rm", "--sync", ref)
        prune = _lazysnap("prune", "--address", daemon.address, "--apply")
        assert prune.returncode == 0 and prune.stdout.startswith("reclaimed "), prune.stdout + prune.stderr
        assert node.metric("lazysnap_profile_lookups_total", 'result="local"') == 0
        assert node.run(ref, "second") == world.expected
        # the second start found the daemon's profile and fetched its chunks ahead of the reads
        assert node.metric("lazysnap_profile_lookups_total", 'result="local"') == 1
        assert node.metric("lazysnap_prefetch_chunks_total", 'state="fetched"') >= doc["chunks"] * 0.9
        time.sleep(4)  # past the recording time: nothing recorded again (it has a profile)
        assert json.loads(profile_file.read_bytes())["recordings"] == 1
        assert node.log().count("profile_recording_started") == 1


def test_a_recorded_first_start_reaches_the_next_node(world: World, tmp_path: Path) -> None:
    """[prefetch] publish_recorded_profiles: the first node records its first start and
    publishes the profile with its pack, signed with [lazy] publish_sign_key; a fresh node
    trusting that key prefetches it on its own first start (nobody ran a lazysnap command)."""
    ref = world.ref(world.img)
    config = (f'[lazy]\npublish_sign_key = "{publisher_keys().private}"\n'
              "[prefetch]\nrecord_first_start = true\nrecord_first_start_s = 3\npublish_recorded_profiles = true\n"
              "registry_lookup = false\n")  # the first node: another test of the module may have published one
    with lazysnap_node(tmp_path / "a", config=config) as (daemon, cd):
        first = Node(daemon, cd)
        assert first.run(ref, "first") == world.expected
        _wait(lambda: "event=profile_published" in first.log(), 60, "the recorded profile published")
        line = next(x for x in first.log().splitlines() if "event=profile_published" in x)
        artifact = line.split("artifact=")[1].split()[0]
        assert "signed=True" in line and "pack_chunks=0 " not in line, line
    with lazysnap_node(tmp_path / "b") as (daemon, cd):
        fresh = Node(daemon, cd)
        assert fresh.run(ref, "fresh") == world.expected
        found = next(x for x in fresh.log().splitlines() if "event=profile_found" in x)
        assert "source=registry" in found and f"artifact={artifact}" in found, found
        assert fresh.metric("lazysnap_packs_total", 'result="done"') == 1
        hits, misses = _share(fresh)
        assert hits / (hits + misses) >= 0.95, (hits, misses, fresh.log()[-3000:])


def _push_profile_artifact(ref: str, profile: bytes, *, signed: bool) -> None:
    """Publish ``profile`` as a profile artifact of ``ref`` the way an outsider with push
    rights could (signed with the publisher key or not), without lazysnap's own checks."""
    script = (
        "import asyncio, datetime, sys\n"
        "from snapshotter.registry import RegistryClient, RegistryConfig\n"
        "from snapshotter.registry.signatures import load_private_key, push_signature\n"
        "async def main():\n"
        "    async with RegistryClient(RegistryConfig()) as c:\n"
        "        r = await c.resolve(sys.argv[1])\n"
        "        art = await c.push_artifact(sys.argv[1], subject=r.manifest_descriptor,\n"
        "            artifact_type='application/vnd.lazysnap.profile.v1+json',\n"
        "            blobs=[('application/vnd.lazysnap.profile.v1+json', sys.stdin.buffer.read())],\n"
        "            annotations={'org.opencontainers.image.created': datetime.datetime.now(\n"
        "                datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')})\n"
        "        if len(sys.argv) > 2:\n"
        "            await push_signature(c, sys.argv[1], art.digest, load_private_key(sys.argv[2]))\n"
        "asyncio.run(main())\n")
    key = sign_flags()[1:] if signed else []
    subprocess.run([sys.executable, "-c", script, ref, *key], input=profile, cwd=REPO, check=True, timeout=60)


def test_profile_of_another_manifest_is_ignored(world: World, nodes) -> None:  # noqa: ANN001
    """A signed profile artifact hung on `other` but made for `img` (another digest) is never
    used; neither is an unsigned one made for `other`, pushed as the newest."""
    from snapshotter.prefetch import profile as P

    ref = world.ref(world.other)
    bad = P.Profile(world.img.manifest_digest, [P.LayerProfile(world.img.layer_digests[1], 40, [
        P.ChunkAccess(0, MiB, "data/big.bin", 0, 4096, [1])])])
    _push_profile_artifact(ref, P.dumps(bad), signed=True)
    unsigned = P.Profile(world.other.manifest_digest, [P.LayerProfile(world.other.layer_digests[1], 40, [
        P.ChunkAccess(0, MiB, "data/big.bin", 0, 4096, [1])])])
    _push_profile_artifact(ref, P.dumps(unsigned), signed=False)
    n: Node = nodes("c")
    assert n.run(ref, "other") == world.expected
    _wait(lambda: n.log().count("profile_rejected") >= 2, 10, "the rejection log lines")
    lines = [x for x in n.log().splitlines() if "profile_rejected" in x]
    assert "not signed by a trusted key" in lines[0], lines  # the newest first
    assert "is for manifest" in lines[1] and world.img.manifest_digest in lines[1], lines
    assert n.metric("lazysnap_profile_lookups_total", 'result="rejected"') == 2
    assert n.metric("lazysnap_prefetch_chunks_total") == 0


def test_sigkill_during_background_fill_loses_nothing_verified(world: World, nodes) -> None:  # noqa: ANN001
    ref = world.ref(world.img)
    n: Node = nodes("d")
    big_layer = world.img.layer_digests[1]
    # slow down the big layer's blob reads once the start is done: background fill is mid-way when killed
    assert n.run(ref, "first") == world.expected
    fault = world.proxy.add_fault(Fault("stall", times=-1, path=big_layer.split(":")[1], seconds=1.0))
    try:
        label = f'layer="{big_layer}"'
        _wait(lambda: 0 < n.metric("lazysnap_background_chunks_local", label)
              < n.metric("lazysnap_background_chunks_total", label) and
              n.metric("lazysnap_background_span_bytes_total") > 0, 30, "background fill under way")
        root = n.daemon.root
        complete_before = sorted(p.name for p in (root / "complete").iterdir()) if (root / "complete").exists() else []
        assert big_layer.replace(":", "-") not in complete_before
        n.daemon.kill()
    finally:
        world.proxy.clear_faults()
    assert fault.kind == "stall"
    # nothing half-written: every chunk file is whole and hashes to its name
    chunk_files = [p for p in (root / "chunks").glob("??/*")]
    assert chunk_files
    for p in chunk_files:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.parent.name + p.name, p
    n.daemon.start()  # clears the killed daemon's dead FUSE mount itself
    # completed layers stay complete; the restored daemon finishes and verifies the big layer
    for name in complete_before:
        assert (root / "complete" / name).is_file()
    _wait(lambda: (root / "complete" / big_layer.replace(":", "-")).is_file(), 60, "big layer complete after restart")
    # containerd's proxy-plugin connection backs off after the kill: retry until it reconnects
    outs: list[str] = []
    _wait(lambda: outs.append(n.cd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, f"after-{len(outs)}",
                                       check=False).stdout) or outs[-1] == world.expected, 60, "a container start")

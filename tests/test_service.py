"""The Snapshots API over a real gRPC unix socket, with containerd's semantics and codes."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapshotter import metrics
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service import ProviderError, RemoteLayerRequest, SnapshotService, Snapshotter

REF = "containerd.io/snapshot.ref"


@dataclass
class DirProvider:
    """A real provider: serves layer trees from directories on disk (``layers[digest]``)."""

    layers: dict[str, Path]
    fail_provide: str | None = None
    fail_restore: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)
    finished: list[set[str]] = field(default_factory=list)  # restore_finished's arguments

    async def provide(self, req: RemoteLayerRequest) -> Path:
        self.calls.append(("provide", req.layer_digest))
        if self.fail_provide:
            raise ProviderError("registry unreachable", reason=self.fail_provide)
        return self.layers[req.layer_digest]

    async def restore(self, layer_digest: str, labels: Mapping[str, str]) -> Path:
        self.calls.append(("restore", layer_digest))
        if self.fail_restore:
            raise ProviderError("index lost", reason="index_missing")
        return self.layers[layer_digest]

    async def release(self, layer_digest: str) -> None:
        self.calls.append(("release", layer_digest))

    async def restore_finished(self, referenced: Collection[str]) -> None:
        self.finished.append(set(referenced))

    def add_services(self, server: object) -> None:
        return None


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.SnapshotsStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None):
        return list((await self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                                       labels=labels or {}))).mounts)

    async def view(self, key: str, parent: str = ""):
        return list((await self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent))).mounts)

    async def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        await self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    async def mounts(self, key: str):
        return list((await self.stub.Mounts(pb.MountsRequest(key=key))).mounts)

    async def stat(self, key: str) -> pb.Info:
        return (await self.stub.Stat(pb.StatSnapshotRequest(key=key))).info

    async def remove(self, key: str) -> None:
        await self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    async def list(self, *filters: str) -> list[list[pb.Info]]:
        return [list(r.info) async for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)))]

    async def status(self) -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest())).status


async def code_of(coro) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await coro
    return ei.value.code()


@pytest.fixture
def sockdir() -> AsyncIterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lzsvc-", dir="/tmp"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


class Env:
    def __init__(self, root: Path, address: str, provider=None) -> None:  # noqa: ANN001
        self.root, self.address, self.provider = root, address, provider
        self.service: SnapshotService | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> Client:
        sn = Snapshotter(self.root, self.provider, busy_timeout=1.0)
        await sn.open()
        self.service = SnapshotService(sn, self.address, probe_interval=0.2)
        await self.service.start()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.address}")
        return Client(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.service is not None:
            await self.service.stop(grace=2)
            self.service = None


@pytest.fixture
async def env(tmp_path: Path, sockdir: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "root", str(sockdir / "run" / "s.sock"))
    yield e
    await e.stop()


async def test_socket_permissions(env: Env) -> None:
    await env.start()
    assert stat.S_IMODE(os.stat(env.address).st_mode) & 0o007 == 0
    assert stat.S_IMODE(os.stat(os.path.dirname(env.address)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(env.root).st_mode) == 0o700


async def test_mount_shapes_like_overlayfs(env: Env) -> None:
    c = await env.start()
    snaps = env.root / "snapshots"
    m = await c.prepare("ns/1/a")
    assert [(x.type, x.options) for x in m] == [("bind", ["rw", "rbind"])]
    assert m[0].source == str(snaps / "1" / "fs")
    await c.commit("ns/2/l1", "ns/1/a")
    assert list((await c.view("ns/3/v1", "ns/2/l1"))[0].options) == ["ro", "rbind"]
    assert (await c.view("ns/3/v0"))[0].options == ["ro", "rbind"]
    await c.prepare("ns/4/b", "ns/2/l1")
    await c.commit("ns/5/l2", "ns/4/b")
    m = await c.prepare("ns/6/top", "ns/5/l2")
    (ov,) = m
    assert (ov.type, ov.source) == ("overlay", "overlay")
    opts = [o for o in ov.options if o != "index=off"]
    assert opts == [f"workdir={snaps}/5/work", f"upperdir={snaps}/5/fs", f"lowerdir={snaps}/4/fs:{snaps}/1/fs"]
    (v,) = await c.view("ns/7/v2", "ns/5/l2")
    assert [o for o in v.options if o != "index=off"] == [f"lowerdir={snaps}/4/fs:{snaps}/1/fs"]
    assert (await c.mounts("ns/6/top")) == m


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
async def test_returned_mounts_really_mount(env: Env, tmp_path: Path) -> None:
    c = await env.start()
    m = await c.prepare("a")
    Path(m[0].source, "base.txt").write_text("base")
    Path(m[0].source, "gone.txt").write_text("x")
    await c.commit("l1", "a")
    (ov,) = await c.prepare("b", "l1")
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", ov.type, ov.source, str(target), "-o", ",".join(ov.options)], check=True)
    try:
        assert (target / "base.txt").read_text() == "base"
        (target / "gone.txt").unlink()
        (target / "new.txt").write_text("new")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    u = await c.stub.Usage(pb.UsageRequest(key="b"))
    assert u.inodes >= 3  # root, new.txt, whiteout for gone.txt
    await c.commit("l2", "b")
    (v,) = await c.view("v", "l2")
    subprocess.run(["mount", "-t", v.type, v.source, str(target), "-o", ",".join(v.options)], check=True)
    try:
        assert sorted(os.listdir(target)) == ["base.txt", "new.txt"]
        with pytest.raises(OSError):
            (target / "x").write_text("ro")
    finally:
        subprocess.run(["umount", str(target)], check=True)


async def test_error_codes(env: Env) -> None:
    c = await env.start()
    await c.prepare("a")
    await c.view("v")
    nf, ae, fp, ia = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert await code_of(c.prepare("a")) == ae
    assert await code_of(c.prepare("b", "missing")) == nf
    assert await code_of(c.prepare("b", "a")) == ia  # parent not committed
    assert await code_of(c.commit("x", "missing")) == nf
    assert await code_of(c.commit("x", "v")) == fp  # view is not active
    assert await code_of(c.commit("v", "a")) == ae
    assert await code_of(c.stat("missing")) == nf
    assert await code_of(c.mounts("missing")) == nf
    assert await code_of(c.remove("missing")) == nf
    assert await code_of(c.list("name==")) == ia
    await c.commit("l1", "a")
    assert await code_of(c.mounts("l1")) == fp
    assert await code_of(c.commit("l2", "l1")) == fp
    await c.prepare("child", "l1")
    assert await code_of(c.remove("l1")) == fp  # has a child
    req = pb.UpdateSnapshotRequest(info=pb.Info(name="l1"), update_mask=FieldMask(paths=["kind"]))
    assert await code_of(c.stub.Update(req)) == ia
    await c.remove("child")
    await c.remove("l1")
    assert not (env.root / "snapshots" / "1").exists()


async def test_stat_update_labels(env: Env) -> None:
    c = await env.start()
    await c.prepare("a", labels={"x": "1", "y": "2"})
    info = await c.stat("a")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("a", "", pb.ACTIVE, {"x": "1", "y": "2"})
    assert info.created_at.ToNanoseconds() > 0

    async def upd(labels: dict[str, str], paths: list[str]) -> dict[str, str]:
        r = await c.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels=labels),
                                                         update_mask=FieldMask(paths=paths)))
        assert dict(r.info.labels) == dict((await c.stat("a")).labels)
        return dict(r.info.labels)

    assert await upd({"z": "3"}, ["labels.z"]) == {"x": "1", "y": "2", "z": "3"}
    assert await upd({}, ["labels.y"]) == {"x": "1", "z": "3"}
    assert await upd({"q": "9"}, ["labels"]) == {"q": "9"}
    assert await upd({"e": "m"}, []) == {"e": "m"}


async def test_list_batches_and_filters(env: Env) -> None:
    c = await env.start()
    await c.prepare("base")
    await c.commit("c0", "base", {REF: "sha256:c0"})
    for i in range(230):
        await c.view(f"v{i}", "c0") if i % 2 else await c.prepare(f"p{i}", "c0", {"grp": str(i % 3)})
    batches = await c.list()
    assert [len(b) for b in batches] == [100, 100, 31]
    assert len({i.name for b in batches for i in b}) == 231
    flat = lambda bs: sorted(i.name for b in bs for i in b)  # noqa: E731
    assert flat(await c.list(f'labels."{REF}"==sha256:c0,parent==""')) == ["c0"]
    assert flat(await c.list(f'labels."{REF}"==sha256:c0,parent=="other"')) == []
    assert len(flat(await c.list("kind==view"))) == 115
    assert len(flat(await c.list("kind==active,labels.grp==1"))) == len([i for i in range(0, 230, 2) if i % 3 == 1])
    assert flat(await c.list("name==v1", "name==p0")) == ["p0", "v1"]  # several filters: OR
    assert flat(await c.list("name~=^v22.$,parent==c0")) == [f"v22{d}" for d in range(1, 10, 2)]


async def test_usage_counts_hardlinks_once(env: Env) -> None:
    c = await env.start()
    (m,) = await c.prepare("a")
    fs = Path(m.source)
    (fs / "f").write_bytes(b"x" * 100_000)
    os.link(fs / "f", fs / "g")
    (fs / "d").mkdir()
    u = await c.stub.Usage(pb.UsageRequest(key="a"))
    assert u.inodes == 3  # fs/, f (=g), d
    assert u.size >= 100_000
    await c.commit("l", "a")
    u2 = await c.stub.Usage(pb.UsageRequest(key="l"))
    assert (u2.size, u2.inodes) == (u.size, u.inodes)  # stored at commit


async def test_cleanup_removes_orphans_only(env: Env) -> None:
    c = await env.start()
    await c.prepare("a")
    orphan = env.root / "snapshots" / "99"
    (orphan / "fs").mkdir(parents=True)
    (env.root / "snapshots" / "new-crashed").mkdir()
    await c.stub.Cleanup(pb.CleanupRequest())
    assert sorted(os.listdir(env.root / "snapshots")) == ["1"]


async def test_health_not_serving_while_db_locked(env: Env) -> None:
    c = await env.start()
    assert await c.status() == health_pb2.HealthCheckResponse.SERVING
    other = sqlite3.connect(env.root / "metadata.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(100):
            if await c.status() == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert await c.status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await code_of(c.prepare("x")) == grpc.StatusCode.UNAVAILABLE
    finally:
        other.execute("ROLLBACK")
        other.close()
    for _ in range(100):
        if await c.status() == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.05)
    assert await c.status() == health_pb2.HealthCheckResponse.SERVING


def _remote_labels(chain: str, digest: str) -> dict[str, str]:
    return {REF: chain, "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/t/img:v1",
            "containerd.io/snapshot/cri.layer-digest": digest,
            "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "m" * 64,
            "containerd.io/snapshot/cri.image-layers": f"{digest},sha256:other"}


async def test_remote_handshake(tmp_path: Path, sockdir: Path) -> None:
    layer_dir = tmp_path / "layer1"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "etc" / "hello").write_text("hi")
    prov = DirProvider({"sha256:l1": layer_dir})
    e = Env(tmp_path / "root", str(sockdir / "s.sock"), prov)
    c = await e.start()
    try:
        labels = _remote_labels("sha256:chain1", "sha256:l1")
        assert await code_of(c.prepare("default/1/extract-1 sha256:chain1", "", labels)) == \
            grpc.StatusCode.ALREADY_EXISTS
        assert prov.calls == [("provide", "sha256:l1")]
        found = [i for b in await c.list(f'labels."{REF}"==sha256:chain1,parent==""') for i in b]
        assert [(i.name, i.kind, i.parent) for i in found] == [("sha256:chain1", pb.COMMITTED, "")]
        assert (await c.stat("sha256:chain1")).labels[REF] == "sha256:chain1"
        with pytest.raises(grpc.aio.AioRpcError):
            await c.stat("default/1/extract-1 sha256:chain1")  # no active snapshot left behind
        # a second pull (other namespace) of the same chain: same answer, provider not asked again
        assert await code_of(c.prepare("other/2/extract", "", labels)) == grpc.StatusCode.ALREADY_EXISTS
        assert len(prov.calls) == 1
        (v,) = await c.view("v", "sha256:chain1")
        assert (v.type, v.source, list(v.options)) == ("bind", str(layer_dir), ["ro", "rbind"])
        (ov,) = await c.prepare("run", "sha256:chain1")
        assert f"lowerdir={layer_dir}" in ov.options
        # restart with a provider that cannot restore: Mounts is UNAVAILABLE, never an empty dir
        await e.stop()
        prov.fail_restore = True
        c = await e.start()
        assert ("restore", "sha256:l1") in prov.calls
        # a layer whose restore failed is still referenced: the provider must keep what it holds
        assert prov.finished[-1] == {"sha256:l1"}
        assert await code_of(c.mounts("run")) == grpc.StatusCode.UNAVAILABLE
        assert await code_of(c.mounts("v")) == grpc.StatusCode.UNAVAILABLE
        assert await code_of(c.prepare("run2", "sha256:chain1")) == grpc.StatusCode.UNAVAILABLE
        assert (await c.stat("sha256:chain1")).kind == pb.COMMITTED
        # restart with a working provider: usable again
        await e.stop()
        prov.fail_restore = False
        c = await e.start()
        assert f"lowerdir={layer_dir}" in (await c.mounts("run"))[0].options
        await c.remove("run")
        await c.remove("v")
        await c.remove("sha256:chain1")
        assert prov.calls[-1] == ("release", "sha256:l1")
    finally:
        await e.stop()


async def test_remote_fallback(tmp_path: Path, sockdir: Path) -> None:
    prov = DirProvider({}, fail_provide="registry_down")
    e = Env(tmp_path / "root", str(sockdir / "s.sock"), prov)
    c = await e.start()
    before = metrics.REGISTRY.get_sample_value("lazysnap_remote_fallbacks_total", {"reason": "registry_down"}) or 0
    try:
        labels = _remote_labels("sha256:chain1", "sha256:l1")
        m = await c.prepare("default/1/extract", "", labels)  # normal Prepare: containerd downloads
        assert m[0].type == "bind"
        after = metrics.REGISTRY.get_sample_value("lazysnap_remote_fallbacks_total", {"reason": "registry_down"})
        assert after == before + 1
        # without image identity the provider is not asked and nothing is counted
        await c.prepare("default/2/extract", "", {REF: "sha256:chain2"})
        assert prov.calls == [("provide", "sha256:l1")]
    finally:
        await e.stop()


async def test_stargz_labels_parsed() -> None:
    from snapshotter.service.provider import parse_remote_request

    r = parse_remote_request("k", "p", {REF: "sha256:c", "containerd.io/snapshot/remote/stargz.reference": "r/i:t",
                                        "containerd.io/snapshot/remote/stargz.digest": "sha256:d",
                                        "containerd.io/snapshot/remote/stargz.layers": "sha256:a,sha256:d"})
    assert r is not None
    assert (r.chain_id, r.image_ref, r.layer_digest, r.image_layers, r.manifest_digest) == (
        "sha256:c", "r/i:t", "sha256:d", ("sha256:a", "sha256:d"), None)
    assert parse_remote_request("k", "", {"containerd.io/snapshot/remote/stargz.digest": "sha256:d"}) is None

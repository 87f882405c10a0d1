"""Kubernetes credentials: the CRI proxy keeps each PullImage's AuthConfig per registry
host with an expiry, and the registry client asks for it before docker's config.json.

The end-to-end test: a CRI v1 client (the protos in proto/k8s) pulls an image from an
htpasswd-protected registry through lazysnap's CRI proxy, with the credentials only in the
request (the node has no docker config); containerd's CRI plugin prepares the layers
through lazysnap, which serves them lazily with those credentials.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from harness.containerd import Containerd, LazysnapDaemon, unmount_under
from harness.images import File, LayerSpec, build_image, busybox_rootfs
from harness.registry import start_registry
from harness.signing import sign_flags
from snapshotter.api.k8s.cri.runtime.v1 import api_pb2 as cri
from snapshotter.api.k8s.cri.runtime.v1 import api_pb2_grpc as cri_grpc
from snapshotter.cri import CriCredentials, from_auth_config
from snapshotter.registry import Credentials

REPO = Path(__file__).resolve().parent.parent
USER, PASSWORD = "kube", "s3cret-Pa55word-for-the-cri-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auth_config_forms() -> None:
    assert from_auth_config("u", "p", "", "", "") == Credentials("u", "p")
    auth = base64.b64encode(b"alice:pw:with:colons").decode()
    assert from_auth_config("", "", auth, "", "") == Credentials("alice", "pw:with:colons")
    assert from_auth_config("u", "", "", "refresh", "") == Credentials("u", identity_token="refresh")
    assert from_auth_config("", "", "", "", "bearer-tok") == Credentials(registry_token="bearer-tok")
    assert from_auth_config("", "", "bm90LWJhc2U2NA!!", "", "") is None  # not base64
    assert from_auth_config("", "", base64.b64encode(b"nocolon").decode(), "", "") is None
    assert from_auth_config("", "", "", "", "") is None
    assert "pw" not in repr(Credentials("alice", "pw")) and "tok" not in repr(Credentials(registry_token="tok"))


def test_credentials_per_host_expire() -> None:
    clock = Clock()
    store = CriCredentials(ttl_s=60, clock=clock)
    assert store.remember("registry.example:5000/team/app:1", Credentials("a", "1")) == "registry.example:5000"
    assert store.remember("busybox", Credentials("hub", "2")) == "docker.io"
    assert store.remember("not a reference!", Credentials("x", "y")) is None
    assert store.get("registry.example:5000") == Credentials("a", "1")
    assert store.get("docker.io") == Credentials("hub", "2") and store.get("other.example") is None
    clock.now += 30
    store.remember("registry.example:5000/team/other:2", Credentials("a", "new"))  # a later pull refreshes
    clock.now += 45
    assert store.get("docker.io") is None  # 75 s old
    assert store.get("registry.example:5000") == Credentials("a", "new")  # 45 s old
    assert store.hosts() == ["registry.example:5000"]


async def test_registry_client_asks_the_source_before_docker_config(tmp_path: Path) -> None:
    from harness.registry import Registry
    from snapshotter.registry import RegistryClient, RegistryConfig

    reg = Registry(tmp_path / "reg", htpasswd=(USER, PASSWORD)).start()
    try:
        docker = tmp_path / "docker.json"
        docker.write_text(json.dumps({"auths": {reg.host: {"username": USER, "password": "wrong"}}}))
        store = CriCredentials()
        async with RegistryClient(RegistryConfig(docker_config=docker, credential_source=store)) as client:
            with pytest.raises(Exception, match="rejected"):
                await client.resolve(f"{reg.host}/none/x:1")  # docker's wrong password
        store.remember(f"{reg.host}/none/x:1", Credentials(USER, PASSWORD))
        async with RegistryClient(RegistryConfig(docker_config=docker, credential_source=store)) as client:
            with pytest.raises(Exception) as ei:
                await client.resolve(f"{reg.host}/none/x:1")
            assert "not found" in str(ei.value).lower() or "unknown" in str(ei.value).lower(), ei.value
    finally:
        reg.stop()


def _big(n: int) -> bytes:
    seed = hashlib.sha256(b"cri").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(n // 32))


@pytest.mark.root
@pytest.mark.slow
def test_pull_through_the_cri_proxy_with_request_credentials_only(tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "reg", htpasswd=(USER, PASSWORD))
    daemon = cd = None
    try:
        img = build_image(tmp_path / "img", [busybox_rootfs(), LayerSpec(entries=[
            File("/data/big.bin", _big(24 << 20)), File("/data/hello.txt", b"hello from a private registry\n")])],
            cmd=["cat", "/data/hello.txt"], ref=f"{reg.host}/private/app:v1", creds=(USER, PASSWORD))
        # the publisher has credentials; the node will not
        publisher = tmp_path / "publisher-docker"
        publisher.mkdir()
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (publisher / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        subprocess.run([sys.executable, "-m", "snapshotter", "index", img.ref, "--push", *sign_flags(), "--root",
                        str(tmp_path / "pub-root"), "--hosts-dir", str(tmp_path / "none")], check=True, cwd=REPO,
                       capture_output=True, timeout=300, env={**_env(), "DOCKER_CONFIG": str(publisher)})
        hosts = tmp_path / "certs.d"
        (hosts / reg.host).mkdir(parents=True)
        (hosts / reg.host / "hosts.toml").write_text(
            f'server = "{reg.url}"\n[host."{reg.url}"]\n  capabilities = ["pull", "resolve"]\n')
        empty = tmp_path / "node-docker"  # no docker config on the node
        empty.mkdir()
        (tmp_path / "lazysnap.toml").write_text("[prefetch]\nbackground = false\n")
        cd = Containerd(tmp_path / "ctrd", hosts_dir=hosts, cri_snapshotter="lazysnap")
        cri_sock = str(Path(cd.address).parent / "lazysnap-cri.sock")
        daemon = LazysnapDaemon(tmp_path / "daemon", root=tmp_path / "root", env={"DOCKER_CONFIG": str(empty)},
                                extra_args=["--config", str(tmp_path / "lazysnap.toml"), "--cri-proxy",
                                            "--cri-address", cri_sock, "--containerd-cri", cd.address])
        daemon.start()
        cd.proxy_plugins["lazysnap"] = daemon.address
        cd.start()

        with grpc.insecure_channel(f"unix:{cri_sock}") as channel:
            version = cri_grpc.RuntimeServiceStub(channel).Version(cri.VersionRequest(version="v1"), timeout=30)
            assert version.runtime_name == "containerd"  # forwarded, not answered by the proxy
            images = cri_grpc.ImageServiceStub(channel)
            with pytest.raises(grpc.RpcError) as ei:  # no credentials in the request: the registry says no
                images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=img.ref)), timeout=120)
            assert ei.value.code() != grpc.StatusCode.UNIMPLEMENTED
            resp = images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=img.ref),
                                                         auth=cri.AuthConfig(username=USER, password=PASSWORD)),
                                    timeout=300)
            assert resp.image_ref.startswith("sha256:")
            listed = images.ListImages(cri.ListImagesRequest(), timeout=30)
            assert any(img.ref in i.repo_tags for i in listed.images)
            status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=img.ref)), timeout=30)
            assert status.image.id == resp.image_ref

        # containerd did not download the layers: lazysnap served them, lazily
        have = set(cd.ctr("content", "ls", "-q", namespace="k8s.io").stdout.split())
        assert not have & set(img.layer_digests), "containerd downloaded a layer blob"
        doc = json.loads(subprocess.run([sys.executable, "-m", "snapshotter", "status", "--json", "--address",
                                         daemon.address], check=True, capture_output=True, text=True, cwd=REPO,
                                        timeout=60).stdout)
        layers = {layer["digest"]: layer for i in doc["images"] for layer in i["layers"]}
        assert set(layers) == set(img.layer_digests)
        assert {layer["state"] for layer in layers.values()} == {"lazy"}
        big = layers[img.layer_digests[1]]  # the busybox layer is small enough to be fetched whole
        assert big["index_source"] == "referrer" and big["bytes_local"] < big["bytes_total"] // 4, big
        assert daemon.metrics_url is not None
        assert daemon.metric("lazysnap_remote_snapshots_total") == len(img.layer_digests)
        fetched = daemon.metric("lazysnap_registry_bytes_fetched_total")
        assert 0 < fetched < img.compressed_size // 4, (fetched, img.compressed_size)
        # and the image runs from those layers (the big file read through FUSE from the registry)
        r = cd.ctr("run", "--rm", "--snapshotter", "lazysnap", img.ref, "cri-run", "sha256sum", "/data/big.bin",
                   namespace="k8s.io")
        assert r.stdout.split()[0] == hashlib.sha256(_big(24 << 20)).hexdigest()
    finally:
        if cd is not None:
            cd.stop()
        if daemon is not None:
            daemon.stop()
        reg.stop()
        unmount_under(tmp_path)
    log = daemon.log_path.read_text()
    assert "event=cri_pull" in log and "login=basic" in log
    secrets = [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    assert not [s for s in secrets if s in log], "a credential reached the daemon's log"
    assert not re.search(r"Basic [A-Za-z0-9+/=]{8,}", log)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)

"""RegistryClient against real docker-registry 2.8 servers on loopback.

Plain HTTP, htpasswd Basic, token auth (JWTs from harness.tokenserver that the registry
verifies), docker config.json / credential helpers, referrers fallback tag, platforms.
Every test compares bytes with what was pushed.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from harness.registry import TokenAuth, push_image, start_registry
from snapshotter.registry import (
    AuthError,
    DigestMismatchError,
    NotFoundError,
    PlatformError,
    RegistryClient,
    RegistryConfig,
)
from snapshotter.registry.manifest import sha256_digest


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Messages plus the structured fields of every record (where values would leak)."""
    return caplog.text + "\n".join(repr(getattr(r, "fields", "")) for r in caplog.records)


SECRET = "s3cr3t-Pa55word-xyzzy"


def client_for(tmp_path: Path, docker_config: dict | None = None, **kw: object) -> RegistryClient:
    cfg_dir = tmp_path / "docker"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / "config.json"
    path.write_text(json.dumps(docker_config or {}))
    return RegistryClient(RegistryConfig(docker_config=path, **kw))  # type: ignore[arg-type]


def auths(host: str, user: str, password: str) -> dict:
    return {"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}


@pytest.fixture
def plain(tmp_path: Path):
    with start_registry(tmp_path / "reg") as reg:
        yield reg


async def test_plain_resolve_ranges_stream(tmp_path: Path, plain) -> None:
    data = os.urandom(5 << 20) + b"tail"
    ref = f"{plain.host}/lazysnap/plain:v1"
    async with client_for(tmp_path) as c:
        img = await push_image(c, ref, [data, b"second layer"])
        ri = await c.resolve(ref)
        assert ri.manifest_digest == img["manifest_digest"]
        assert [d.digest for d in ri.layers] == img["layer_digests"] == [sha256_digest(data),
                                                                         sha256_digest(b"second layer")]
        assert ri.diff_ids == img["layer_digests"]  # uncompressed test layers
        dg = ri.layers[0].digest
        assert await c.blob_size(ref, dg) == len(data)
        assert await c.read_range(ref, dg, 0, 1) == data[:1]
        assert await c.read_range(ref, dg, len(data) - 7, len(data)) == data[-7:]
        assert await c.read_range(ref, dg, 123, 123) == b""
        ranges = [(4 << 20, (4 << 20) + 10), (0, 100), (50, 150), (200, 300), (1 << 20, 3 << 20)]
        before = c.stats.requests
        got = await c.read_ranges(ref, dg, ranges)
        assert got == [data[s:e] for s, e in ranges]
        assert c.stats.requests - before == 3  # (0,100)+(50,150)+(200,300) share one request
        streamed = b"".join([chunk async for chunk in c.stream_blob(ref, dg)])
        assert streamed == data
        assert await c.fetch_blob(ref, ri.layers[1].digest, 1024) == b"second layer"
        assert c.stats.registry_bytes >= len(data) + 2 * (1 << 20)
        assert c.stats.requests_by_purpose["range"] >= 4


async def test_plain_errors_are_clear(tmp_path: Path, plain) -> None:
    ref = f"{plain.host}/lazysnap/missing:v1"
    async with client_for(tmp_path) as c:
        with pytest.raises(NotFoundError) as ei:
            await c.resolve(ref)
        assert plain.host in str(ei.value) and "lazysnap/missing" in str(ei.value)
        await push_image(c, f"{plain.host}/lazysnap/x:v1", [b"abc"])
        bogus = "sha256:" + "0" * 64
        with pytest.raises(NotFoundError):
            await c.read_range(f"{plain.host}/lazysnap/x", bogus, 0, 1)
        # fetch_blob verifies: ask for blob A's bytes under a wrong-size limit → error, not bytes
        with pytest.raises(Exception) as ei2:
            await c.fetch_blob(f"{plain.host}/lazysnap/x", sha256_digest(b"abc"), 2)
        assert "limit" in str(ei2.value)


async def test_index_selects_platform(tmp_path: Path, plain) -> None:
    ref = f"{plain.host}/lazysnap/multi:v1"
    async with client_for(tmp_path) as c:
        img = await push_image(c, ref, [b"layer"], platforms=["linux/amd64", "linux/arm64/v8"])
        for plat, key in (("linux/amd64", "linux/amd64"), ("linux/arm64", "linux/arm64/v8"),
                          ("linux/arm64/v8", "linux/arm64/v8")):
            ri = await c.resolve(ref, plat)
            per = img["per_platform"][key]
            assert ri.index_digest == img["index_digest"]
            assert ri.manifest_digest == per["manifest_digest"]
            assert ri.config["architecture"] == key.split("/")[1]
            blob = await c.fetch_blob(ref, ri.layers[0].digest, 1 << 10)
            assert blob == b"layer" + key.encode()
        with pytest.raises(PlatformError) as ei:
            await c.resolve(ref, "linux/s390x")
        assert "linux/amd64" in str(ei.value)
        # pinned by digest resolves the same
        ri = await c.resolve(f"{plain.host}/lazysnap/multi@{img['index_digest']}")
        assert ri.manifest_digest == img["per_platform"]["linux/amd64"]["manifest_digest"]


async def test_referrers_fallback_tag_and_push_artifact(tmp_path: Path, plain) -> None:
    ref = f"{plain.host}/lazysnap/art:v1"
    async with client_for(tmp_path) as c:
        await push_image(c, ref, [b"L1", b"L2"])
        ri = await c.resolve(ref)
        subject = ri.manifest_descriptor
        assert await c.referrers(ref, subject.digest) == []
        a1 = await c.push_artifact(ref, subject=subject, artifact_type="application/vnd.lazysnap.index.v1",
                                   blobs=[("application/vnd.lazysnap.index.layer.v1", b"IDX1",
                                           {"lazysnap.layer.digest": ri.layers[0].digest})],
                                   annotations={"org.opencontainers.image.created": "2026-01-01T00:00:00Z"})
        a2 = await c.push_artifact(ref, subject=subject, artifact_type="application/vnd.lazysnap.profile.v1",
                                   blobs=[("application/json", b"{}")])
        # docker-registry 2.8 has no referrers API: the fallback tag must list both
        fb_body, _, _ = await c.get_manifest(ref, "sha256-" + subject.digest.split(":")[1])
        assert {m["digest"] for m in json.loads(fb_body)["manifests"]} == {a1.digest, a2.digest}
        found = await c.referrers(ref, subject.digest, "application/vnd.lazysnap.index.v1")
        assert [d.digest for d in found] == [a1.digest]
        all_refs = await c.referrers(ref, subject.digest)
        assert {d.artifact_type for d in all_refs} == {"application/vnd.lazysnap.index.v1",
                                                       "application/vnd.lazysnap.profile.v1"}
        body, _, dg = await c.get_manifest(ref, a1.digest)
        man = json.loads(body)
        assert dg == a1.digest and man["subject"]["digest"] == subject.digest
        layer = man["layers"][0]
        assert layer["annotations"]["lazysnap.layer.digest"] == ri.layers[0].digest
        assert await c.fetch_blob(ref, layer["digest"], 100) == b"IDX1"
        # re-pushing the same artifact does not duplicate the fallback entry
        await c.push_artifact(ref, subject=subject, artifact_type="application/vnd.lazysnap.profile.v1",
                              blobs=[("application/json", b"{}")])
        assert len(await c.referrers(ref, subject.digest)) == 2


async def test_artifacts_published_at_the_same_instant_are_all_listed(tmp_path: Path, plain) -> None:
    """The fallback tag is a read-modify-write: writers of one process take turns, and a
    writer in another process (another client) whose entry a concurrent PUT dropped writes
    it again, so every artifact published at once is found (docker-registry 2.8)."""
    ref = f"{plain.host}/lazysnap/race:v1"
    async with client_for(tmp_path / "a") as a, client_for(tmp_path / "b") as b:
        await push_image(a, ref, [b"L1"])
        subject = (await a.resolve(ref)).manifest_descriptor

        async def publish(c: RegistryClient, n: int) -> str:
            desc = await c.push_artifact(ref, subject=subject, artifact_type="application/vnd.lazysnap.index.v1",
                                         blobs=[("application/vnd.lazysnap.index.layer.v1", b"IDX%d" % n)])
            return desc.digest

        pushed = await asyncio.gather(*(publish(a if n % 2 else b, n) for n in range(8)))
        assert len(set(pushed)) == 8
        assert {d.digest for d in await a.referrers(ref, subject.digest)} == set(pushed)


async def test_htpasswd_basic_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with start_registry(tmp_path / "reg", htpasswd=("alice", SECRET)) as reg:
        ref = f"{reg.host}/lazysnap/auth:v1"
        data = os.urandom(300_000)
        async with client_for(tmp_path, auths(reg.host, "alice", SECRET)) as c:
            await push_image(c, ref, [data])
            ri = await c.resolve(ref)
            assert await c.read_range(ref, ri.layers[0].digest, 1000, 2000) == data[1000:2000]
            assert c.auth.stats.challenges == 1  # later requests carried Basic up front
        # anonymous: clear error
        async with client_for(tmp_path / "anon") as c:
            with pytest.raises(AuthError) as ei:
                await c.resolve(ref)
            assert "credentials" in str(ei.value) and reg.host in str(ei.value)
        # wrong password: one line, names the user, never the secret
        async with client_for(tmp_path / "bad", auths(reg.host, "alice", SECRET + "-wrong")) as c:
            with pytest.raises(AuthError) as ei:
                await c.resolve(ref)
        msg = str(ei.value)
        assert "\n" not in msg and "alice" in msg and SECRET not in msg
    assert SECRET not in log_text(caplog)
    assert base64.b64encode(f"alice:{SECRET}".encode()).decode() not in log_text(caplog)


async def test_token_auth_bearer_flow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with TokenAuth(tmp_path / "tok", users={"bob": SECRET}, ttl=300) as ta, \
            start_registry(tmp_path / "reg", token_auth=ta) as reg:
        ref = f"{reg.host}/lazysnap/tok:v1"
        data = os.urandom(1 << 20)
        async with client_for(tmp_path, auths(reg.host, "bob", SECRET)) as c:
            img = await push_image(c, ref, [data])
            pushes = ta.stats.issued
            ri = await c.resolve(ref)
            assert ri.manifest_digest == img["manifest_digest"]
            for i in range(5):
                assert await c.read_range(ref, ri.layers[0].digest, i * 1000, i * 1000 + 10) == \
                    data[i * 1000:i * 1000 + 10]
            # the pull-scope token obtained during the push serves every read: cached
            assert ta.stats.issued == pushes == 2
            assert sorted(ta.stats.scopes) == ["repository:lazysnap/tok:pull",
                                               "repository:lazysnap/tok:pull,push"]
        async with client_for(tmp_path / "bad", auths(reg.host, "bob", "nope")) as c:
            with pytest.raises(AuthError) as ei:
                await c.resolve(ref)
        assert "token server refused" in str(ei.value) and "nope" not in str(ei.value)
    assert SECRET not in log_text(caplog)


async def test_token_expiry_refetches(tmp_path: Path) -> None:
    # expires_in=2: a token is reused within its lifetime, refetched after it.
    with TokenAuth(tmp_path / "tok", ttl=2) as ta, start_registry(tmp_path / "reg", token_auth=ta) as reg:
        ref = f"{reg.host}/lazysnap/exp:v1"
        async with client_for(tmp_path) as c:
            await push_image(c, ref, [b"0123456789"])
            dg = sha256_digest(b"0123456789")
            assert await c.read_range(ref, dg, 2, 5) == b"234"
            n = ta.stats.issued
            assert await c.read_range(ref, dg, 5, 7) == b"56"
            assert ta.stats.issued == n
            import asyncio
            await asyncio.sleep(2.2)  # let the token expire (this is the behaviour under test)
            assert await c.read_range(ref, dg, 0, 10) == b"0123456789"
            assert ta.stats.issued == n + 1


def _write_helper(bindir: Path, name: str, script: str) -> None:
    p = bindir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


async def test_docker_config_cred_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A real credential helper program speaking the docker protocol (server URL on stdin).
    _write_helper(bindir, "lzt", f"""read server
case "$server" in
  127.0.0.1:*) printf '{{"ServerURL":"%s","Username":"carol","Secret":"{SECRET}"}}' "$server" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with start_registry(tmp_path / "reg", htpasswd=("carol", SECRET)) as reg:
        ref = f"{reg.host}/lazysnap/helper:v1"
        for i, cfg in enumerate(({"credHelpers": {reg.host: "lzt"}}, {"credsStore": "lzt"},
                                 {"auths": {f"http://{reg.host}/v1/": {"username": "carol",
                                                                       "password": SECRET}}})):
            async with client_for(tmp_path / f"c{i}", cfg) as c:
                payload = f"payload {i}".encode()
                img = await push_image(c, f"{reg.host}/lazysnap/helper:v{i}", [payload])
                ri = await c.resolve(f"{reg.host}/lazysnap/helper:v{i}")
                assert ri.manifest_digest == img["manifest_digest"]
                assert await c.fetch_blob(ref, ri.layers[0].digest, 100) == payload
    async with client_for(tmp_path / "broken", {"credHelpers": {"example.com": "absent-helper"}}) as c:
        with pytest.raises(Exception) as ei:
            await c._credentials("example.com", "example.com", False)
        assert "docker-credential-absent-helper not found" in str(ei.value)


async def test_digest_mismatch_detected(tmp_path: Path, plain) -> None:
    # Ask for blob B's digest while storage holds A's bytes under it: corrupt the storage.
    ref = f"{plain.host}/lazysnap/corrupt:v1"
    async with client_for(tmp_path) as c:
        await push_image(c, ref, [b"good bytes"])
        dg = sha256_digest(b"good bytes")
        data_file = next(plain.storage.rglob(f"blobs/sha256/*/{dg.split(':')[1]}/data"))
        data_file.write_bytes(b"evil bytes")
        with pytest.raises(DigestMismatchError):
            await c.fetch_blob(ref, dg, 100)
        with pytest.raises(DigestMismatchError):
            async for _ in c.stream_blob(ref, dg):
                pass


async def test_identity_token_oauth_refresh_flow(tmp_path: Path) -> None:
    refresh = "refresh-tok-" + SECRET
    with TokenAuth(tmp_path / "tok", users={"frank": SECRET}, refresh_tokens={refresh: "frank"}) as ta, \
            start_registry(tmp_path / "reg", token_auth=ta) as reg:
        ref = f"{reg.host}/lazysnap/oauth:v1"
        async with client_for(tmp_path, {"auths": {reg.host: {"identitytoken": refresh}}}) as c:
            img = await push_image(c, ref, [b"oauth layer"])
            ri = await c.resolve(ref)
            assert ri.manifest_digest == img["manifest_digest"]
            assert await c.read_range(ref, ri.layers[0].digest, 6, 11) == b"layer"
        assert ta.stats.issued >= 2 and ta.stats.failures == 0
        async with client_for(tmp_path / "bad", {"auths": {reg.host: {"identitytoken": "revoked"}}}) as c:
            with pytest.raises(AuthError) as ei:
                await c.resolve(ref)
        assert "revoked" not in str(ei.value)

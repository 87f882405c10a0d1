"""Pure pieces of the registry client: references, hosts.toml, challenges, ranges."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.registry import InvalidReferenceError, Reference
from snapshotter.registry.auth import parse_challenge
from snapshotter.registry.credentials import Credentials, DockerCredentials
from snapshotter.registry.errors import ConfigError, ProtocolError
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.manifest import select_platform
from snapshotter.registry.ranges import coalesce, parse_content_range

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,registry,repo,tag,digest,api", [
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None, "registry-1.docker.io"),
    ("docker.io/foo/bar:1.0", "docker.io", "foo/bar", "1.0", None, "registry-1.docker.io"),
    ("index.docker.io/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None, "registry-1.docker.io"),
    ("localhost/a", "localhost", "a", "latest", None, "localhost"),
    ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None, "localhost:5000"),
    (f"127.0.0.1:41234/x/y@{D}", "127.0.0.1:41234", "x/y", None, D, "127.0.0.1:41234"),
    (f"123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1@{D}", "123456789012.dkr.ecr.us-east-1.amazonaws.com",
     "app", "v1", D, "123456789012.dkr.ecr.us-east-1.amazonaws.com"),
])
def test_reference_parse(text: str, registry: str, repo: str, tag: str | None, digest: str | None,
                         api: str) -> None:
    r = Reference.parse(text)
    assert (r.registry, r.repository, r.tag, r.digest, r.api_host) == (registry, repo, tag, digest, api)
    assert Reference.parse(str(r)) == r


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a b", "host:5000/repo@sha256:short", "repo:bad tag",
                                 "repo:" + "t" * 200, "-lead/x"])
def test_reference_rejects(bad: str) -> None:
    with pytest.raises(InvalidReferenceError):
        Reference.parse(bad)


def test_challenge_parse() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg.example",'
                         'scope="repository:a/b:pull,push"')
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "reg.example",
                         "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"  # type: ignore[union-attr]
    assert parse_challenge("") is None


def test_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "registry.example.com"
    d.mkdir()
    (d / "hosts.toml").write_text('''
server = "https://registry.example.com"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.example.com/custom/api"]
  capabilities = ["pull"]
  override_path = true
  skip_verify = true
  ca = "certs/ca.pem"
  [host."https://mirror.example.com/custom/api".header]
    x-team = "ml"
''')
    cfg = HostsConfig(tmp_path)
    pull = cfg.endpoints("registry.example.com", "pull")
    assert [e.base_url for e in pull] == ["http://127.0.0.1:5001/v2", "https://mirror.example.com/custom/api",
                                          "https://registry.example.com/v2"]
    assert [e.mirror for e in pull] == [True, True, False]
    assert pull[1].skip_verify and pull[1].ca == (str(d / "certs/ca.pem"),) and pull[1].headers == (("x-team", "ml"),)
    assert pull[1].ssl_context() is False
    assert [e.base_url for e in cfg.endpoints("registry.example.com", "resolve")] == [
        "http://127.0.0.1:5001/v2", "https://registry.example.com/v2"]
    assert [e.base_url for e in cfg.endpoints("registry.example.com", "push")] == ["https://registry.example.com/v2"]
    # no file: loopback is plain http, others https, docker.io → registry-1
    assert cfg.endpoints("127.0.0.1:5000")[0].base_url == "http://127.0.0.1:5000/v2"
    assert cfg.endpoints("localhost:5000")[0].base_url == "http://localhost:5000/v2"
    assert cfg.endpoints("other.example")[0].base_url == "https://other.example/v2"
    assert HostsConfig(None).endpoints("docker.io")[0].base_url == "https://registry-1.docker.io/v2"
    # _default applies to registries without their own directory; server defaults to the registry
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://127.0.0.1:6000"]\n')
    eps = HostsConfig(tmp_path).endpoints("quay.io")
    assert [e.base_url for e in eps] == ["http://127.0.0.1:6000/v2", "https://quay.io/v2"]
    (d / "hosts.toml").write_text("server = [broken")
    with pytest.raises(ConfigError):
        HostsConfig(tmp_path).endpoints("registry.example.com")


async def test_docker_config_entries(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpw").decode()},
        "reg.example:5000": {"username": "u", "password": "p:with:colons"},
        "tok.example": {"identitytoken": "refresh-123"},
        "bad.example": {"auth": "!!notbase64"},
    }}))
    dc = DockerCredentials(cfg)
    assert await dc.get("docker.io") == Credentials("hubuser", "hubpw")
    assert await dc.get("registry-1.docker.io") == Credentials("hubuser", "hubpw")
    assert await dc.get("reg.example:5000") == Credentials("u", "p:with:colons")
    assert (await dc.get("tok.example")).identity_token == "refresh-123"  # type: ignore[union-attr]
    assert await dc.get("unknown.example") is None
    with pytest.raises(ConfigError) as ei:
        await dc.get("bad.example")
    assert "notbase64" not in str(ei.value)
    assert "hubpw" not in repr(await dc.get("docker.io"))


def test_select_platform() -> None:
    idx = {"manifests": [
        {"mediaType": "m", "digest": D, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "m", "digest": "sha256:" + "cd" * 32, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": "m", "digest": "sha256:" + "ef" * 32, "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},
    ]}
    assert select_platform(idx, "linux/amd64").digest == D
    assert select_platform(idx, "linux/arm64").digest == "sha256:" + "cd" * 32


def test_content_range() -> None:
    assert parse_content_range("bytes 0-0/10") == (0, 1, 10)
    assert parse_content_range("bytes 5-9/*") == (5, 10, None)
    for bad in (None, "bytes 9-5/10", "items 0-1/2", "bytes=0-1/2"):
        with pytest.raises(ProtocolError):
            parse_content_range(bad)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500)), max_size=30),
       st.integers(0, 300), st.integers(1, 3000))
def test_coalesce_covers_every_range(raw: list[tuple[int, int]], gap: int, max_len: int) -> None:
    ranges = [(s, s + n) for s, n in raw]
    spans = coalesce(ranges, gap, max_len)
    seen = sorted(i for sp in spans for i, _, _ in sp.parts)
    assert seen == list(range(len(ranges)))
    for sp in spans:
        for i, s, e in sp.parts:
            assert (s, e) == ranges[i] and sp.start <= s and e <= sp.end
        # a span only grows beyond one range while it stays within max_len
        assert len(sp.parts) == 1 or sp.end - sp.start <= max_len
    assert all(a.end <= b.start or a.start <= b.start for a, b in zip(spans, spans[1:]))

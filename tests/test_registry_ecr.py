"""ECR credentials: botocore GetAuthorizationToken against a local moto server (real AWS
query protocol over HTTP; the client only has its endpoint URL changed), the token used
as Basic auth by a docker-registry whose htpasswd holds moto's ``AWS:<password>``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from harness.proxy import start_proxy
from harness.registry import push_image, start_registry
from snapshotter.registry import AuthError, EcrHost, RegistryClient, RegistryConfig


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Messages plus the structured fields of every record (where values would leak)."""
    return caplog.text + "\n".join(repr(getattr(r, "fields", "")) for r in caplog.records)


ACCOUNT = "123456789012"
MOTO_PASSWORD = f"{ACCOUNT}-auth-token"  # what moto's GetAuthorizationToken encodes
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def moto_url(monkeypatch: pytest.MonkeyPatch):
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        # a counting proxy in front of moto shows how often the client asked for a token
        with start_proxy(f"http://{host}:{port}") as px:
            yield px
    finally:
        server.stop()


def _client(tmp_path: Path, **kw: object) -> RegistryClient:
    cfg = tmp_path / "docker.json"
    cfg.write_text("{}")
    return RegistryClient(RegistryConfig(docker_config=cfg, **kw))  # type: ignore[arg-type]


async def test_ecr_token_configured_host(tmp_path: Path, moto_url, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with start_registry(tmp_path / "reg", htpasswd=("AWS", MOTO_PASSWORD)) as reg:
        ref = f"{reg.host}/t/ecr:v1"
        ecr = {reg.host: EcrHost(region="us-east-1", registry_id=ACCOUNT, endpoint_url=moto_url.url)}
        async with _client(tmp_path, ecr_hosts=ecr) as c:
            img = await push_image(c, ref, [b"ecr layer bytes"])
            ri = await c.resolve(ref)
            assert ri.manifest_digest == img["manifest_digest"]
            assert await c.read_range(ref, ri.layers[0].digest, 4, 9) == b"layer"
            assert c.ecr.calls == 1 and moto_url.stats.total_requests == 1  # cached
            # moto reports an already-past expiresAt: we keep the token min_lifetime seconds,
            # then refresh before using it again.
            c.ecr.min_lifetime = 0.3
            c.ecr._cache.clear()
            assert await c.read_range(ref, ri.layers[0].digest, 0, 3) == b"ecr"
            calls = c.ecr.calls
            await asyncio.sleep(0.4)  # outlive the token lifetime (the behaviour under test)
            assert await c.read_range(ref, ri.layers[0].digest, 10, 15) == b"bytes"
            assert c.ecr.calls == calls + 1
            assert moto_url.stats.total_requests == c.ecr.calls
    assert AWS_SECRET not in log_text(caplog) and MOTO_PASSWORD not in log_text(caplog)


async def test_ecr_host_pattern_via_hosts_toml(tmp_path: Path, moto_url) -> None:
    ecr_name = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com"
    with start_registry(tmp_path / "reg", htpasswd=("AWS", MOTO_PASSWORD)) as reg:
        hosts = tmp_path / "hosts"
        (hosts / ecr_name).mkdir(parents=True)
        (hosts / ecr_name / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
        async with _client(tmp_path, hosts_dir=hosts, ecr_endpoint_url=moto_url.url) as c:
            img = await push_image(c, f"{ecr_name}/team/app:v2", [b"via pattern"])
            ri = await c.resolve(f"{ecr_name}/team/app:v2")
            assert ri.manifest_digest == img["manifest_digest"]
            assert await c.fetch_blob(f"{ecr_name}/team/app", ri.layers[0].digest, 100) == b"via pattern"
            assert c.ecr.calls == 1


async def test_ecr_rejected_token_is_one_line(tmp_path: Path, moto_url) -> None:
    with start_registry(tmp_path / "reg", htpasswd=("AWS", "some-other-password")) as reg:
        ecr = {reg.host: EcrHost(region="us-east-1", registry_id=ACCOUNT, endpoint_url=moto_url.url)}
        async with _client(tmp_path, ecr_hosts=ecr) as c:
            with pytest.raises(AuthError) as ei:
                await c.resolve(f"{reg.host}/t/none:v1")
    msg = str(ei.value)
    assert "\n" not in msg and "rejected" in msg and MOTO_PASSWORD not in msg
    assert json.dumps(msg)  # printable

"""Which build runs: `--version`, `version --json`, the health answer's metadata, the
`lazysnap_build_info` metric and the daemon's first log line all name the package version."""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.containerd import LazysnapDaemon
from snapshotter.version import METADATA_KEY

REPO = Path(__file__).resolve().parent.parent
VERSION = metadata.version("lazysnap")


def lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_version_flag_matches_package_metadata() -> None:
    r = lazysnap("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"lazysnap {VERSION}\n"
    import snapshotter

    assert snapshotter.__version__ == VERSION


def test_version_json_has_the_core_build() -> None:
    r = lazysnap("version", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == VERSION
    assert doc["python"] == platform.python_version()
    core = doc["core"]
    assert core["sanitize"] is False  # this tree's normal build (make sanitize-test builds aside)
    assert re.match(r"(gcc|clang) \d+\.", core["compiler"]), core
    assert "-std=c11" in core["cflags"]
    import zlib

    libs = core["libraries"]
    assert set(libs) == {"zlib", "zstd", "openssl", "isal"}
    assert libs["zlib"] == zlib.ZLIB_RUNTIME_VERSION
    assert libs["zstd"].count(".") == 2 and libs["openssl"].startswith("OpenSSL ")
    assert re.fullmatch(r"\d+\.\d+\.\d+", libs["isal"])
    plain = lazysnap("version")
    assert plain.stdout.splitlines()[0] == f"lazysnap {VERSION}"


def test_help_says_what_lazysnap_is_and_has_examples() -> None:
    r = lazysnap("--help")
    assert r.returncode == 0
    assert "one parser" not in r.stdout
    assert "lazysnap starts containers before their images are downloaded" in r.stdout
    assert "quick start" in r.stdout
    for cmd in ("index", "serve", "status", "prune", "record", "version", "cat", "health"):
        sub = lazysnap(cmd, "--help")
        assert sub.returncode == 0, (cmd, sub.stderr)
        assert "examples:\n  lazysnap " in sub.stdout, cmd


@pytest.mark.root
def test_daemon_reports_its_version(tmp_path: Path) -> None:
    d = LazysnapDaemon(tmp_path, extra_args=["--config", str(tmp_path / "c.toml")])
    (tmp_path / "c.toml").write_text("[remote]\nenabled = false\n")
    try:
        d.start()
        with grpc.insecure_channel(f"unix:{d.address}") as ch:
            call = health_pb2_grpc.HealthStub(ch).Check.with_call(health_pb2.HealthCheckRequest(), timeout=5)
            _, rpc = call
            assert dict(rpc.initial_metadata())[METADATA_KEY] == VERSION
        assert d.metrics_url is not None
        body = urllib.request.urlopen(d.metrics_url, timeout=5).read().decode()
        assert f'lazysnap_build_info{{python="{platform.python_version()}",version="{VERSION}"}} 1.0' in body
    finally:
        d.stop()
    first = d.log_path.read_text().splitlines()[0]
    assert "event=lazysnap_start" in first and f"version={VERSION}" in first, first

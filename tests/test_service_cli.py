"""`lazysnap serve` / `lazysnap health`, config loading, logging, and the deploy/ files."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from harness.containerd import LazysnapDaemon, health_status
from snapshotter.fs.mount import DAEMON_SOCKET
from snapshotter.config import ConfigError, load_config
from snapshotter.log import configure, get_logger

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_example_config_loads_and_flags_override(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "config.toml")
    assert (cfg.root, cfg.address, cfg.metrics_address) == ("/var/lib/lazysnap", "/run/lazysnap/lazysnap.sock",
                                                            "127.0.0.1:9746")
    assert cfg.lazy.max_concurrency == 8 and cfg.remote.enabled
    cfg = load_config(DEPLOY / "config.toml", root=str(tmp_path), log_level="debug", metrics_address=None)
    assert (cfg.root, cfg.log_level, cfg.metrics_address) == (str(tmp_path), "debug", "127.0.0.1:9746")


@pytest.mark.parametrize("text, message", [
    ("rooot = '/x'\n", "unknown config key rooot"),
    ("[lazy]\nmax_concurrency = 'many'\n", "lazy.max_concurrency must be int"),
    ("[lazy]\nindex_trust = 'anyone'\n", "index_trust must be one of"),
    ("log_level = 'loud'\n", "log_level must be one of"),
    ("root = \n", "invalid TOML"),
    (b"root = '/var/lib/\xff'\n", "not UTF-8"),
    ("[prefetch]\npublish_recorded_profiles = true\n", "needs lazy.publish_sign_key"),
    ("[lazy]\npublish_sign_key = '/nonexistent/node.key'\n", "signing key /nonexistent/node.key"),
])
def test_config_errors_are_one_line(tmp_path: Path, text: str | bytes, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(p)
    r = lazysnap("serve", "--config", str(p), "--root", str(tmp_path / "r"), "--address", str(tmp_path / "s"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message.split()[0] in r.stderr


def test_serve_with_config_file_metrics_and_sigterm(tmp_path: Path) -> None:
    from harness.registry import free_port

    port = free_port()
    conf = tmp_path / "config.toml"
    conf.write_text(f'metrics_address = "127.0.0.1:{port}"\nhealth_probe_seconds = 0.5\nlog_level = "info"\n')
    d = LazysnapDaemon(tmp_path, extra_args=["--config", str(conf)], metrics=False)
    try:
        d.start()
        assert lazysnap("health", "--address", d.address).stdout.strip() == "SERVING"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "lazysnap_remote_fallbacks_total" in body and "lazysnap_grpc_request_seconds" in body
        assert oct(os.stat(d.address).st_mode & 0o777) in ("0o660", "0o600")
        assert d.terminate() == 0
        assert not (d.root / DAEMON_SOCKET).exists()  # graceful shutdown removed its socket
        assert os.path.exists(d.address)  # the FUSE holder keeps the public one for the next daemon
        log = d.log_path.read_text()
        assert re.search(r"^ts=\S+ level=info logger=lazysnap\.service event=stopped ", log, re.M)
    finally:
        d.stop()


def test_health_without_daemon_fails_cleanly(tmp_path: Path) -> None:
    r = lazysnap("health", "--address", str(tmp_path / "nothing.sock"), "--timeout", "1")
    assert r.returncode == 1
    assert r.stderr.startswith("lazysnap health: ") and len(r.stderr.strip().splitlines()) == 1
    assert health_status(str(tmp_path / "nothing.sock"), 0.5) is None


@pytest.mark.parametrize("holder", [False, True], ids=["own-socket", "fuse-holder"])
def test_second_daemon_refuses_live_socket(tmp_path: Path, holder: bool) -> None:
    """Another daemon serves the address: refused at once, and with ``fuse_holder`` no
    holder is started for the refused root."""
    d = LazysnapDaemon(tmp_path / "a", metrics=False)
    try:
        d.start()
        (tmp_path / "b.toml").write_text(f"[lazy]\nfuse_holder = {str(holder).lower()}\n")
        args = ["serve", "--root", str(tmp_path / "b"), "--address", d.address, "--config", str(tmp_path / "b.toml")]
        r = lazysnap(*args)
        assert r.returncode == 1 and "in use" in r.stderr
        assert not (tmp_path / "b" / "fuse-holder.pid").exists()
        assert health_status(d.address) == "SERVING"
    finally:
        d.stop()


def test_second_daemon_on_the_same_root_is_refused(tmp_path: Path) -> None:
    """Another address, the same --root: refused at once in one line; the first serves on."""
    d = LazysnapDaemon(tmp_path / "a", metrics=False)
    try:
        d.start()
        r = lazysnap("serve", "--root", str(d.root), "--address", str(tmp_path / "other.sock"))
        errors = [ln for ln in r.stderr.splitlines() if "level=" not in ln]
        assert r.returncode == 1 and len(errors) == 1 and "another lazysnap serve uses" in errors[0], r.stderr
        assert health_status(d.address) == "SERVING"
    finally:
        d.stop()


def test_log_lines_are_key_value_and_redacted() -> None:
    buf = io.StringIO()
    handler = configure("debug", stream=buf)
    try:
        log = get_logger("test")
        log.info("fetch", url="https://user:hunter2@reg.example/v2/x?X-Amz-Signature=abc123&n=1",
                 password="hunter2", note="Authorization: Bearer tok.en.value", size=12)
    finally:
        import logging
        logging.getLogger("lazysnap").removeHandler(handler)
    line = buf.getvalue()
    assert line.count("\n") == 1
    assert "hunter2" not in line and "abc123" not in line and "tok.en.value" not in line
    assert re.match(r"ts=\S+ level=info logger=lazysnap\.test event=fetch url=\S+ password=<redacted> ", line)
    assert "size=12" in line and "n=1" in line


def test_deploy_files_parse(tmp_path: Path) -> None:
    for name in ("config-1.6-1.7.toml", "config-2.x.toml"):
        doc = tomllib.loads((DEPLOY / "containerd" / name).read_text())
        assert doc["proxy_plugins"]["lazysnap"] == {"type": "snapshot", "address": "/run/lazysnap/lazysnap.sock"}
    v2 = tomllib.loads((DEPLOY / "containerd" / "config-1.6-1.7.toml").read_text())
    cri = v2["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "lazysnap", "disable_snapshot_annotations": False}
    v3 = tomllib.loads((DEPLOY / "containerd" / "config-2.x.toml").read_text())
    images = v3["plugins"]["io.containerd.cri.v1.images"]
    assert (images["snapshotter"], images["disable_snapshot_annotations"]) == ("lazysnap", False)
    unit = (DEPLOY / "systemd" / "lazysnap.service").read_text()
    assert "ExecStart=/usr/local/bin/lazysnap serve --config /etc/lazysnap/config.toml" in unit
    ds = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    assert "privileged: true" in ds and "mountPropagation: Bidirectional" in ds and "/dev/fuse" in ds
    # the ConfigMap's config.toml is one the daemon accepts
    block = ds.split("config.toml: |\n", 1)[1].split("\n---", 1)[0]
    (tmp_path / "ds.toml").write_text(block.replace("\n    ", "\n").removeprefix("    "))
    cfg = load_config(tmp_path / "ds.toml")
    cfg.validate()
    assert cfg.lazy.index_trust == "signed"
    # the holder runs in a DaemonSet of its own, holding the socket the daemon's config names
    assert cfg.lazy.fuse_holder and cfg.lazy.fuse_holder_external
    holder = ds.split("name: lazysnap-fused\n", 1)[1].split("\n---", 1)[0]
    assert "type: OnDelete" in holder and "mountPropagation: Bidirectional" in holder
    assert f'"fuse-holder", "--root", "{cfg.root}",\n' in holder and f'"--address", "{cfg.address}"' in holder
    # passthrough is the daemon's default: the holder must ask the kernel for it at INIT
    assert cfg.lazy.fuse_passthrough and '"--passthrough"]' in holder
    unit = (DEPLOY / "systemd" / "lazysnap-fused.service").read_text()
    assert f"fuse-holder --root {cfg.root} --address {cfg.address} --passthrough" in unit


@pytest.mark.skipif(os.geteuid() != 0, reason="runs containerd")
def test_containerd_16_accepts_deploy_config() -> None:
    r = subprocess.run(["containerd", "--config", str(DEPLOY / "containerd" / "config-1.6-1.7.toml"), "config",
                        "dump"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dumped = tomllib.loads(r.stdout)
    assert dumped["proxy_plugins"]["lazysnap"]["address"] == "/run/lazysnap/lazysnap.sock"
    assert dumped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "lazysnap"


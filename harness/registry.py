"""Run a real Debian ``docker-registry`` (distribution 2.8) on loopback for tests and benches.

Modes: plain HTTP (default), htpasswd Basic auth, token auth (``TokenAuth`` from
``harness.tokenserver``), proxy (pull-through cache) of another registry, and HTTPS
with a test CA (``tls=True``). Each registry gets its own storage dir, config and free
port under ``workdir``; ``stop()`` / ``start()`` restart it on the same port and storage
(to show fallbacks). Readiness is a poll of ``GET /v2/``, never a sleep.
``push_image(client, ref, layers)`` pushes a minimal image with a ``RegistryClient``.

    with start_registry(tmp_path / "reg") as reg:
        ... reg.url  # "http://127.0.0.1:PORT"
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.tokenserver import TokenAuth

__all__ = ["Registry", "TokenAuth", "start_registry", "free_port", "make_tls", "push_image"]

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    """A currently free loopback TCP port (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(workdir: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key) PEM paths."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazysnap test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = (workdir / "ca.pem", workdir / "server.pem", workdir / "server-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (distribution only accepts bcrypt)."""
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RuntimeError("htpasswd not found (apt-get install apache2-utils)")
    out = subprocess.run([htpasswd, "-nbB", user, password], check=True,
                         capture_output=True, text=True).stdout
    return out.strip() + "\n"


class Registry:
    """One docker-registry process; see ``start_registry``."""

    def __init__(self, workdir: Path, *, htpasswd: tuple[str, str] | None = None,
                 token_auth: TokenAuth | None = None, proxy_remote: str | None = None,
                 proxy_username: str | None = None, proxy_password: str | None = None,
                 port: int | None = None, tls: bool = False) -> None:
        if htpasswd and token_auth:
            raise ValueError("choose htpasswd or token_auth, not both")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"
        self.storage.mkdir(exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.ca_path: Path | None = None
        if tls:
            self.ca_path, self._cert, self._key = make_tls(self.workdir / "tls")
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.htpasswd = htpasswd
        self.token_auth = token_auth
        self.proxy_remote = proxy_remote
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config(proxy_username, proxy_password)

    def _write_config(self, proxy_username: str | None, proxy_password: str | None) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  cache:",  # as Debian's packaged config.yml: blob descriptors from memory, not stat()s
            "    blobdescriptor: inmemory",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: lazysnap-test-secret-{self.port}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self._cert}", f"    key: {self._key}"]
        if self.htpasswd:
            path = self.workdir / "htpasswd"
            path.write_text(_htpasswd_line(*self.htpasswd))
            lines += ["auth:", "  htpasswd:", "    realm: lazysnap-test",
                      f"    path: {path}"]
        elif self.token_auth:
            ta = self.token_auth
            lines += ["auth:", "  token:", f"    realm: {ta.realm}",
                      f"    service: {ta.service}", f"    issuer: {ta.issuer}",
                      f"    rootcertbundle: {ta.cert_path}"]
        if self.proxy_remote:
            lines += ["proxy:", f"  remoteurl: {self.proxy_remote}"]
            if proxy_username is not None:
                lines.append(f"  username: {proxy_username}")
            if proxy_password is not None:
                lines.append(f"  password: {proxy_password}")
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> Registry:
        """Start (or restart) on the same port and storage; return once /v2/ answers."""
        if self.running:
            return self
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config_path)],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self._proc = None
                raise RuntimeError(f"docker-registry exited at start:\n{tail}")
            ctx = ssl.create_default_context(cafile=str(self.ca_path)) if self.ca_path else None
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=2, context=ctx) as resp:
                    resp.read()
                return self
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # auth-protected: alive
                    return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry on {self.host} not ready in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; tests should stop() explicitly
        with contextlib.suppress(Exception):
            self.stop()


def start_registry(workdir: Path, *, htpasswd: tuple[str, str] | None = None,
                   token_auth: TokenAuth | None = None, proxy_remote: str | None = None,
                   proxy_username: str | None = None,
                   proxy_password: str | None = None, tls: bool = False) -> Registry:
    """Start a docker-registry under ``workdir`` and wait until it answers.

    ``tls=True`` serves HTTPS with a fresh test CA (``reg.ca_path``); ``reg.url`` is then
    ``https://127.0.0.1:PORT``."""
    reg = Registry(workdir, htpasswd=htpasswd, token_auth=token_auth,
                   proxy_remote=proxy_remote, proxy_username=proxy_username,
                   proxy_password=proxy_password, tls=tls)
    return reg.start()


# -- test content -------------------------------------------------------------------
async def push_image(client: object, ref: str, layers: list[bytes], *,
                     layer_media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
                     platforms: list[str] | None = None) -> dict[str, object]:
    """Push a minimal image (config + ``layers`` as given) with a ``RegistryClient``.

    With ``platforms`` an OCI index is pushed under the tag, one manifest per platform
    (layer bytes suffixed with the platform so each platform's blobs differ).
    Returns {"manifest_digest", "layer_digests", "per_platform", "index_digest"}.
    """
    import hashlib
    import json

    from snapshotter.registry import Reference
    from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST

    r = Reference.parse(ref)

    async def one(platform: str, tag: str | None) -> dict[str, object]:
        os_, arch = platform.split("/")[:2]
        blobs = [lay if platforms is None else lay + platform.encode() for lay in layers]
        descs = [await client.push_blob(r, b, layer_media_type) for b in blobs]  # type: ignore[attr-defined]
        config = {"architecture": arch, "os": os_,
                  "rootfs": {"type": "layers",
                             "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]},
                  "config": {"Cmd": ["/bin/true"]}}
        cdesc = await client.push_blob(r, json.dumps(config).encode(),  # type: ignore[attr-defined]
                                       "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc.to_dict(),
                    "layers": [d.to_dict() for d in descs]}
        mdesc = await client.push_manifest(r, manifest, OCI_MANIFEST, tag=tag)  # type: ignore[attr-defined]
        return {"manifest_digest": mdesc.digest, "layer_digests": [d.digest for d in descs],
                "size": mdesc.size, "blobs": blobs}

    if platforms is None:
        out = await one("linux/amd64", r.tag)
        out["index_digest"] = None
        return out
    per = {p: await one(p, None) for p in platforms}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": v["manifest_digest"], "size": v["size"],
         "platform": dict(zip(("os", "architecture", "variant"), p.split("/")))}
        for p, v in per.items()]}
    idesc = await client.push_manifest(r, index, OCI_INDEX, tag=r.tag)  # type: ignore[attr-defined]
    return {"per_platform": per, "index_digest": idesc.digest}

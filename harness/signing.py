"""A publisher's signing key pair for tests and benches (made once per process).

Nodes serve a published index only if its artifact is signed by a key they trust, so
every harness that publishes indexes signs them with this key and configures its nodes
with the public half, exactly as a fleet would with its own key.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class KeyPair:
    private: Path  # PEM PKCS#8 (what `lazysnap index --push --sign-key` takes)
    public: Path  # PEM SubjectPublicKeyInfo (what `[lazy] trusted_keys` lists)

    def trust_toml(self) -> str:
        """The ``[lazy]`` keys a node needs to trust this publisher."""
        return f'trusted_keys = ["{self.public}"]\n'


def make_key_pair(directory: Path) -> KeyPair:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "publisher.key", directory / "publisher.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public)


@functools.cache
def publisher_keys() -> KeyPair:
    """This process's publisher key pair (in a temporary directory that lives as long)."""
    directory = Path(tempfile.mkdtemp(prefix="lazysnap-keys-"))
    atexit.register(shutil.rmtree, directory, True)
    return make_key_pair(directory)


def sign_flags() -> list[str]:
    """The ``lazysnap index --push`` flags that sign with this process's publisher key."""
    return ["--sign-key", str(publisher_keys().private)]


def publish_signed(ref: str, workdir: Path, *extra: str, timeout: float = 300) -> str:
    """``lazysnap index REF --push``, signed with this process's publisher key, as an image
    publisher runs it (its own --root and an empty --hosts-dir under ``workdir``); returns
    the summary line."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "snapshotter", "index", ref, "--push", *sign_flags(), *extra,
                           "--root", str(workdir / "publisher"), "--hosts-dir", str(workdir / "nohosts")],
                          check=True, cwd=repo, capture_output=True, text=True, timeout=timeout)
    return done.stdout.strip()

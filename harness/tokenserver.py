"""A small OCI token server for tests: the ``auth: token`` half of a real docker-registry.

The registry verifies the JWTs it issues against ``cert_path`` (its ``rootcertbundle``),
so tests exercise the genuine Bearer flow (401 challenge → realm → token → retry) without
mocks. It runs aiohttp on its own event loop in a daemon thread (``LoopThread``), so
both sync and async tests can use it. ``POST /token`` serves the OAuth2 refresh-token
grant (docker's ``identitytoken``). Counters (``requests``, ``issued``, ``failures``) let
tests assert how often a client came back for a token.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from harness.loopthread import LoopThread


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(slots=True)
class TokenStats:
    requests: int = 0
    issued: int = 0
    failures: int = 0
    scopes: list[str] = field(default_factory=list)


class TokenAuth:
    """A running token server plus the key material the registry needs to trust it.

    ``users`` maps username → password; when empty every caller is anonymous and
    gets what it asks for. ``ttl`` is the ``expires_in`` of issued tokens (seconds).
    """

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 ttl: int = 300, service: str = "lazysnap-registry",
                 issuer: str = "lazysnap-test-issuer",
                 refresh_tokens: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})  # OAuth2 refresh token → account
        self.ttl = ttl
        self.service = service
        self.issuer = issuer
        self.stats = TokenStats()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazysnap test token issuer")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-ca.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self._thread: LoopThread | None = None
        self.port = 0
        self._start()

    # -- lifecycle -------------------------------------------------------------------
    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._handle)
        app.router.add_post("/token", self._handle_oauth)
        self._thread = LoopThread("tokenserver")
        self.port = self._thread.serve(app)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    def __enter__(self) -> TokenAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- token issuing ---------------------------------------------------------------
    def _authenticate(self, header: str | None) -> str | None:
        """Return the account name, "" for anonymous, None for bad credentials."""
        if not self.users:
            return ""
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if self.users.get(user) == password else None

    async def _handle(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        account = self._authenticate(request.headers.get("Authorization"))
        if account is None:
            self.stats.failures += 1
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        return self._grant(account, request.query.getall("scope", []))

    async def _handle_oauth(self, request: web.Request) -> web.Response:
        """OAuth2 ``grant_type=refresh_token`` (docker's ``identitytoken`` flow)."""
        self.stats.requests += 1
        form = await request.post()
        account = self.refresh_tokens.get(str(form.get("refresh_token", "")))
        if form.get("grant_type") != "refresh_token" or account is None:
            self.stats.failures += 1
            return web.json_response({"error": "invalid_grant"}, status=401)
        scopes = [s for s in str(form.get("scope", "")).split(" ") if s]
        return self._grant(account, scopes)

    def _grant(self, account: str, scopes: list[str]) -> web.Response:
        self.stats.scopes.extend(scopes)
        access: list[dict[str, object]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.issue(account, access)
        self.stats.issued += 1
        return web.json_response({"token": token, "access_token": token,
                                  "expires_in": self.ttl,
                                  "issued_at": dt.datetime.now(dt.UTC).isoformat()})

    def issue(self, subject: str, access: list[dict[str, object]]) -> str:
        """Sign an RS256 JWT with the certificate chain in ``x5c`` (what the registry checks)."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + self.ttl, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

"""requirements/lock.txt, pyproject.toml and the installed venv cannot disagree.

The lock (``bash scripts/lock``) pins every Python package the scripts install, with
hashes; pyproject.toml keeps honest ranges for people who install lazysnap into their own
environment. These tests fail when one moves without the other: a requirement the lock
does not satisfy, a pin nothing requires any more, a venv that is not the lock, generated
gRPC code whose floor is not pyproject's floor, and (slow) a venv at pyproject's lower
bounds that cannot serve.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from harness.containerd import stop_fuse_holder, unmount_under

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
TOOLS = REPO / "requirements" / "tools.in"
EXTRAS = ("test", "bench", "ecr")  # what scripts/lock compiles and scripts/test installs
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _lock() -> dict[str, tuple[Version, Marker | None]]:
    pins: dict[str, tuple[Version, Marker | None]] = {}
    for line in LOCK.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"{name} pinned twice in {LOCK.name}"
            pins[name] = (Version(m.group(2)), Marker(m.group(3)) if m.group(3) else None)
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _top_level() -> list[Requirement]:
    """What the lock is compiled from: the runtime dependencies, the locked extras and
    requirements/tools.in."""
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for line in TOOLS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(Requirement(line))
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


def test_lock_satisfies_every_requirement() -> None:
    pins = _lock()
    build = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
    for req in [*_top_level(), *build]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}: run bash scripts/lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name][0]}, outside {req}: run bash scripts/lock"


def _requires(name: str, extras: set[str]) -> list[Requirement]:
    out = []
    for text in metadata.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def test_lock_is_exactly_what_pyproject_needs() -> None:
    """The closure of the top-level requirements over the installed packages' metadata is
    the lock: a dependency dropped from pyproject.toml leaves no pin behind."""
    pins = _lock()
    wanted = {canonicalize_name(r.name): set(r.extras) for r in _top_level()}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        for req in _requires(name, wanted[name]):
            dep = canonicalize_name(req.name)
            if dep not in wanted or not set(req.extras) <= wanted[dep]:
                wanted[dep] = wanted.get(dep, set()) | set(req.extras)
                todo.append(dep)
    applicable = {n for n, (_, marker) in pins.items() if marker is None or marker.evaluate()}
    assert applicable == set(wanted), (
        f"not needed: {sorted(applicable - set(wanted))}, missing: {sorted(set(wanted) - applicable)}; "
        "run bash scripts/lock")


def test_venv_holds_exactly_the_lock() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv made by scripts/lib.sh")
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    installed.pop("lazysnap", None)
    expected = {n: v for n, (v, marker) in pins.items() if marker is None or marker.evaluate()}
    assert installed == expected, "the venv is not the lock: rerun bash scripts/test (it rebuilds .venv)"


def _generated() -> tuple[Version, Version]:
    """(grpcio, protobuf) versions the committed code in snapshotter/api was generated for."""
    grpc_versions, pb_versions = set(), set()
    for path in (REPO / "snapshotter" / "api").rglob("*.py"):
        text = path.read_text()
        grpc_versions.update(re.findall(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.MULTILINE))
        pb_versions.update(".".join(m) for m in re.findall(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
            text))
    assert len(grpc_versions) == 1 and len(pb_versions) == 1, (grpc_versions, pb_versions)
    return Version(grpc_versions.pop()), Version(pb_versions.pop())


def test_generated_code_floor_is_pyprojects_floor() -> None:
    grpc_gen, pb_gen = _generated()
    deps = {canonicalize_name(r.name): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    assert _floor(deps["grpcio"]) == grpc_gen, "pyproject's grpcio floor must be the generator's version"
    assert _floor(deps["grpcio-health-checking"]) >= grpc_gen
    assert _floor(deps["protobuf"]) == pb_gen, "pyproject's protobuf floor must be the generated code's"
    tools = {canonicalize_name(r.name): r for r in _top_level()}
    assert _floor(tools["grpcio-tools"]) == grpc_gen, "requirements/tools.in pins the generator that made the code"
    assert _lock()["grpcio-tools"][0] == grpc_gen


def _ensure_venv(tmp_path: Path, lock_text: str) -> subprocess.CompletedProcess[str]:
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_text)
    env = {**os.environ, "LAZYSNAP_LOCK": str(lock), "LAZYSNAP_VENV": str(tmp_path / "venv"),
           "LAZYSNAP_PYTHON": sys.base_prefix + "/bin/python3"}
    return subprocess.run(["bash", "-c", ". scripts/lib.sh && ensure_venv"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("pin, digit", [
    ("six==1.17.0", "0"),  # a real release, a hash that is not its
    ("lazysnap-no-such-package-x7q==0.0.1", "1"),  # a release PyPI does not serve
], ids=["wrong-hash", "missing-release"])
def test_an_uninstallable_lock_stops_in_one_line(tmp_path: Path, pin: str, digit: str) -> None:
    done = _ensure_venv(tmp_path, f"{pin} \\\n    --hash=sha256:{digit * 64}\n")
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("lazysnap: creating")]
    assert len(lines) == 1, done.stderr
    assert pin in lines[0] and "scripts/lock --upgrade" in lines[0], lines[0]
    assert not (tmp_path / "venv").exists(), "a half-installed venv was left behind"


@pytest.mark.slow
@pytest.mark.root
def test_lower_bounds_install_and_serve(tmp_path: Path) -> None:
    """``pip install .`` into a clean venv with every runtime dependency at its floor in
    pyproject.toml imports, serves and answers a health check."""
    floors = {canonicalize_name(r.name): _floor(r) for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    (tmp_path / "floors.txt").write_text("".join(f"{name}=={v}\n" for name, v in floors.items()))
    venv = tmp_path / "venv"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_CONSTRAINT": str(tmp_path / "floors.txt"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_FIND_LINKS", None)
    done = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(REPO)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installed = {canonicalize_name(n): Version(v) for n, _, v in (ln.partition("==") for ln in listed)}
    assert {n: installed.get(n) for n in floors} == floors
    sock = Path(f"/tmp/lzs-floor-{os.getpid()}.sock")
    serve = subprocess.Popen([str(venv / "bin/lazysnap"), "serve", "--root", str(tmp_path / "root"),
                              "--address", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "serve.log", "wb"), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            health = subprocess.run([str(venv / "bin/lazysnap"), "health", "--address", str(sock)],
                                    capture_output=True, text=True, cwd=tmp_path)
            if health.returncode == 0:
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, health.stderr
            time.sleep(0.5)
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        stop_fuse_holder(tmp_path / "root")  # serve started it ([lazy] fuse_holder)
        sock.unlink(missing_ok=True)
        unmount_under(tmp_path)
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]

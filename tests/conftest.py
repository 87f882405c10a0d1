"""Suite-wide check: tests clean up what they start.

A ``lazysnap serve`` or ``fuse-holder`` left running, or a lazysnap FUSE mount left behind,
outlives the test that started it: it holds ports, state and mounts for the next test and
for the machine (a FUSE mount whose server dies hangs whatever touches it). Whatever of
those appeared during the session and is still there at its end fails the run, named,
and is cleaned up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

_BEFORE: dict[str, set[str]] = {}


def _processes() -> set[str]:
    """``pid:cmdline`` of running ``python -m snapshotter serve|fuse-holder`` processes."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"snapshotter" in argv and (b"serve" in argv or b"fuse-holder" in argv):
            found.add(f"{pid}:{b' '.join(argv).decode(errors='replace').strip()}")
    return found


def _mounts() -> set[str]:
    """Mount points of lazysnap FUSE filesystems (from mountinfo: never stat'ed)."""
    found = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            if tail[0].startswith("fuse") and tail[1] == "lazysnap":
                found.add(fields[4].encode().decode("unicode_escape"))
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``root`` tests mount FUSE filesystems and run daemons: as another user they would
    fail on permissions, so they are skipped, saying why."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (FUSE mounts, containerd, daemons): CI runs the suite as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE["processes"] = _processes()
    _BEFORE["mounts"] = _mounts()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _BEFORE:
        return
    deadline = time.monotonic() + 5  # a process told to stop may still be leaving
    while True:
        procs = _processes() - _BEFORE["processes"]
        mounts = _mounts() - _BEFORE["mounts"]
        if not (procs or mounts) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not (procs or mounts):
        return
    for p in procs:
        try:
            os.kill(int(p.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"left running: {p}" for p in sorted(procs)] + [f"left mounted: {m}" for m in sorted(mounts)]
    if reporter is not None:
        reporter.write_sep("=", "tests left these behind (now killed / unmounted)", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

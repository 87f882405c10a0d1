"""The suite's own conventions: what a contributor without root gets from ``root`` tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_root_tests_are_skipped_saying_why_for_other_users() -> None:
    code = ("import os, sys, pytest\n"
            "os.geteuid = lambda: 1000\n"  # as a user without root, in this process only
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', 'tests/test_fs.py', "
            "'tests/test_index_format.py', '-k', 'test_ or tests_']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:]
    assert "needs root (FUSE mounts, containerd, daemons)" in p.stdout
    assert " passed" in p.stdout and " skipped" in p.stdout  # the format tests still ran
    assert "failed" not in p.stdout and "error" not in p.stdout.lower()

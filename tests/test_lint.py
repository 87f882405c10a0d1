"""Every Python file of the repository passes pyflakes (unused imports, undefined names,
shadowed definitions), except the generated gRPC code (scripts/gen-proto writes it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from pyflakes import api, reporter

REPO = Path(__file__).resolve().parents[1]
GENERATED = "snapshotter/api/"


class _Collect(reporter.Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def unexpectedError(self, filename: str, message: str) -> None:  # noqa: N802 - pyflakes' names
        self.lines.append(f"{filename}: {message}")

    def syntaxError(self, filename: str, msg: str, lineno: int, offset: int, text: str) -> None:  # noqa: N802
        self.lines.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message: object) -> None:
        self.lines.append(str(message))


def test_pyflakes_finds_nothing() -> None:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    found = _Collect()
    for name in files:
        if not name.startswith(GENERATED):
            api.checkPath(str(REPO / name), found)
    assert files and found.lines == [], "\n".join(found.lines)

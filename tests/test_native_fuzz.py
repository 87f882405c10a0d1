"""The C fuzz targets (native/fuzz/) built with gcc + ASan/UBSan and run on generated inputs.

libFuzzer needs clang, which Debian 12's toolchain here lacks; native/fuzz/driver.c stands
in for it with a seeded generator of well-formed and damaged inputs, so a run is the same
every time and any crash reproduces from its seed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parent.parent / "native"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def _fuzz(tmp_path: Path, target: str, sources: list[str], flags: list[str], runs: int, seed: int) -> None:
    """Build ``native/fuzz/<target>.c`` with the seeded driver under ASan/UBSan and run
    ``runs`` generated inputs from ``seed``: no crash, no sanitizer report."""
    exe = tmp_path / target
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                    "-D_GNU_SOURCE", *SANITIZE, str(NATIVE / f"fuzz/{target}.c"), str(NATIVE / "fuzz/driver.c"),
                    *(str(NATIVE / f) for f in sources), *flags, "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "LZ_FUZZ_RUNS": str(runs), "LZ_FUZZ_SEED": str(seed),
           "ASAN_OPTIONS": "abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    env.pop("LD_PRELOAD", None)  # the sanitizer run preloads libasan for Python; this binary links it
    run = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{runs} generated inputs, no crash" in run.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("seed", [1, 2])
def test_fuse_request_parser(tmp_path: Path, seed: int) -> None:
    _fuzz(tmp_path, "fuse_request", ["fuse/kproto.c"], [f"-I{NATIVE / 'fuse'}"], 200000, seed)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("seed", [1, 2])
def test_tar_stage_and_index_build(tmp_path: Path, seed: int) -> None:
    """Hostile layers through the tar stage and the C index build (native/fuzz/tar_index.c)."""
    _fuzz(tmp_path, "tar_index", ["tar.c", "sha_mb.c", "indexbuild.c"], [f"-I{NATIVE}", "-lcrypto", "-lzstd"],
          100000, seed)

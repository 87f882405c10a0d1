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


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("seed", [1, 2])
def test_fuse_request_parser(tmp_path: Path, seed: int) -> None:
    exe = tmp_path / "fuse_request"
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                    "-D_GNU_SOURCE", *SANITIZE, f"-I{NATIVE / 'fuse'}", str(NATIVE / "fuzz/fuse_request.c"),
                    str(NATIVE / "fuzz/driver.c"), str(NATIVE / "fuse/kproto.c"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "LZ_FUZZ_RUNS": "200000", "LZ_FUZZ_SEED": str(seed),
           "ASAN_OPTIONS": "abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    env.pop("LD_PRELOAD", None)  # the sanitizer run preloads libasan for Python; this binary links it
    run = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "200000 generated inputs, no crash" in run.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("seed", [1, 2])
def test_tar_stage_and_index_build(tmp_path: Path, seed: int) -> None:
    """Hostile layers through the tar stage and the C index build (native/fuzz/tar_index.c)."""
    exe = tmp_path / "tar_index"
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                    "-D_GNU_SOURCE", *SANITIZE, f"-I{NATIVE}", str(NATIVE / "fuzz/tar_index.c"),
                    str(NATIVE / "fuzz/driver.c"), *(str(NATIVE / f) for f in ("tar.c", "sha_mb.c", "indexbuild.c")),
                    "-lcrypto", "-lzstd", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "LZ_FUZZ_RUNS": "100000", "LZ_FUZZ_SEED": str(seed),
           "ASAN_OPTIONS": "abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "100000 generated inputs, no crash" in run.stdout

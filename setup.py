"""Build of the C core: plain C11 against ISA-L, zlib, libzstd and libcrypto."""
from __future__ import annotations

import os

from setuptools import Extension, setup

# LAZYSNAP_SANITIZE=1: ASan + UBSan build for `make sanitize-test`.
SANITIZE = os.environ.get("LAZYSNAP_SANITIZE") == "1"
cflags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]
ldflags: list[str] = []
if SANITIZE:
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
               "-fno-sanitize-recover=undefined"]
    ldflags += ["-fsanitize=address,undefined"]
# what `lazysnap version --json` reports about this build (native/buildinfo.c)
build_macros = [("LAZYSNAP_CFLAGS", '"' + " ".join(cflags) + '"'), ("LAZYSNAP_SANITIZE", "1" if SANITIZE else "0")]

core = Extension(
    "snapshotter._core",
    sources=sorted(os.path.join("native", f) for f in os.listdir("native") if f.endswith(".c")),
    depends=sorted(os.path.join("native", f) for f in os.listdir("native") if f.endswith(".h")),
    include_dirs=["native"],
    libraries=["isal", "z", "zstd", "crypto"],
    define_macros=build_macros,
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

# The daemon's FUSE filesystem: speaks the kernel's FUSE protocol itself and answers metadata
# and local reads on C threads.
fuse = Extension(
    "snapshotter._fuse",
    sources=sorted(os.path.join("native", "fuse", f) for f in os.listdir("native/fuse") if f.endswith(".c")),
    depends=sorted(os.path.join("native", "fuse", f) for f in os.listdir("native/fuse") if f.endswith(".h")),
    include_dirs=["native/fuse"],
    libraries=["pthread"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(ext_modules=[core, fuse])

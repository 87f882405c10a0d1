"""``lazysnap version [--json]``: which build this is (see ``snapshotter.version``)."""
from __future__ import annotations

import argparse
import json

from snapshotter.version import version_info


def cmd_version(args: argparse.Namespace) -> int:
    info = version_info()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
        return 0
    core = info.core
    libs = core["libraries"]
    assert isinstance(libs, dict)
    print(f"lazysnap {info.version}")
    print(f"python   {info.python} ({info.python_implementation})")
    print(f"C core   {core['compiler']}, sanitizers {'on' if core['sanitize'] else 'off'}, "
          f"flags {core['cflags']}")
    print("libs     " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())))
    return 0

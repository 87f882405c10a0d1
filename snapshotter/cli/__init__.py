"""The ``lazysnap`` command line: one parser, handlers in one module per concern.

Command names, flags and output formats are a contract that outside tooling calls.
Handlers are imported lazily so that ``lazysnap health`` does not pay for FUSE or aiohttp.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

DEFAULT_ROOT = "/var/lib/lazysnap"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_ADDRESS = "/run/lazysnap/lazysnap.sock"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (2 for usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _handler(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        mod = importlib.import_module(f"snapshotter.cli.{module}")
        return int(getattr(mod, func)(args) or 0)

    return run


def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=os.environ.get("LAZYSNAP_ROOT", DEFAULT_ROOT),
                   help="state directory holding the index and chunk caches")
    p.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR,
                   help="containerd hosts.toml directory (mirrors, TLS, plain http)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazysnap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="index a local layer file or every layer of a remote image")
    p.add_argument("source", metavar="LAYER|REF", help="local gzip/zstd/tar layer, or an image reference")
    p.add_argument("-o", "--output", help="index file to write (local layer)")
    p.add_argument("--diff-id", action="store_true", help="also compute the uncompressed diff ID")
    p.add_argument("--span", type=int, default=None,
                   help="compressed bytes between checkpoints (default 4 MiB; 256 KiB with --push)")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="maximum chunk size")
    p.add_argument("--push", action="store_true", help="publish the indexes as an OCI artifact (REF)")
    p.add_argument("--windows-apart", action="store_true",
                   help="with --push: publish each index's checkpoint windows as a blob of their own, "
                        "fetched by range only where a read decodes (fewer registry bytes, one more "
                        "request per decoded span; see bench/RESULTS.md)")
    _remote_flags(p)
    p.set_defaults(func=_handler("layer_cmds", "cmd_index"))

    p = sub.add_parser("inspect", help="summarise an index")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_handler("layer_cmds", "cmd_inspect"))

    p = sub.add_parser("cat", help="print one file: `cat INDEX LAYER PATH` or `cat REF PATH`")
    p.add_argument("operands", nargs="+", metavar="INDEX LAYER PATH | REF PATH")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="one JSON line of read statistics on stderr")
    _remote_flags(p)
    p.set_defaults(func=_handler("layer_cmds", "cmd_cat"))

    p = sub.add_parser("ls", help="list index entries like `tar -tv`")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("path", metavar="PATH", nargs="?", default="")
    p.set_defaults(func=_handler("layer_cmds", "cmd_ls"))

    p = sub.add_parser("serve", help="run the snapshotter daemon")
    p.add_argument("--root", default=None, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--address", default=None, help=f"gRPC unix socket (default {DEFAULT_ADDRESS})")
    p.add_argument("--config", default=None, help="TOML config file; flags override it")
    p.add_argument("--hosts-dir", default=None, help=f"hosts.toml directory (default {DEFAULT_HOSTS_DIR})")
    p.add_argument("--metrics-address", default=None, help="HOST:PORT for Prometheus metrics")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_handler("serve_cmds", "cmd_serve"))

    p = sub.add_parser("health", help="exit 0 when the daemon reports SERVING")
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_handler("serve_cmds", "cmd_health"))

    p = sub.add_parser("record", help="run an image and record its start-up profile",
                       usage="lazysnap record REF [options] [-- CMD ...]")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="lazysnap daemon socket")
    p.add_argument("--containerd", default="/run/containerd/containerd.sock",
                   help="containerd socket")
    p.add_argument("--namespace", default="default")
    p.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR)
    p.add_argument("--timeout", type=float, default=60.0, help="stop recording after S seconds")
    p.set_defaults(cmd=[], takes_command=True)  # `-- CMD …`: split off in main()
    p.set_defaults(func=_handler("profile_cmds", "cmd_record"))

    p = sub.add_parser("profile", help="share and show start-up profiles")
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    pp = psub.add_parser("push", help="publish the profile as an OCI artifact of the image")
    pp.add_argument("ref", metavar="REF")
    pp.add_argument("--no-pack", dest="pack", action="store_false",
                    help="publish the profile only, not the pack of its chunks from this node's store")
    _remote_flags(pp)
    pp.set_defaults(func=_handler("profile_cmds", "cmd_profile_push"))
    pp = psub.add_parser("show", help="summarise the profile of an image")
    pp.add_argument("ref", metavar="REF")
    pp.add_argument("--json", action="store_true")
    _remote_flags(pp)
    pp.set_defaults(func=_handler("profile_cmds", "cmd_profile_show"))

    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    # Everything after the first "--" is a command to run (``lazysnap record REF -- CMD``);
    # argparse cannot place it after optional flags that follow a positional itself.
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if command:
        if not getattr(args, "takes_command", False):
            parser.error(f"{args.command} takes no command after --")
        args.cmd = command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"lazysnap {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0

"""The ``lazysnap`` command line: one parser, handlers in one module per concern.

Command names, flags and output formats are a contract that outside tooling calls.
Handlers are imported lazily so that ``lazysnap health`` does not pay for FUSE or aiohttp.
The user-facing text (what lazysnap is, how to start, examples per command) is
``DESCRIPTION`` and the ``epilog`` of each command.
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
DEFAULT_CRI_ADDRESS = "/run/lazysnap/cri.sock"
DEFAULT_CONTAINERD_CRI = "/run/containerd/containerd.sock"

DESCRIPTION = """\
lazysnap starts containers before their images are downloaded. It is a containerd
snapshotter that indexes ordinary gzip, zstd and tar layers (no image conversion), serves
each layer through FUSE and fetches only the chunks a container reads, with HTTP Range
requests to the registry; the rest is filled in the background. To start: run
`lazysnap serve` as root, declare its socket as the proxy snapshotter "lazysnap" in
containerd's config.toml (deploy/ has the snippets, a systemd unit and a Kubernetes
DaemonSet), then pull with `ctr-remote image rpull --snapshotter lazysnap REF` or through
Kubernetes. `lazysnap index REF --push` publishes an image's indexes so that nodes do not
have to build them, and `lazysnap status` shows what the daemon is doing."""

EPILOG = """\
quick start (as root):
  lazysnap serve --root /var/lib/lazysnap --address /run/lazysnap/lazysnap.sock &
  lazysnap health --address /run/lazysnap/lazysnap.sock
  ctr-remote image rpull --snapshotter lazysnap registry.example/app:1
  ctr run --rm --snapshotter lazysnap registry.example/app:1 demo
  lazysnap status --address /run/lazysnap/lazysnap.sock

`lazysnap COMMAND --help` shows each command's flags and examples."""


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


def _share_registry(value: str) -> str:
    """``--share-registry`` checked as ``[lazy] share_registry`` is ("": none, the default;
    argparse converts the default of every command's parser, so that costs no import)."""
    if not value:
        return ""
    from snapshotter.registry.reference import InvalidReferenceError, check_share_registry

    try:
        return check_share_registry(value)
    except InvalidReferenceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--share-registry", metavar="HOST[:PORT][/PREFIX]", type=_share_registry, default="",
                   help=f"{what} (the image's repository path under it), as nodes with [lazy] share_registry do")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked (importlib.metadata
    costs every other command ~30 ms of start-up)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kw: object) -> None:
        from snapshotter.version import package_version

        print(f"lazysnap {package_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazysnap", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, examples: Sequence[str], **kw: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=_examples(*examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)  # type: ignore[arg-type]

    p = command("index", "index a local layer file or every layer of a remote image", [
        "lazysnap index layer.tar.gz -o layer.idx          # a local layer",
        "lazysnap index registry.example/app:1             # every layer, kept in --root",
        "lazysnap index registry.example/app:1 --push      # publish for every node (OCI artifact)",
        "lazysnap index registry.example/app:1 --push --sign-key publisher.key  # signed: nodes trust it",
    ])
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
    p.add_argument("--sign-key", metavar="KEY",
                   help="with --push: sign the artifact (cosign format) with this PEM private key; nodes "
                        "serve a published index only if signed by a key in their [lazy] trusted_keys")
    _share_flag(p, "with --push: publish in this registry instead of the image's own repository")
    _remote_flags(p)
    p.set_defaults(func=_handler("layer_cmds", "cmd_index"))

    p = command("inspect", "summarise an index", [
        "lazysnap inspect layer.idx", "lazysnap inspect layer.idx --json | jq .chunks"])
    p.add_argument("index", metavar="INDEX")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_handler("layer_cmds", "cmd_inspect"))

    p = command("cat", "print one file: `cat INDEX LAYER PATH` or `cat REF PATH`", [
        "lazysnap cat layer.idx layer.tar.gz etc/os-release",
        "lazysnap cat registry.example/app:1 /etc/os-release --stats",
    ])
    p.add_argument("operands", nargs="+", metavar="INDEX LAYER PATH | REF PATH")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="one JSON line of read statistics on stderr")
    p.add_argument("--trusted-key", metavar="PUBKEY", action="append", default=[],
                   help="use a published index signed by this PEM public key (repeatable); otherwise "
                        "the layers are indexed by streaming them")
    _share_flag(p, "also look for published indexes in this registry, after the image's repository")
    _remote_flags(p)
    p.set_defaults(func=_handler("layer_cmds", "cmd_cat"))

    p = command("ls", "list index entries like `tar -tv`", ["lazysnap ls layer.idx", "lazysnap ls layer.idx usr/bin"])
    p.add_argument("index", metavar="INDEX")
    p.add_argument("path", metavar="PATH", nargs="?", default="")
    p.set_defaults(func=_handler("layer_cmds", "cmd_ls"))

    p = command("serve", "run the snapshotter daemon", [
        "lazysnap serve --root /var/lib/lazysnap --address /run/lazysnap/lazysnap.sock",
        "lazysnap serve --config /etc/lazysnap/config.toml --metrics-address 127.0.0.1:9102",
        "lazysnap serve --cri-proxy --cri-address /run/lazysnap/cri.sock \\",
        "    --containerd-cri /run/containerd/containerd.sock   # Kubernetes: kubelet talks to lazysnap",
    ])
    p.add_argument("--root", default=None, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--address", default=None, help=f"gRPC unix socket (default {DEFAULT_ADDRESS})")
    p.add_argument("--config", default=None, help="TOML config file; flags override it")
    p.add_argument("--hosts-dir", default=None, help=f"hosts.toml directory (default {DEFAULT_HOSTS_DIR})")
    p.add_argument("--metrics-address", default=None, help="HOST:PORT for Prometheus metrics")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    p.add_argument("--trusted-key", metavar="PUBKEY", action="append", default=[],
                   help="also trust published indexes signed by this PEM public key (repeatable; "
                        "added to [lazy] trusted_keys)")
    p.add_argument("--cri-proxy", action="store_true", default=None,
                   help="also serve a CRI v1 proxy for kubelet that forwards to containerd and keeps "
                        "each PullImage's registry credentials in memory (see deploy/kubernetes)")
    p.add_argument("--cri-address", default=None,
                   help=f"the CRI proxy's unix socket, kubelet's --container-runtime-endpoint "
                        f"(default {DEFAULT_CRI_ADDRESS})")
    p.add_argument("--containerd-cri", default=None,
                   help=f"containerd's CRI socket the proxy forwards to (default {DEFAULT_CONTAINERD_CRI})")
    p.set_defaults(func=_handler("serve_cmds", "cmd_serve"))

    p = command("fuse-holder", "hold the FUSE mount so containers outlive the daemon "
                "(started by `serve` with [lazy] fuse_holder = true)", [
        "lazysnap fuse-holder --root /var/lib/lazysnap   # what serve starts; or its own systemd unit"])
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"the daemon's state directory (default {DEFAULT_ROOT})")
    p.add_argument("--mountpoint", default=None, help="the FUSE mount (default ROOT/mnt)")
    p.add_argument("--threads", type=int, default=8, help="C threads answering FUSE requests")
    p.add_argument("--read-ahead-kb", type=int, default=1024)
    p.add_argument("--passthrough", action="store_true",
                   help="ask the kernel for FUSE passthrough, so files the daemon gives a backing file are read "
                        "without us ([lazy] fuse_passthrough)")
    p.add_argument("--wait-s", type=float, default=30.0,
                   help="how long a read that needs a fetch, or a gRPC call, waits for a daemon")
    p.add_argument("--address", default=None,
                   help="also hold the daemon's public gRPC socket (serve's --address) and forward calls to "
                        "ROOT/daemon.sock, so calls made while the daemon restarts wait instead of failing")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_handler("serve_cmds", "cmd_fuse_holder"))

    p = command("health", "exit 0 when the daemon reports SERVING", [
        "lazysnap health --address /run/lazysnap/lazysnap.sock && echo up"])
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_handler("serve_cmds", "cmd_health"))

    p = command("status", "what the daemon serves: images, layers, fill progress, fallbacks, store", [
        "lazysnap status",
        "lazysnap status --json | jq '.images[].layers[] | {digest, bytes_local, bytes_total}'",
    ])
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="lazysnap daemon socket")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (schema: docs/status-json.md)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_handler("status_cmds", "cmd_status"))

    p = command("prune", "show (default) or reclaim (--apply) store space no snapshot uses", [
        "lazysnap prune                      # what the running daemon would reclaim",
        "lazysnap prune --apply              # reclaim it",
        "lazysnap prune --root /var/lib/lazysnap --apply   # daemon stopped: work on the store directly",
    ])
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="lazysnap daemon socket")
    p.add_argument("--root", default=os.environ.get("LAZYSNAP_ROOT", DEFAULT_ROOT),
                   help="state directory, used when no daemon answers on --address")
    p.add_argument("--apply", action="store_true", help="delete the unreferenced chunks (default: dry run)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_handler("prune_cmds", "cmd_prune"))

    p = command("version", "print the version, the Python and the C core's build", [
        "lazysnap version", "lazysnap version --json | jq .core.libraries"])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_handler("version_cmds", "cmd_version"))

    p = command("record", "run an image and record its start-up profile", [
        "lazysnap record registry.example/app:1 -- python3 -c 'import torch'",
        "lazysnap record registry.example/app:1 --timeout 30   # the image's own command",
    ], usage="lazysnap record REF [options] [-- CMD ...]")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="lazysnap daemon socket")
    p.add_argument("--containerd", default="/run/containerd/containerd.sock",
                   help="containerd socket")
    p.add_argument("--namespace", default="default")
    p.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR)
    p.add_argument("--timeout", type=float, default=60.0, help="stop recording after S seconds")
    p.set_defaults(cmd=[], takes_command=True)  # `-- CMD …`: split off in main()
    p.set_defaults(func=_handler("profile_cmds", "cmd_record"))

    p = command("profile", "share and show start-up profiles", [
        "lazysnap profile push registry.example/app:1", "lazysnap profile show registry.example/app:1 --json"])
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    pp = psub.add_parser("push", help="publish the profile as an OCI artifact of the image",
                         epilog=_examples("lazysnap profile push registry.example/app:1",
                                          "lazysnap profile push registry.example/app:1 --sign-key publisher.key",
                                          "lazysnap profile push registry.example/app:1 --no-pack"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pp.add_argument("ref", metavar="REF")
    pp.add_argument("--no-pack", dest="pack", action="store_false",
                    help="publish the profile only, not the pack of its chunks from this node's store")
    pp.add_argument("--sign-key", metavar="KEY",
                    help="sign the artifact (cosign format) with this PEM private key; nodes use a "
                         "published profile only if signed by a key in their [lazy] trusted_keys")
    _share_flag(pp, "publish in this registry instead of the image's own repository")
    _remote_flags(pp)
    pp.set_defaults(func=_handler("profile_cmds", "cmd_profile_push"))
    pp = psub.add_parser("show", help="summarise the profile of an image",
                         epilog=_examples("lazysnap profile show registry.example/app:1"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pp.add_argument("ref", metavar="REF")
    pp.add_argument("--json", action="store_true")
    pp.add_argument("--trusted-key", metavar="PUBKEY", action="append", default=[],
                    help="show the published profile a node trusting this PEM public key would use "
                         "(repeatable); otherwise the newest one, unverified")
    _share_flag(pp, "also look for published profiles in this registry, after the image's repository")
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

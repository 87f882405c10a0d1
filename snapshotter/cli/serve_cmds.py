"""``lazysnap serve`` (the daemon) and ``lazysnap health`` (its probe)."""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.cli import CLIError
from snapshotter.config import Config, ConfigError, load_config
from snapshotter.log import configure, get_logger
from snapshotter.service.errors import SnapshotError
from snapshotter.service.provider import LayerProvider
from snapshotter.service.rootdir import UMASK, RootError, secure_root

if TYPE_CHECKING:
    from snapshotter.cri import CriCredentials

log = get_logger("lazysnap.serve")
SHUTDOWN_DEADLINE_S = 15.0  # SIGTERM to exit, at most (systemd and the tests wait longer)


def _provider(cfg: Config, credentials: CriCredentials | None) -> LayerProvider:
    """The lazy layer provider, unless remote layers are switched off."""
    from snapshotter.layers import build_provider
    from snapshotter.service.provider import NoRemoteProvider

    if not cfg.remote.enabled:
        log.info("remote_provider", provider="none", reason="remote.enabled=false")
        return NoRemoteProvider()
    return build_provider(cfg, credentials=credentials)


async def _serve(cfg: Config) -> None:
    from snapshotter.metrics import start_metrics_server
    from snapshotter.service import SnapshotService, Snapshotter

    cri_proxy = None
    credentials = None
    if cfg.cri.enabled:
        from snapshotter.cri import CriCredentials
        from snapshotter.cri.proxy import CriProxy

        credentials = CriCredentials(cfg.cri.credential_ttl_s)
        cri_proxy = CriProxy(cfg.cri.address, cfg.cri.containerd_address, credentials)
    address = await _behind_holder(cfg) if cfg.lazy.fuse_holder else cfg.address
    snapshotter = Snapshotter(cfg.root_path, _provider(cfg, credentials))
    await snapshotter.open()
    # behind the holder only it connects (root): no group access, as everything under the root
    service = SnapshotService(snapshotter, address, probe_interval=cfg.health_probe_seconds,
                              mode=0o600 if cfg.lazy.fuse_holder else 0o660)
    metrics_server = None
    try:
        if cfg.metrics_address:
            metrics_server = start_metrics_server(cfg.metrics_address)
            log.info("metrics", address=f"{cfg.metrics_address.rpartition(':')[0]}:{metrics_server.port}")
        await service.start()
        if cri_proxy is not None:
            await cri_proxy.start()
    except BaseException:
        await snapshotter.close()
        if metrics_server is not None:
            metrics_server.stop()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown", reason="signal")
    # A shutdown stuck somewhere (a thread that never returns) must not leave a zombie
    # daemon holding the socket: after this long, every thread's stack goes to stderr and
    # the process exits (status 1), so the hang is both bounded and diagnosable.
    faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE_S, exit=True)
    if cri_proxy is not None:
        await cri_proxy.stop(grace=5.0)
    await service.stop(grace=10.0)
    if metrics_server is not None:
        metrics_server.stop()


async def _behind_holder(cfg: Config) -> str:
    """With ``[lazy] fuse_holder``: make sure the holder runs and holds the public socket
    (``cfg.address``); the daemon then serves gRPC on ``<root>/daemon.sock`` behind it, so
    containerd's calls made while the daemon restarts wait for the next one. With
    ``fuse_holder_external`` a supervisor starts it: wait for it (60 s)."""
    from snapshotter.fs.holderlink import ensure_holder
    from snapshotter.fs.mount import DAEMON_SOCKET, HOLDER_SOCKET
    from snapshotter.fsutil import listening

    root = cfg.root_path
    if listening(cfg.address) and not listening(str(root / HOLDER_SOCKET)):
        raise OSError(f"{cfg.address} is in use by another process (not this root's FUSE holder)")
    if listening(str(root / DAEMON_SOCKET)):
        raise OSError(f"another lazysnap serve uses {root} (it answers on {root / DAEMON_SOCKET}): "
                      f"one daemon per root")
    external = cfg.lazy.fuse_holder_external
    if not external:
        await ensure_holder(root / HOLDER_SOCKET, root / "mnt", cfg.lazy.fuse_session(), relay=Path(cfg.address))
    for _ in range(3000 if external else 250):  # the holder opens the public socket right after its own
        if listening(cfg.address):
            return str(root / DAEMON_SOCKET)
        await asyncio.sleep(0.02)
    raise OSError(f"the FUSE holder of {root} does not hold {cfg.address} (started with another --address?): "
                  f"serve on the address it holds, or restart it with "
                  f"`lazysnap fuse-holder --root {root} --address {cfg.address}`")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena (up to 8 per core) and
    rarely returns their free memory: the fetch and decode worker threads left the daemon
    at 326 MB peak RSS after a cold start of the inference image, 254 MB with two arenas
    (same time). Must run before the worker threads start; other libcs are left alone."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # <malloc.h>
    mallopt(m_arena_max, arenas)


def _log_start() -> None:
    """The daemon's first log line says which build runs (also ``lazysnap_build_info``)."""
    import platform

    from snapshotter import metrics
    from snapshotter.version import package_version

    version, python = package_version(), platform.python_version()
    metrics.BUILD_INFO.labels(version=version, python=python).set(1)
    log.info("lazysnap_start", version=version, python=python, pid=os.getpid())


def cmd_fuse_holder(args: argparse.Namespace) -> int:
    from snapshotter.fs.holder import run_holder
    from snapshotter.fs.mount import SessionOptions

    if not 1 <= args.threads <= 16:
        raise CLIError(f"--threads must be 1..16, got {args.threads}", status=2)
    if args.wait_s <= 0:
        raise CLIError(f"--wait-s must be positive, got {args.wait_s:g}", status=2)
    configure(args.log_level)
    os.umask(UMASK)
    root = Path(args.root)
    try:
        secure_root(root)
        how = SessionOptions(args.threads, args.read_ahead_kb, args.passthrough)
        return asyncio.run(run_holder(root, Path(args.mountpoint) if args.mountpoint else root / "mnt", how,
                                      wait_s=args.wait_s, relay=Path(args.address) if args.address else None))
    except (RootError, OSError) as exc:
        raise CLIError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, root=args.root, address=args.address, hosts_dir=args.hosts_dir,
                          metrics_address=args.metrics_address, log_level=args.log_level)
        if args.cri_proxy:
            cfg.cri.enabled = True
        cfg.cri.address = args.cri_address or cfg.cri.address
        cfg.cri.containerd_address = args.containerd_cri or cfg.cri.containerd_address
        cfg.lazy.trusted_keys = [*cfg.lazy.trusted_keys, *args.trusted_key]
        cfg.validate()
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    configure(cfg.log_level)
    _log_start()
    os.umask(UMASK)  # whatever a library creates under the root is private too
    try:
        secure_root(cfg.root_path)
    except RootError as exc:
        raise CLIError(str(exc)) from None
    _limit_malloc_arenas()
    try:
        asyncio.run(_serve(cfg))  # the shutdown deadline stays armed through interpreter exit
    except OSError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # e.g. a malformed metrics address
        raise CLIError(str(exc)) from None
    except SnapshotError as exc:  # e.g. the metadata DB cannot be opened
        raise CLIError(str(exc)) from None
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.address if args.address.startswith("unix:") else f"unix:{args.address}"
    try:
        with grpc.insecure_channel(target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=args.timeout)
    except grpc.RpcError as exc:
        raise CLIError(f"{args.address}: {exc.code().name}: {exc.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1

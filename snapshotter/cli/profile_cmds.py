"""``lazysnap record`` and ``lazysnap profile push|show``: start-up profiles from the command line.

``record`` drives a real start through containerd with the running daemon: it pulls the
image with ``ctr-remote image rpull --snapshotter lazysnap`` (no layer download), asks the
daemon (``lazysnap.v1.Control``) to start recording, runs the container with
``ctr run --rm --snapshotter lazysnap`` until the command exits or ``--timeout``, then
stops the recording; the daemon merges it into ``<root>/profiles/<algo>-<hex>.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from snapshotter.cli import CLIError
from snapshotter.cli.progress import progress
from snapshotter.cli.remote_cmds import _config, _run
from snapshotter.cli.units import human_bytes as _human

CTR = shutil.which("ctr") or "/usr/bin/ctr"
CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"


async def _resolve(args: argparse.Namespace) -> Any:
    from snapshotter.registry import RegistryClient

    async with RegistryClient(_config(args)) as client:
        return await client.resolve(args.ref)


# -- record ------------------------------------------------------------------------------------
def _control(address: str) -> tuple[Any, Any]:
    import grpc

    from snapshotter.api.lazysnap.v1 import control_pb2_grpc

    target = address if address.startswith("unix:") else f"unix:{address}"
    channel = grpc.insecure_channel(target)
    return channel, control_pb2_grpc.ControlStub(channel)


def _rpc_error(exc: Any, address: str) -> CLIError:
    return CLIError(f"daemon {address}: {exc.code().name}: {exc.details()}")


def _pull_argv(args: argparse.Namespace) -> list[str]:
    from snapshotter.registry.hosts import is_loopback
    from snapshotter.registry.reference import as_reference

    argv = [CTR_REMOTE, "--address", args.containerd, "--namespace", args.namespace, "image", "rpull",
            "--snapshotter", "lazysnap"]
    hosts = args.hosts_dir if args.hosts_dir and os.path.isdir(args.hosts_dir) else None
    if hosts:
        argv += ["--hosts-dir", hosts]
    elif is_loopback(as_reference(args.ref).registry):
        argv.append("--plain-http")  # the daemon's client uses http for loopback registries too
    return [*argv, args.ref]


def _run_container(args: argparse.Namespace, cmd: list[str]) -> int | None:
    """``ctr run --rm``; the exit status, or None if it was killed at ``--timeout``."""
    cid = f"lazysnap-record-{uuid.uuid4().hex[:12]}"
    base = [CTR, "--address", args.containerd, "--namespace", args.namespace]
    proc = subprocess.Popen([*base, "run", "--rm", "--snapshotter", "lazysnap", args.ref, cid, *cmd],
                            stdin=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"lazysnap record: --timeout {args.timeout}s reached, stopping the container", file=sys.stderr)
        subprocess.run([*base, "task", "kill", "--signal", "SIGKILL", cid], capture_output=True, check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run([*base, "container", "rm", cid], capture_output=True, check=False)
        return None


def cmd_record(args: argparse.Namespace) -> int:
    import grpc

    from snapshotter.api.lazysnap.v1 import control_pb2 as pb

    cmd = list(args.cmd)
    if args.timeout <= 0:
        raise CLIError("--timeout must be positive")
    resolved = _run_resolve(args)
    layers = [d.digest for d in resolved.layers]
    shown = progress("record", steps=3, unit="steps")
    r = subprocess.run(_pull_argv(args), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        shown.close()
        raise CLIError(f"pull failed: {(r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]}")
    shown.step(f"pulled {args.ref} ({len(layers)} layers, lazily)")
    channel, stub = _control(args.address)
    with channel:
        try:
            started = stub.StartRecording(pb.StartRecordingRequest(image_ref=args.ref,
                                                                   manifest_digest=resolved.manifest_digest,
                                                                   layer_digests=layers), timeout=30)
        except grpc.RpcError as exc:
            shown.close()
            raise _rpc_error(exc, args.address) from None
        status: int | None = -1
        try:
            status = _run_container(args, cmd)
            shown.step("container finished" if status is not None else "container stopped at --timeout")
        finally:
            shown.close()
            try:
                stopped = stub.StopRecording(pb.StopRecordingRequest(recording_id=started.recording_id,
                                                                     discard=status == -1), timeout=60)
            except grpc.RpcError as exc:
                raise _rpc_error(exc, args.address) from None
    summary = json.loads(stopped.summary_json or b"{}")
    how = "timeout" if status is None else f"exit status {status}"
    print(f"lazysnap record: {args.ref} ({how}): profile {stopped.path} manifest={stopped.manifest_digest} "
          f"recordings={summary.get('recordings')} files={summary.get('files')} chunks={summary.get('chunks')} "
          f"bytes={summary.get('bytes')}", file=sys.stderr)
    if not summary.get("chunks"):
        print("lazysnap record: warning: no chunk was read through lazysnap (were the files already in the "
              "page cache, or the layers not served lazily?)", file=sys.stderr)
    return 0


def _run_resolve(args: argparse.Namespace) -> Any:
    out: list[Any] = []

    async def go() -> int:
        out.append(await _resolve(args))
        return 0

    _run(go())
    return out[0]


# -- profile push / show ---------------------------------------------------------------------------
def cmd_profile_push(args: argparse.Namespace) -> int:
    from snapshotter.prefetch.profile import ProfileError, load
    from snapshotter.prefetch.publish import build_pack, publish_profile
    from snapshotter.registry.reference import places
    from snapshotter.registry.signatures import load_private_key, signature_tag
    from snapshotter.store import ChunkStore

    async def go() -> int:
        from snapshotter.registry import RegistryClient

        signer = load_private_key(args.sign_key) if args.sign_key else None  # a bad key fails before any work
        async with RegistryClient(_config(args)) as client:
            resolved = await client.resolve(args.ref)
            root = Path(args.root)
            try:
                profile = load(root, resolved.manifest_digest)
            except ProfileError as exc:
                raise CLIError(f"local profile unusable: {exc}") from None
            if profile is None:
                raise CLIError(f"no profile for {resolved.manifest_digest} under {args.root}/profiles "
                               f"(record one with `lazysnap record`)")
            packed = None
            shown = progress("profile push", steps=2 if args.pack else 1, unit="steps")
            try:
                if args.pack:
                    packed = await asyncio.to_thread(lambda: build_pack(root, ChunkStore(root), profile))
                    shown.step(f"pack of {packed[1] if packed else 0} chunks, "
                               f"{_human(len(packed[0]) if packed else 0)}")
                done = await publish_profile(client, places(args.ref, args.share_registry)[-1],
                                             resolved.manifest_descriptor, profile, packed, signer)
                shown.step(f"pushed {_human(done.pushed_bytes)}")
            finally:
                shown.close()
            print(f"{done.artifact.digest} profile of {resolved.manifest_digest}: {profile.chunks} chunks, "
                  f"{profile.bytes} bytes, {profile.recordings} recording(s)")
            if packed is not None:
                print(f"pack: {packed[1]} of {profile.chunks} chunks, {len(packed[0])} bytes")
            if signer is not None:
                print(f"signature: {signature_tag(done.artifact.digest)}")
        return 0

    return _run(go())


def cmd_profile_show(args: argparse.Namespace) -> int:
    from snapshotter.prefetch.lookup import Found, first_published
    from snapshotter.prefetch.profile import ProfileError, load, profile_path
    from snapshotter.registry.reference import places
    from snapshotter.registry.signatures import Voucher, load_public_keys

    async def look(client: Any, manifest: str, voucher: Voucher) -> Found | None:
        """The image's repository, then the share registry's (a rejection is reported only
        when no place has a usable profile)."""
        found, rejected = await first_published(client, places(args.ref, args.share_registry), manifest, voucher)
        if found is None and rejected is not None:
            raise rejected
        return found

    async def go() -> int:
        from snapshotter.registry import RegistryClient

        async with RegistryClient(_config(args)) as client:
            resolved = await client.resolve(args.ref)
            manifest = resolved.manifest_digest
            try:
                profile = load(Path(args.root), manifest)
                source = f"local {profile_path(Path(args.root), manifest)}"
                vouched = "local"
                if profile is None:
                    keys = load_public_keys(args.trusted_key)
                    voucher = Voucher("signed", tuple(keys)) if keys else Voucher("unverified")
                    found = await look(client, manifest, voucher)
                    if found is None:
                        raise CLIError(f"no profile for {manifest} (neither under {args.root} nor in the registry)")
                    profile = found.profile
                    vouched = found.vouched
                    where = f" in {found.ref}" if found.ref != args.ref else ""
                    source = f"registry {found.source}{where} ({vouched})"
                    if found.pack is not None:
                        source += f" (pack {found.pack.digest}, {_human(found.pack.size)})"
            except ProfileError as exc:
                raise CLIError(f"profile rejected: {exc}") from None
        summary = profile.summary()
        if args.json:
            print(json.dumps({"image": args.ref, "source": source, "vouched": vouched, **summary}, indent=2))
            return 0
        print(f"image       {args.ref}\nmanifest    {manifest}\nsource      {source}\n"
              f"recordings  {profile.recordings}\nfiles       {profile.files}\nchunks      {profile.chunks}\n"
              f"bytes       {profile.bytes} ({_human(profile.bytes)})")
        print(f"{'LAYER':<20} {'FILES':>7} {'CHUNKS':>8} {'BYTES':>11} {'OF CHUNKS':>10} {'LAST FIRST READ':>16}")
        for lay in summary["layers"]:  # type: ignore[union-attr]
            print(f"{lay['digest'][:19]:<20} {lay['files']:>7} {lay['chunks']:>8} {_human(lay['bytes']):>11} "
                  f"{lay['chunk_count']:>10} {lay['last_first_access_ms']:>13.1f} ms")
        return 0

    return _run(go())

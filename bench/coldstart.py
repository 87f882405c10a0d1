"""Cold-start benchmark: pull + run of one image, per snapshotter variant, median of N.

Every run gets a fresh node (private containerd, fresh lazysnap root), a dropped page
cache and a reset byte counter on the registry link; a run is the time of
``ctr images pull`` / ``ctr-remote images rpull`` plus ``ctr run --rm`` of the image's own
command, and the registry bytes sent before the container exited.

Variants:
  overlayfs          containerd's overlayfs snapshotter, full pull (the baseline)
  overlayfs-warm     same, on a node that already holds the previous image version
  floor              only ``ctr run`` from an already unpacked overlayfs snapshot
  lazysnap           ``ctr-remote image rpull --snapshotter lazysnap``, no profile
  lazysnap-profile   same, after ``lazysnap record`` + ``lazysnap profile push``
  lazysnap-warm      lazysnap node whose cache holds the previous image version
  lazysnap-local     a second start on a node holding every chunk the start reads
  lazysnap-unsigned  no published index trusted (an unsigned image): layers streamed to index

    sudo .venv/bin/python -m bench.coldstart --image inference --runs 3
    sudo .venv/bin/python -m bench.coldstart --image synthetic --size-gb 4 --hot 0.05 --rate 1gbit
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.byteproxy import ByteProxy, parse_rate
from bench.node import Node, NodeError, Skip, drop_caches, lazysnap_has, publish_index, quiesce, write_hosts
from harness.images import PushedImage
from harness.registry import Registry, start_registry
from harness.signing import publisher_keys

BENCH = Path(__file__).resolve().parent
VARIANTS = ["overlayfs", "overlayfs-warm", "floor", "lazysnap", "lazysnap-profile", "lazysnap-warm", "lazysnap-local",
            "lazysnap-unsigned", "lazysnap-fleet"]
NO_PROFILE_CONFIG = "[prefetch]\nprefetch = false\nregistry_lookup = false\n"
# lazysnap-local: the second start must measure the FUSE path alone, not a background fill
# still running beside it (the first start's reads and read-ahead already hold its chunks)
LOCAL_CONFIG = NO_PROFILE_CONFIG + "background = false\n"
# lazysnap-unsigned: a node that uses no published index (an image nobody signed, under the
# default index_trust = "signed"): every layer is indexed by streaming it once
UNSIGNED_CONFIG = '[lazy]\nindex_trust = "local-only"\n' + NO_PROFILE_CONFIG
# lazysnap-fleet: node A starts a copy of the image nobody indexed, and its daemon publishes the
# indexes it builds and the start it records, signed with the fleet's key (the bench publisher's,
# which every node trusts); node B, fresh, is the one measured
FLEET_A_CONFIG = ('[lazy]\npublish_built_indexes = true\npublish_sign_key = "{key}"\n'
                  '[prefetch]\nrecord_first_start = true\nrecord_first_start_s = {window}\n'
                  'publish_recorded_profiles = true\n')
DEFAULT_VARIANTS = ["overlayfs", "floor", "lazysnap", "lazysnap-profile", "lazysnap-warm"]


def merge_toml(*snippets: str) -> str:
    """One config from a variant's TOML and --lazysnap-config: the same table in both (say
    [lazy]) is one table, the later snippet's keys winning. Scalars and lists of scalars,
    which is what lazysnap's config holds."""
    tables: dict[str, dict[str, object]] = {}
    for snippet in snippets:
        for name, table in tomllib.loads(snippet).items():
            if not isinstance(table, dict):
                raise ValueError(f"top-level key {name!r}: lazysnap's config has tables only")
            tables.setdefault(name, {}).update(table)
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
                   for name, table in tables.items())


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as TOML")


def log(event: str, **kv: object) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"event={event} {fields}".rstrip(), file=sys.stderr, flush=True)


# ------------------------------------------------------------------ images


@dataclass(slots=True)
class BenchImage:
    """The image under test (and its previous version for the warm variants)."""

    name: str
    target: PushedImage
    previous: PushedImage | None
    expected: str            # substring the container must print
    uncompressed: int
    files: int
    registry_host: str = ""  # refs above name this host; runs go through the proxy

    def via(self, img: PushedImage, host: str) -> str:
        return img.ref.replace(self.registry_host, host, 1)


def prepare_inference(reg: Registry, args: argparse.Namespace) -> BenchImage:
    from bench.build_inference_image import EXPECTED_OUTPUT, ensure_pushed, layout_info
    target = ensure_pushed(reg.host, "v2")
    previous = ensure_pushed(reg.host, "v1") if _needs_previous(args) else None
    assert target.layout is not None
    info = layout_info(target.layout)
    layers = info["layers"]  # type: ignore[index]
    return BenchImage("inference", target, previous, EXPECTED_OUTPUT,
                      sum(x["bytes"] for x in layers), sum(x["entries"] for x in layers),  # type: ignore[union-attr]
                      reg.host)


def prepare_synthetic(reg: Registry, args: argparse.Namespace) -> BenchImage:
    from bench.synthetic import SyntheticSpec, ensure_pushed
    spec = SyntheticSpec(size_gb=args.size_gb, hot=args.hot, seed=args.seed, layers=args.layers)
    target, info = ensure_pushed(reg.host, spec)
    previous = None
    if _needs_previous(args):
        previous, _ = ensure_pushed(reg.host, spec.previous())
    return BenchImage(f"synthetic-{spec.label}", target, previous, info["expected"],
                      info["bytes"], info["entries"], reg.host)


def prepare_demo(reg: Registry, args: argparse.Namespace) -> BenchImage:
    from bench.demo import EXPECTED, build_sample
    target = build_sample(args.workdir / "demo-image", reg.host)
    return BenchImage("demo", target, None, EXPECTED, 0, 0, reg.host)


PREPARE: dict[str, Callable[[Registry, argparse.Namespace], BenchImage]] = {
    "inference": prepare_inference, "synthetic": prepare_synthetic, "demo": prepare_demo}


def _needs_previous(args: argparse.Namespace) -> bool:
    return any(v.endswith("-warm") for v in args.variants)


# ------------------------------------------------------------------ measuring


@dataclass(slots=True)
class Sample:
    pull: float
    run: float
    pull_bytes: int
    total_bytes: int
    # lazysnap's own count of compressed bytes fetched during the run, by purpose
    fetched: dict[str, int] = field(default_factory=dict)
    rss_mb: float = 0.0  # the daemon's peak RSS during the measured pull + run
    node_rss_mb: float = 0.0  # its peak over the node's whole life (earlier images' work included)
    local_share: float | None = None  # chunks already local at their first start-up read

    @property
    def total(self) -> float:
        return self.pull + self.run


@dataclass(slots=True)
class Outcome:
    variant: str
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def median_sample(self) -> Sample:
        """The run whose total is the median (the lower middle for an even count)."""
        ordered = sorted(self.samples, key=lambda s: s.total)
        return ordered[(len(ordered) - 1) // 2]

    def span(self, attr: str) -> tuple[float, float]:
        vals = [getattr(s, attr) for s in self.samples]
        return min(vals), max(vals)


class Bench:
    """Runs the variants against one registry behind one counting (and shaping) proxy."""

    def __init__(self, image: BenchImage, proxy: ByteProxy, workdir: Path, runs: int,
                 keep: bool = False, settle_s: float = 30.0) -> None:
        self.image, self.proxy, self.workdir, self.runs = image, proxy, workdir, runs
        self.keep = keep
        self.settle_s = settle_s
        self.ref = image.via(image.target, proxy.host)
        self.prev_ref = image.via(image.previous, proxy.host) if image.previous else None
        self._seq = 0
        self._published: str | None = None  # "" = tried and failed
        self._floor: Node | None = None
        self.notes: list[str] = []
        self.extra_config = ""  # TOML appended to every lazysnap node's config (--lazysnap-config)

    def _node(self, tag: str, *, lazy: bool, config: str = "") -> Node:
        self._seq += 1
        return Node(self.workdir / f"{self._seq:03d}-{tag}", self.proxy.host, lazysnap=lazy, keep=self.keep,
                    lazysnap_config=merge_toml(config, self.extra_config))

    def _check(self, output: str) -> None:
        if self.image.expected not in output:
            raise NodeError(f"container printed {output.strip()[-200:]!r}, expected {self.image.expected!r}")

    def _measure(self, node: Node, *, lazy: bool, streams: bool = False, ref: str | None = None) -> Sample:
        """One timed pull + run of the image (or of its copy ``ref``) on ``node``; ``streams``:
        the variant downloads every layer at pull time by design (lazysnap-unsigned), which is
        otherwise taken for a fallback."""
        ref = ref or self.ref
        before = node.daemon.fetched_by_purpose() if node.daemon else {}
        earlier_rss = 0.0
        if node.daemon is not None:
            earlier_rss = node.daemon.peak_rss_mb()
            node.daemon.reset_peak_rss()  # the peak of this start, not of what the node did before
        self._cold()
        self.proxy.reset()
        pull = node.pull(ref, lazy=lazy)
        pull_bytes = self.proxy.downstream_bytes
        if lazy and not streams and pull_bytes > 0.9 * self.image.target.compressed_size:
            raise Skip(f"lazysnap fell back to a full pull ({pull_bytes / 1e6:.0f} of "
                       f"{self.image.target.compressed_size / 1e6:.0f} MB fetched during rpull): "
                       "layers are not provided lazily yet")
        run = node.run(ref, lazy=lazy, name=f"c{self._seq}")
        total_bytes = self.proxy.downstream_bytes
        after = node.daemon.fetched_by_purpose() if node.daemon else {}
        self._check(run.output)
        fetched = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
        rss, share = 0.0, None
        if node.daemon is not None:
            rss = node.daemon.peak_rss_mb()
            reads = node.daemon.startup_reads()
            if sum(reads.values()):
                share = reads.get("hit", 0) / sum(reads.values())
        return Sample(pull.seconds, run.seconds, pull_bytes, total_bytes, fetched, rss, max(rss, earlier_rss), share)

    def _cold(self) -> None:
        """Page cache dropped and the machine quiet before a measured run."""
        drop_caches()
        busy = quiesce(limit=self.settle_s)
        if busy >= 0.25:
            log("not_quiet", cpu_busy=f"{busy:.2f}")

    def _settle(self, quiet: float = 5.0, limit: float = 600.0) -> None:
        """Wait until the registry link has been idle for ``quiet`` s (background fetch done)."""
        deadline = time.monotonic() + limit
        last, since = self.proxy.downstream_bytes, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.proxy.downstream_bytes
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def _require_lazysnap(self, *commands: tuple[str, ...]) -> None:
        for cmd in (("serve",), ("health",), ("index",), *commands):
            if not lazysnap_has(*cmd):
                raise Skip(f"`lazysnap {' '.join(cmd)}` is not implemented yet")
        self._publish()

    def _publish(self) -> None:
        """Once per image: ``lazysnap index --push`` (the publisher's step, untimed)."""
        if self._published is not None:
            if not self._published:
                raise Skip("`lazysnap index --push` failed earlier")
            return
        self._published = ""
        hosts = write_hosts(self.workdir / "publisher-hosts", self.image.registry_host)
        refs = [self.image.target.ref] + ([self.image.previous.ref] if self.image.previous else [])
        for ref in refs:
            t = time.monotonic()
            try:
                summary = publish_index(ref, hosts, self.workdir / "publisher-root")
            except (NodeError, subprocess.SubprocessError) as exc:
                raise Skip(str(exc)) from None
            m = re.search(r"index_bytes=(\d+)", summary)
            w = re.search(r"windows_bytes=(\d+)", summary)
            size = f", {int(m.group(1)) / 1e6:.1f} MB of indexes" if m else ""
            size += f" (+ {int(w.group(1)) / 1e6:.1f} MB of windows apart, fetched where used)" if w else ""
            self.notes.append(f"Publisher step (untimed): `lazysnap index --push …/{ref.rsplit('/', 1)[-1]}`: "
                              f"{time.monotonic() - t:.1f} s{size}")
            log("published", ref=ref, seconds=f"{time.monotonic() - t:.1f}")
        self._published = "ok"

    # -- variants ------------------------------------------------------------------
    def overlayfs(self, i: int) -> Sample:
        with self._node("overlayfs", lazy=False) as node:
            return self._measure(node, lazy=False)

    def overlayfs_warm(self, i: int) -> Sample:
        if self.prev_ref is None:
            raise Skip("no previous image version")
        with self._node("overlayfs-warm", lazy=False) as node:
            node.pull(self.prev_ref, lazy=False)
            return self._measure(node, lazy=False)

    def floor(self, i: int) -> Sample:
        # One node for every floor run: the unpacked snapshot is the point, not the pull.
        if self._floor is None:
            self._floor = self._node("floor", lazy=False)
            self._floor.pull(self.ref, lazy=False)
        node = self._floor
        try:
            self._cold()
            run = node.run(self.ref, lazy=False, name=f"floor{i}")
            self._check(run.output)
        except BaseException:
            self._close_floor()
            raise
        if i == self.runs - 1:
            self._close_floor()
        return Sample(0.0, run.seconds, 0, 0)

    def _close_floor(self) -> None:
        if self._floor is not None:
            self._floor.close()
            self._floor = None

    def lazysnap(self, i: int) -> Sample:
        self._require_lazysnap()
        # no profile even when lazysnap-profile already pushed one to the registry
        with self._node("lazysnap", lazy=True, config=NO_PROFILE_CONFIG) as node:
            return self._measure(node, lazy=True)

    def lazysnap_profile(self, i: int) -> Sample:
        self._require_lazysnap(("record",), ("profile", "push"))
        if i == 0:
            with self._node("record", lazy=True) as node:
                node.pull(self.ref, lazy=True)
                node.record(self.ref)
                node.push_profile(self.ref)
        with self._node("lazysnap-profile", lazy=True) as node:
            return self._measure(node, lazy=True)

    def lazysnap_warm(self, i: int) -> Sample:
        self._require_lazysnap()
        if self.prev_ref is None:
            raise Skip("no previous image version")
        with self._node("lazysnap-warm", lazy=True) as node:
            node.pull(self.prev_ref, lazy=True)
            self._check(node.run(self.prev_ref, lazy=True, name=f"prev{self._seq}").output)
            self._settle()
            return self._measure(node, lazy=True)

    def lazysnap_unsigned(self, i: int) -> Sample:
        """No published index is trusted (nobody signed the image): the start waits for each
        layer it touches to be streamed and indexed; no profile."""
        self._require_lazysnap()
        with self._node("lazysnap-unsigned", lazy=True, config=UNSIGNED_CONFIG) as node:
            return self._measure(node, lazy=True, streams=True)

    def lazysnap_fleet(self, i: int) -> Sample:
        """Zero-touch fleet (issue 19): nobody ran ``lazysnap index`` or ``record``. Node A
        starts a copy of the image in a repository of its own (no index or profile there),
        streaming every layer; its daemon publishes each index it builds and the start it
        records. Node B, fresh, is measured: every streamed layer's index and A's profile
        must come from the registry, or the run fails."""
        self._require_lazysnap()
        ref = self._fleet_copy()
        window = max(15, int(self.image.target.compressed_size / 30e6))  # the start, with room
        config = FLEET_A_CONFIG.format(key=publisher_keys().private, window=window)
        with self._node("fleet-a", lazy=True, config=config) as a:
            first = self._measure(a, lazy=True, streams=True, ref=ref)
            assert a.daemon is not None
            built = a.daemon.index_sources().get("built", 0)
            self._wait_for(a, "event=profile_published", 1, timeout=window + 300)
            self._wait_for(a, "event=index_published ", built, timeout=300)
        with self._node("fleet-b", lazy=True) as b:
            sample = self._measure(b, lazy=True, ref=ref)
            assert b.daemon is not None
            sources, profiles = b.daemon.index_sources(), b.daemon.profile_lookups()
        if sources.get("referrer", 0) != built or sources.get("built", 0) or profiles.get("registry", 0) != 1:
            raise NodeError(f"node B did not start from what node A published: index sources {sources}, "
                            f"profile lookups {profiles} (A built {built})")
        self.notes.append(f"lazysnap-fleet run {i}: node A's first start {first.total:.2f} s "
                          f"({built} layers streamed and published, its start published as a profile); "
                          f"node B: indexes {sources}, profile from the registry")
        return sample

    def _fleet_copy(self) -> str:
        """The image copied (digests kept) to a repository no index or profile refers to, as
        the proxy serves it."""
        src = self.image.target.ref
        base, _, tag = src.rpartition(":")
        dst = f"{base}-fleet{self._seq}:{tag}"
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{src}", f"docker://{dst}"],
                       check=True, capture_output=True, timeout=1800)
        return dst.replace(self.image.registry_host, self.proxy.host, 1)

    @staticmethod
    def _wait_for(node: Node, event: str, count: int, timeout: float) -> None:
        """Until ``node``'s daemon log has ``count`` lines with ``event`` (what it publishes
        in the background after the start)."""
        assert node.daemon is not None
        deadline = time.monotonic() + timeout
        while node.daemon.log_path.read_text(errors="replace").count(event) < count:
            if time.monotonic() > deadline:
                raise NodeError(f"node A logged {event!r} fewer than {count} times in {timeout:.0f} s: "
                                f"{node.daemon.log_tail()}")
            time.sleep(0.5)

    def lazysnap_local(self, i: int) -> Sample:
        """The FUSE path alone: a second start on a lazysnap node that holds every chunk the
        start reads (page cache dropped), to set against ``floor`` (the same from ext4)."""
        self._require_lazysnap()
        with self._node("lazysnap-local", lazy=True, config=LOCAL_CONFIG) as node:
            node.pull(self.ref, lazy=True)
            self._check(node.run(self.ref, lazy=True, name=f"first{self._seq}").output)
            self._settle(quiet=2.0)
            self._cold()
            self.proxy.reset()
            assert node.daemon is not None
            before = node.daemon.fuse_requests()
            run = node.run(self.ref, lazy=True, name=f"again{self._seq}")
            self._check(run.output)
            after = node.daemon.fuse_requests()
            log("fuse_requests", variant="lazysnap-local",
                **{op: n - before.get(op, 0) for op, n in sorted(after.items()) if n - before.get(op, 0)})
            return Sample(0.0, run.seconds, 0, self.proxy.downstream_bytes)

    def run_rounds(self, variants: list[str]) -> list[Outcome]:
        """Run i of every variant, then run i + 1 of every variant: a slow minute on this
        shared machine lands on all variants alike, not on whichever was running then."""
        outcomes = {v: Outcome(v) for v in variants}
        try:
            for i in range(self.runs):
                for variant in variants:
                    if not outcomes[variant].skipped:
                        self._sample(variant, i, outcomes[variant])
        finally:
            self._close_floor()
        return list(outcomes.values())

    def _sample(self, variant: str, i: int, out: Outcome) -> None:
        fn: Callable[[int], Sample] = getattr(self, variant.replace("-", "_"))
        try:
            s = fn(i)
        except Skip as exc:
            out.skipped = str(exc)
            log("skip", variant=variant, reason=shlex.quote(str(exc)))
            return
        except (NodeError, subprocess.SubprocessError, RuntimeError) as exc:
            out.skipped = f"failed: {str(exc).splitlines()[0][:300]}"
            log("fail", variant=variant, run=i, error=shlex.quote(str(exc)[:500]))
            return
        out.samples.append(s)
        log("sample", variant=variant, run=i, pull=f"{s.pull:.2f}", run_s=f"{s.run:.2f}",
            total=f"{s.total:.2f}", mb=f"{s.total_bytes / 1e6:.1f}")


# ------------------------------------------------------------------ reporting


def machine_info() -> str:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    try:
        ctrd = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout.split()
        ctrd_v = ctrd[2] if len(ctrd) > 2 else "?"
    except OSError:
        ctrd_v = "?"
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**30:.1f} GiB RAM, kernel {platform.release()}, "
            f"containerd {ctrd_v}")


def table(outcomes: list[Outcome], image: BenchImage) -> str:
    base = next((o for o in outcomes if o.variant == "overlayfs" and o.samples), None)
    rows = ["| variant | pull s | run s | total s (median) | total min–max | vs overlayfs | "
            "registry MB before exit | of which on-demand / prefetch / background | start-up reads local | "
            "daemon peak RSS MB: start (node life) | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        if not o.samples:
            rows.append(f"| {o.variant} | — | — | — | — | — | — | — | — | — | skipped: {o.skipped} |")
            continue
        mid = o.median_sample()
        local = "—" if mid.local_share is None else f"{100 * mid.local_share:.0f} %"
        rss = "—"
        if mid.rss_mb:
            rss = f"{mid.rss_mb:.0f}" + (f" ({mid.node_rss_mb:.0f})" if mid.node_rss_mb > mid.rss_mb + 0.5 else "")
        purposes = "—"
        if any(s.fetched for s in o.samples):
            m = o.median_sample().fetched
            purposes = " / ".join(f"{m.get(k, 0) / 1e6:.1f}" for k in ("on_demand", "prefetch", "background"))
        lo, hi = o.span("total")
        speed = f"{base.median('total') / o.median('total'):.1f}×" if base else "—"
        mb = "—" if o.variant == "floor" else f"{o.median('total_bytes') / 1e6:.1f}"
        rows.append(f"| {o.variant} | {o.median('pull'):.2f} | {o.median('run'):.2f} | "
                    f"{o.median('total'):.2f} | {lo:.2f}–{hi:.2f} | {speed} | {mb} | {purposes} | {local} | {rss} | "
                    f"{len(o.samples)} |")
    return "\n".join(rows)


def chart(outcomes: list[Outcome], title: str, path: Path) -> Path | None:
    measured = [o for o in outcomes if o.samples]
    if not measured:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [o.variant for o in measured]
    mids = [o.median_sample() for o in measured]  # bars split one real run: pull + run = total
    pulls = [m.pull for m in mids]
    runs = [m.run for m in mids]
    totals = [m.total for m in mids]
    err = [[t - o.span("total")[0] for t, o in zip(totals, measured)],
           [o.span("total")[1] - t for t, o in zip(totals, measured)]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4.2), dpi=110)
    ax.bar(names, pulls, label="pull", color="#4c72b0")
    ax.bar(names, runs, bottom=pulls, label="run", color="#dd8452", yerr=err, capsize=4)
    top = max(o.span("total")[1] for o in measured)
    for x, (t, o) in enumerate(zip(totals, measured)):
        mb = "" if o.variant == "floor" else f"\n{o.median('total_bytes') / 1e6:.0f} MB"
        ax.text(x, o.span("total")[1] + top * 0.02, f"{t:.1f} s{mb}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds (median run; whisker = min–max)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, top * 1.3 + 0.5)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


RESULTS_HEADER = """# lazysnap benchmark results

## Cold start — `bench/coldstart.py`

Appended by `bench/coldstart.py` (one section per invocation; see `bench/README.md`).
Each run: fresh private containerd and lazysnap state, page cache dropped, registry
bytes counted on the loopback link between containerd/lazysnap and `docker-registry`.
"""


def append_results(path: Path, outcomes: list[Outcome], image: BenchImage, args: argparse.Namespace,
                   command: str, started: datetime, notes: list[str]) -> str:
    stamp = started.strftime("%Y%m%d-%H%M%S")
    png = chart(outcomes, f"{image.name}: cold start (pull + run), median of {args.runs}",
                path.parent / "charts" / f"coldstart-{image.name}-{stamp}.png")
    t = image.target
    lines = [
        f"### {started:%Y-%m-%d %H:%M} UTC — {image.name}, median of {args.runs} cold runs",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_info()}",
        f"- Link: loopback, {'shaped to ' + args.rate if args.rate else 'unshaped'}",
        f"- Image: {len(t.layer_digests)} layers ({', '.join(sorted(set(m.rsplit('.', 1)[-1] for m in t.layer_media_types)))}), "
        f"{t.compressed_size / 1e6:.1f} MB compressed"
        + (f", {image.uncompressed / 1e9:.2f} GB / {image.files:,} entries uncompressed" if image.uncompressed else "")
        + f"; manifest `{t.manifest_digest[:19]}…`",
        *(f"- {n}" for n in notes),
        "",
        table(outcomes, image),
        "",
    ]
    if png is not None:
        lines += [f"![chart](charts/{png.name})", ""]
    section = "\n".join(lines)
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with open(path, "a") as f:
        f.write("\n" + section)
    return section


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="inference", choices=sorted(PREPARE))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)} (or 'all')")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", default=None, help="shape the registry link, e.g. 1gbit, 100mbit")
    ap.add_argument("--size-gb", type=float, default=2.0, help="synthetic: total uncompressed size")
    ap.add_argument("--hot", type=float, default=0.05, help="synthetic: fraction of bytes read at start")
    ap.add_argument("--seed", type=int, default=1, help="synthetic: data seed")
    ap.add_argument("--layers", type=int, default=4, help="synthetic: layer count")
    ap.add_argument("--settle-s", type=float, default=30.0,
                    help="before each measured run, wait up to this long for the CPUs to be <25 %% busy")
    ap.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="print the table only")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default bench/out/…)")
    ap.add_argument("--lazysnap-config", type=Path, default=None,
                    help="TOML appended to every lazysnap node's config (e.g. a [lazy] table), to measure knobs")
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch dir: registry, every node's containerd/lazysnap state and logs")
    args = ap.parse_args(argv)
    args.variants = VARIANTS if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    try:
        args.rate_bps = parse_rate(args.rate)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("coldstart: needs root (containerd, mounts, drop_caches)", file=sys.stderr)
        return 1
    started = datetime.now(timezone.utc)
    command = "python -m bench.coldstart " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    workdir = args.workdir or BENCH / "out" / f"coldstart-{started:%Y%m%d-%H%M%S}"
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = workdir
    reg = start_registry(workdir / "registry")
    proxy: ByteProxy | None = None
    try:
        log("prepare", image=args.image)
        image = PREPARE[args.image](reg, args)
        proxy = ByteProxy(reg.host, rate=args.rate_bps)
        bench = Bench(image, proxy, workdir / "nodes", args.runs, keep=args.keep, settle_s=args.settle_s)
        if args.lazysnap_config is not None:
            bench.extra_config = args.lazysnap_config.read_text()
        outcomes = bench.run_rounds(args.variants)
        notes = bench.notes
    finally:
        if proxy is not None:
            proxy.stop()
        reg.stop()
    raw = workdir / "results.json"
    raw.write_text(json.dumps({"image": image.target.ref, "command": command,
                               "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    if args.no_results:
        print("\n".join([table(outcomes, image), *notes]))
    else:
        print(append_results(args.results, outcomes, image, args, command, started, notes))
    if not args.keep:
        shutil.rmtree(workdir / "nodes", ignore_errors=True)
        shutil.rmtree(workdir / "registry", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Options of the lazy layer provider (plain data, filled from the daemon config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.fs.mount import SessionOptions
from snapshotter.log import get_logger

log = get_logger("lazysnap.layers")

TRUST_MODES = ("signed", "pinned", "local-only")
# the old default trusted any referrer in the image's repository: whoever could push one
# could change what files serve; it now means "signed" (and says so at start)
LEGACY_TRUST = "same-repository"
STORE_POLICIES = ("lru", "drop-unreferenced")


@dataclass(slots=True)
class LazyOptions:
    """Knobs of the lazy path; defaults are what ``lazysnap serve`` uses.

    ``small_layer_bytes``: layers up to this compressed size are fetched whole at Prepare.
    Default 4 MiB: a few spans; the first misses in a layer that small fetch most of it
    anyway, so laziness would only add round trips.
    ``readahead_spans``: an on-demand miss also fetches the next checkpoint span at
    background priority (a package's files are adjacent in the tar). Off: measured on the
    inference image with no profile (bench/RESULTS.md, 2026-11-27), it saved no time
    (6.3 s with it, 6.5 s without, medians of 3) and cost 50 MB (212 against 163 MB). A
    miss itself fetches from the checkpoint before the chunk up to the index's end mark
    after it; a miss on a small file takes the rest of its span (``IndexCodec.span_mates``).
    ``span_size`` (layers indexed here): 1 MiB, measured on the inference image
    (python3 -c 'import torch', every layer lazy, no profile): 4 MiB spans 271 MB fetched,
    index 4.1 MB; 1 MiB spans 172 MB fetched, cold start ~20 % shorter, index 9.0 MB (1.8 %
    of the compressed image).
    ``index_trust``: which published index a node may serve from. An index decides which
    bytes each file serves, and anyone with push rights can add a referrer, so a published
    index is used only when vouched for: ``signed`` (default: a referrer of the image
    manifest whose artifact carries a cosign signature by one of ``trusted_keys``, PEM
    public keys; with no keys, no published index is used), ``pinned`` (index blobs whose
    digest is listed in ``pinned_indexes``: layer digest → index blob digest),
    ``local-only`` (never; build locally). Without a trusted index the layer is indexed
    by streaming it once, which serves only bytes decoded from the blob itself.
    ``publish_built_indexes``: push each index built that way as an artifact of the image
    (in the background), signed with ``publish_sign_key`` (a PEM private key, cosign's
    simple-signing format as ``lazysnap index --push --sign-key``) so that nodes trusting
    its public half use it; unsigned, nodes with the default ``signed`` trust ignore it.
    ``share_registry``: ``host[:port][/prefix]`` where this node publishes what it builds and
    records (indexes, start-up profiles) when it may not push to an image's own repository
    (the image's repository path under it, ``registry.reference.shared_in``), and where it
    looks for what others published there, after the image's own repository; the same
    trust rules apply (signed by a trusted key). Empty: the image's own repository only.
    ``keep_streamed_blobs``: when an index has to be built by streaming the layer, keep
    the blob on disk and serve reads from it instead of fetching ranges again.
    ``store_streamed_chunks``: that one pass also writes the chunks it cuts of files of at
    least ``store_streamed_min_file_bytes`` into one layer file of the store (in C, each at
    its offset in the tar as soon as its digest is known, within the room under
    ``store_limit_bytes``), and the C filesystem reads them from there, so those files are
    local when Prepare answers. Off until measured to shorten first starts across the
    bench's images (docs/design/first-start.md; chunk files, one per chunk, did not).
    ``fuse_threads``: C threads answering FUSE requests; a read of a chunk file that is not
    in the page cache waits for the disk on one of them, so a few let readahead overlap.
    ``fuse_holder``: the FUSE mount is owned by a separate process (``lazysnap
    fuse-holder``, started if none runs on the root) instead of the daemon, so running
    containers keep their layers when the daemon stops, crashes or is upgraded; reads that
    need a fetch wait for the next daemon; the holder can be restarted too, the daemon
    hands it the session (docs/design/restart.md). ``false`` keeps the session in the
    daemon: one process fewer, and running containers lose their lazy layers with it.
    ``fuse_holder_external``: the holder is run by a supervisor of its own (a systemd unit,
    a DaemonSet): the daemon waits for it and never starts one, which would live and die
    with the daemon's cgroup or pod.
    ``fuse_passthrough`` (docs/design/passthrough.md): a file of at least
    ``fuse_passthrough_min_bytes`` whose chunks are all local gets a backing file in
    ``<root>/files/`` (its bytes copied from the verified chunks and hashed again; the
    chunks then live in it, not twice), and from its next open the kernel reads it directly
    (FUSE passthrough, Linux >= 6.9), so model weights and shared objects read at the disk's
    speed after start-up. Backing files count against ``store_limit_bytes``. Needs
    ``--root`` on a filesystem that stacks on nothing (not overlayfs); otherwise one log
    line and reads are served as without it. With a holder started by a supervisor, give
    it ``--passthrough`` too.
    ``verify_complete_layers``: when every chunk of a lazily read layer is local, stream
    the blob once more in the background, check its digest and that it indexes to the
    same entries/chunks; a mismatch quarantines the index and fails reads loudly.
    """

    small_layer_bytes: int = 4 << 20
    store_limit_bytes: int | None = None
    store_policy: str = "lru"
    fsync: str = "none"
    fetch_deadline_s: float = 30.0
    max_concurrency: int = 8
    index_trust: str = "signed"
    pinned_indexes: dict[str, str] = field(default_factory=dict)
    trusted_keys: list[str] = field(default_factory=list)
    publish_built_indexes: bool = False
    publish_sign_key: str = ""
    share_registry: str = ""
    keep_streamed_blobs: bool = True
    store_streamed_chunks: bool = False
    store_streamed_min_file_bytes: int = 256 << 10
    verify_complete_layers: bool = True
    layer_parallel: int = 3
    span_size: int = 1 << 20
    chunk_size: int = 1 << 20
    max_index_bytes: int = 512 << 20
    read_ahead_kb: int = 1024
    readahead_spans: bool = False
    fuse_threads: int = 8
    fuse_holder: bool = True
    fuse_holder_external: bool = False
    fuse_passthrough: bool = True
    fuse_passthrough_min_bytes: int = 1 << 20

    def validate(self) -> LazyOptions:
        if self.index_trust == LEGACY_TRUST:
            log.warning("index_trust_changed", was=LEGACY_TRUST, now="signed",
                        note="any referrer in the repository could change what files serve; a published "
                             "index is now used only if signed by one of [lazy] trusted_keys (docs/trust.md)")
            self.index_trust = "signed"
        if self.index_trust not in TRUST_MODES:
            raise ValueError(f"index_trust must be one of {', '.join(TRUST_MODES)}, got {self.index_trust!r}")
        if not all(isinstance(k, str) for k in self.trusted_keys):
            raise ValueError("trusted_keys must be a list of PEM public key paths")
        from snapshotter.registry.signatures import load_public_keys

        load_public_keys(self.trusted_keys)  # a key that cannot be read fails the start, not each pull
        if self.publish_sign_key:
            from snapshotter.registry.signatures import load_private_key

            load_private_key(self.publish_sign_key)
        elif self.publish_built_indexes:
            log.warning("publish_unsigned", note="[lazy] publish_built_indexes without publish_sign_key: nodes "
                                                 "that require signed indexes (index_trust = \"signed\", the "
                                                 "default) will not use what this node publishes")
        if self.share_registry:
            from snapshotter.registry.reference import InvalidReferenceError, check_share_registry

            try:
                check_share_registry(self.share_registry)
            except InvalidReferenceError as exc:
                raise ValueError(str(exc)) from None
        if self.store_policy not in STORE_POLICIES:
            raise ValueError(f"store_policy must be one of {', '.join(STORE_POLICIES)}, got {self.store_policy!r}")
        if self.fsync not in ("none", "file", "full"):
            raise ValueError(f"fsync must be none|file|full, got {self.fsync!r}")
        if not 1 <= self.fuse_threads <= 16:
            raise ValueError(f"fuse_threads must be 1..16, got {self.fuse_threads}")
        if self.fuse_passthrough_min_bytes < 1:
            raise ValueError(f"fuse_passthrough_min_bytes must be positive, got {self.fuse_passthrough_min_bytes}")
        if self.fetch_deadline_s <= 0 or self.max_concurrency < 1:
            raise ValueError("fetch_deadline_s must be > 0 and max_concurrency >= 1")
        return self

    def fuse_session(self) -> SessionOptions:
        """How the FUSE session is made, here or in the holder serve starts."""
        return SessionOptions(self.fuse_threads, self.read_ahead_kb, self.fuse_passthrough)

"""The benchmark runner and the synthetic image generator, on small real inputs."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path

import pytest

from bench.synthetic import SyntheticSpec, SynFile, _Content, plan_files, plan_hot

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _bytes(spec: SyntheticSpec, f: SynFile, pool: memoryview) -> bytes:
    return io.BufferedReader(_Content(pool, spec, f), 1 << 20).read()


def test_synthetic_plan_is_deterministic_and_sized() -> None:
    spec = SyntheticSpec(size_gb=0.05, hot=0.1, seed=3, layers=3)
    files = plan_files(spec)
    assert files == plan_files(spec)
    assert sum(f.size for f in files) == 50_000_000
    assert {f.layer for f in files} == {0, 1, 2}
    hot = plan_hot(spec, files)
    hot_bytes = sum(n for _, _, n in hot)
    assert 0.1 * 50e6 <= hot_bytes < 0.1 * 50e6 + (16 << 20)
    assert plan_files(SyntheticSpec(size_gb=0.05, seed=4)) != files


def test_synthetic_content_mixed_and_versioned() -> None:
    import random
    spec = SyntheticSpec(size_gb=0.02, seed=5)
    pool = memoryview(random.Random(5).randbytes(64 << 20))
    files = plan_files(spec)
    big = max(files, key=lambda f: f.size)
    data = _bytes(spec, big, pool)
    assert len(data) == big.size and data == _bytes(spec, big, pool)
    ratio = len(gzip.compress(data, 6)) / len(data)
    assert 0.55 < ratio < 0.95  # half random, half text-like
    prev = spec.previous()
    digests = [(hashlib.sha256(_bytes(spec, f, pool)).digest(), hashlib.sha256(_bytes(prev, f, pool)).digest())
               for f in files]
    changed = sum(a != b for a, b in digests) / len(files)
    assert 0.03 < changed < 0.2


@pytest.mark.parametrize("kw", [{"size_gb": 0}, {"hot": 1.5}, {"layers": 0}])
def test_synthetic_spec_rejects_bad_values(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SyntheticSpec(**kw)  # type: ignore[arg-type]


@ROOT
@pytest.mark.root
def test_coldstart_demo_image_writes_results(tmp_path: Path) -> None:
    from bench.coldstart import main
    results = tmp_path / "RESULTS.md"
    rc = main(["--image", "demo", "--variants", "overlayfs,floor", "--runs", "2", "--settle-s", "3",
               "--results", str(results), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    text = results.read_text()
    assert text.startswith("# lazysnap benchmark results\n\n## Cold start")
    assert "\n### " in text  # one section per invocation, under the cold-start heading
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    overlay = rows["overlayfs"].split("|")
    assert overlay[6].strip() == "1.0×"
    assert float(overlay[7]) > 20.0  # the demo image is ~22 MB and was pulled in full
    assert overlay[-2].strip() == "2"
    assert rows["floor"].split("|")[7].strip() == "—"
    charts = list((tmp_path / "charts").glob("coldstart-demo-*.png"))
    assert len(charts) == 1 and charts[0].read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "work" / "nodes").exists()  # nodes cleaned up


@ROOT
@pytest.mark.root
def test_coldstart_fleet_node_b_starts_from_what_node_a_published(tmp_path: Path) -> None:
    """lazysnap-fleet through containerd: node A starts an image nobody indexed with the
    daemon publishing its built indexes and its recorded start; node B (fresh) must get
    every streamed layer's index and the profile from the registry, or the run fails."""
    from bench.coldstart import main
    results = tmp_path / "RESULTS.md"
    rc = main(["--image", "demo", "--variants", "lazysnap-fleet", "--runs", "1", "--settle-s", "1",
               "--results", str(results), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    text = results.read_text()
    note = next(line for line in text.splitlines() if line.startswith("- lazysnap-fleet run 0: node A"))
    assert "'referrer': 1" in note and "profile from the registry" in note
    assert "| lazysnap-fleet |" in text


def test_fetch_floor_replays_reads_against_an_index(tmp_path: Path) -> None:
    """bench.fetch_floor: reading every chunk needs (about) the whole blob, one chunk much
    less, and denser checkpoints never need more data."""
    import random
    import tarfile

    from bench.fetch_floor import GRID, layer_floor, merged_length
    from snapshotter.index.builder import index_file
    from snapshotter.index.format import IndexFile, write_index

    assert merged_length([(5, 9), (0, 3), (2, 4), (9, 10)]) == 9
    buf = io.BytesIO()
    rng = random.Random(3)
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(40):
            data = rng.randbytes(30_000) + bytes(30_000)
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    blob = tmp_path / "l.gz"
    blob.write_bytes(gzip.compress(buf.getvalue()))
    write_index(tmp_path / "l.idx", index_file(str(blob), span=64 << 10, chunk_size=16 << 10))
    with IndexFile.open(tmp_path / "l.idx") as idx:
        size = idx.info.compressed_size
        every, grids = layer_floor(idx, list(range(idx.chunk_count)))
        assert 0.9 * size <= every <= size
        one, one_grids = layer_floor(idx, [idx.chunk_count // 2])
        assert 0 < one < size / 5
        data = [one_grids[g][0] for g in sorted(GRID)]
        assert data == sorted(data) and all(used == 1 for _, used in one_grids.values())


def test_coldstart_merges_the_extra_config_into_the_variants_tables() -> None:
    """--lazysnap-config may set keys of a table a variant writes too ([lazy] of
    lazysnap-unsigned): one table, the extra keys winning, and TOML that parses."""
    import tomllib

    from bench.coldstart import UNSIGNED_CONFIG, merge_toml

    merged = tomllib.loads(merge_toml(UNSIGNED_CONFIG, '[lazy]\nfuse_passthrough = false\nindex_trust = "signed"\n'
                                                      '[fetch]\nhosts = ["a", "b"]\n'))
    assert merged["lazy"] == {"index_trust": "signed", "fuse_passthrough": False}
    assert merged["prefetch"]["prefetch"] is False and merged["fetch"]["hosts"] == ["a", "b"]

"""Profile model: merge (union, median order), JSON round trip, limits and rejection."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.prefetch import profile as P
from snapshotter.prefetch.profile import ChunkAccess, LayerProfile, Profile, ProfileError


def _digest(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


MANIFEST = _digest("manifest")
OTHER = _digest("other manifest")


@st.composite
def layer_profiles(draw: st.DrawFn, digest: str) -> LayerProfile:
    count = draw(st.integers(1, 200))
    ids = draw(st.lists(st.integers(0, count - 1), unique=True, max_size=40))
    paths = draw(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5))
    acc = [ChunkAccess(c, draw(st.integers(0, 1 << 20)), draw(st.sampled_from(paths)),
                       draw(st.integers(0, 1 << 40)), draw(st.integers(0, 1 << 20)),
                       draw(st.lists(st.integers(0, 10**9), min_size=1, max_size=3)))
           for c in ids]
    acc.sort(key=lambda a: (a.first_us, a.chunk))
    return LayerProfile(digest, count, acc)


@st.composite
def profiles(draw: st.DrawFn) -> Profile:
    n = draw(st.integers(0, 3))
    layers = [draw(layer_profiles(_digest(f"layer{i}"))) for i in range(n)]
    return Profile(MANIFEST, layers, draw(st.integers(1, 5)))


@settings(max_examples=150, deadline=None)
@given(profiles())
def test_json_round_trip(p: Profile) -> None:
    q = P.loads(P.dumps(p), expect_manifest=MANIFEST)
    assert q == p
    assert P.dumps(q) == P.dumps(p)


@settings(max_examples=150, deadline=None)
@given(profiles(), profiles())
def test_merge_is_union_ordered_by_median(a: Profile, b: Profile) -> None:
    m = P.merge(a, b)
    assert m.recordings == a.recordings + b.recordings
    assert {lp.digest for lp in m.layers} == {lp.digest for lp in a.layers} | {lp.digest for lp in b.layers}
    for lm in m.layers:
        la, lb = a.layer(lm.digest), b.layer(lm.digest)
        if la is not None and lb is not None and la.chunk_count == lb.chunk_count:
            assert set(lm.ordered_chunks()) == set(la.ordered_chunks()) | set(lb.ordered_chunks())
            for x in lm.accesses:  # every sample of both recordings is kept (up to the cap)
                ta = next((y.times_us for y in la.accesses if y.chunk == x.chunk), [])
                tb = next((y.times_us for y in lb.accesses if y.chunk == x.chunk), [])
                assert x.times_us == (ta + tb)[-P.MAX_SAMPLES:]
        else:  # different index: the newer recording's layer wins
            assert lm == (lb if lb is not None else la)
        firsts = [x.first_us for x in lm.accesses]
        assert firsts == sorted(firsts)
        assert lm.bytes == sum(x.size for x in lm.accesses)
    # the merged profile still serializes and parses to itself
    assert P.loads(P.dumps(m)) == m


def test_median_order_example() -> None:
    d = _digest("l")
    a = Profile(MANIFEST, [LayerProfile(d, 10, [ChunkAccess(1, 5, "a", 0, 5, [100]),
                                                 ChunkAccess(2, 5, "b", 0, 5, [200])])])
    b = Profile(MANIFEST, [LayerProfile(d, 10, [ChunkAccess(2, 5, "b", 0, 5, [50]),
                                                 ChunkAccess(1, 5, "a", 0, 5, [300]),
                                                 ChunkAccess(7, 9, "c", 0, 9, [10])])])
    c = Profile(MANIFEST, [LayerProfile(d, 10, [ChunkAccess(2, 5, "b", 0, 5, [60]),
                                                 ChunkAccess(1, 5, "a", 0, 5, [400])])])
    m = P.merge(P.merge(a, b), c)
    lp = m.layers[0]
    # medians: chunk 7 → 10, chunk 2 → median(200, 50, 60) = 60, chunk 1 → median(100, 300, 400) = 300
    assert lp.ordered_chunks() == [7, 2, 1]
    assert lp.bytes == 19 and m.recordings == 3 and lp.files == 3


def test_merge_refuses_other_image() -> None:
    with pytest.raises(ProfileError, match="cannot merge"):
        P.merge(Profile(MANIFEST), Profile(OTHER))


def _good() -> bytes:
    d = _digest("l")
    return P.dumps(Profile(MANIFEST, [LayerProfile(d, 4, [ChunkAccess(3, 10, "usr/bin/x", 0, 10, [5])])]))


def _mutate(fn) -> bytes:  # noqa: ANN001
    doc = json.loads(_good())
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("data, message", [
    (b"\x00\xffgarbage", "not JSON"),
    (b"[]", "not a lazysnap.profile.v1"),
    (_good()[:-7], "not JSON"),
    (_mutate(lambda d: d.update(manifest="sha256:xyz")), "bad manifest digest"),
    (_mutate(lambda d: d["layers"][0]["chunks"][0].__setitem__(0, 4)), "chunk id"),
    (_mutate(lambda d: d["layers"][0]["chunks"][0].__setitem__(0, -1)), "chunk id"),
    (_mutate(lambda d: d["layers"][0]["chunks"][0].__setitem__(2, 1)), "file index"),
    (_mutate(lambda d: d["layers"][0]["chunks"][0].__setitem__(5, [])), "access times"),
    (_mutate(lambda d: d["layers"][0]["chunks"].append(d["layers"][0]["chunks"][0])), "repeated"),
    (_mutate(lambda d: d["layers"].append(d["layers"][0])), "repeated layer"),
    (_mutate(lambda d: d["layers"][0].update(files="x")), "must be lists"),
    (_mutate(lambda d: d.update(recordings=0)), "recordings"),
    (_mutate(lambda d: d["layers"][0]["chunks"][0].__setitem__(3, "0")), "offset"),
])
def test_corrupt_profiles_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        P.loads(data)


def test_other_manifest_rejected() -> None:
    with pytest.raises(ProfileError, match="is for manifest"):
        P.loads(_good(), expect_manifest=OTHER)


def test_oversized_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_PROFILE_BYTES", 64)
    with pytest.raises(ProfileError, match="over the 64-byte limit"):
        P.loads(_good())
    path = P.profile_path(tmp_path, MANIFEST)
    path.parent.mkdir(parents=True)
    path.write_bytes(b" " * 65)
    with pytest.raises(ProfileError, match="over the 64-byte limit"):
        P.load(tmp_path, MANIFEST)
    with pytest.raises(ProfileError, match="over the 64-byte limit"):
        P.dumps(P.loads.__globals__["Profile"](MANIFEST, [LayerProfile(_digest("l"), 9, [
            ChunkAccess(i, 1, "f" * 20, 0, 1, [i]) for i in range(9)])]))


def test_too_many_chunks_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_CHUNKS", 0)
    with pytest.raises(ProfileError, match="more than"):
        P.loads(_good())


def test_save_load_atomic(tmp_path: Path) -> None:
    p = P.loads(_good())
    path = P.save(tmp_path, p)
    assert path == tmp_path / "profiles" / f"{MANIFEST.replace(':', '-')}.json"
    assert P.load(tmp_path, MANIFEST) == p
    assert P.load(tmp_path, OTHER) is None
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temp file left behind

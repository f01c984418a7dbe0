"""Hamming index and bulk near-duplicate grouping agree with brute force (lora/data/dedup.py)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from lora.data.dedup import HammingIndex, group_near_duplicates, hamming, naive_group


def planted_hashes(n: int, seed: int, frac: float = 0.02) -> np.ndarray:
    """Random 64-bit hashes with near-duplicates at distance 1..4, chains and exact copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    k = int(n * frac)
    src = rng.integers(0, n, size=k)
    dst = rng.integers(0, n, size=k)
    for s, d in zip(src, dst):
        bits = rng.choice(64, size=int(rng.integers(1, 6)), replace=False)  # 1..5 (5 = not dup)
        v = h[s]
        for b in bits:
            v ^= np.uint64(1) << np.uint64(int(b))
        h[d] = v
    h[n // 2 : n // 2 + 50] = h[7]  # a heavy bucket of identical hashes
    return h


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0b1011, 0b0001) == 2


def test_index_query_matches_brute_force():
    rng = np.random.default_rng(3)
    stored = planted_hashes(20_000, seed=4)
    index: HammingIndex[int] = HammingIndex(radius=4)
    index.add_many(stored.tolist(), range(stored.size))
    assert len(index) == stored.size
    probes = np.concatenate([rng.integers(0, 2**64, 100, dtype=np.uint64), stored[:300] ^ np.uint64(0b101)])
    for probe in probes.tolist():
        dist = np.bitwise_count(stored ^ np.uint64(probe))
        for radius in (0, 2, 4, 6):  # 6 > index radius: linear-scan fallback
            expected = sorted((int(dist[i]), int(i)) for i in np.flatnonzero(dist <= radius))
            assert index.query(probe, radius) == [(i, d) for d, i in expected]
    near = index.nearest(int(stored[11]) ^ 1)
    assert near is not None and near[1] <= 1


def test_index_accepts_hex_and_negative_int64_and_keeps_every_key():
    index: HammingIndex[str] = HammingIndex(radius=4)
    index.add("ffffffffffffffff", "a")
    index.add(-1, "b")  # the int64 view of the same hash
    index.add(np.uint64(0), "c")
    assert index.query("fffffffffffffffe") == [("a", 1), ("b", 1)]
    assert index.nearest(3) == ("c", 2)
    assert index.nearest(0xFF) is None
    with pytest.raises(ValueError):
        HammingIndex(radius=-1)


def test_index_is_fast_against_a_large_data_set():
    stored = np.random.default_rng(5).integers(0, 2**64, size=100_000, dtype=np.uint64)
    index: HammingIndex[int] = HammingIndex(radius=4)
    index.add_many(stored.tolist(), range(stored.size))
    probes = (stored[:1000] ^ np.uint64(0b11)).tolist()
    start = time.perf_counter()
    hits = [index.nearest(p) for p in probes]
    elapsed = time.perf_counter() - start
    assert [h[0] for h in hits] == list(range(1000))
    assert elapsed < 2.0  # ~40 us per query here; brute force would be ~1 ms


def test_grouping_equals_naive_on_random_plus_planted():
    hashes = planted_hashes(5_000, seed=6)
    fast = group_near_duplicates(hashes, radius=4)
    slow = naive_group(hashes, radius=4)
    np.testing.assert_array_equal(fast, slow)
    grouped = fast != np.arange(hashes.size)
    assert grouped.sum() > 50  # the planted near-duplicates were found
    # representative is the first occurrence: a label never points forward, and points to itself
    assert (fast <= np.arange(hashes.size)).all()
    assert (fast[fast] == fast).all()
    for i in np.flatnonzero(grouped)[:200]:
        assert fast[i] < i


@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_grouping_other_radii(radius):
    hashes = planted_hashes(3_000, seed=10 + radius)
    np.testing.assert_array_equal(group_near_duplicates(hashes, radius), naive_group(hashes, radius))


def test_grouping_small_inputs_and_dtypes():
    assert group_near_duplicates(np.array([], dtype=np.uint64)).size == 0
    h = np.array([0b1111, 0b0111, 2**63, 0b0111], dtype=np.uint64)
    np.testing.assert_array_equal(group_near_duplicates(h, 1), [0, 0, 2, 0])
    np.testing.assert_array_equal(group_near_duplicates(h.view(np.int64), 1), [0, 0, 2, 0])
    np.testing.assert_array_equal(group_near_duplicates(["000000000000000f", "0000000000000007"], 1), [0, 0])


def test_grouping_is_transitive_through_chains():
    a = 0
    b = a ^ 0b1111  # 4 from a
    c = b ^ (0b1111 << 8)  # 4 from b, 8 from a
    far = 2**64 - 1
    padding = np.random.default_rng(9).integers(2**32, 2**64 - 2**32, size=5000, dtype=np.uint64)
    labels = group_near_duplicates(np.concatenate([np.array([c, far, a, b], np.uint64), padding]))
    assert labels[:4].tolist() == [0, 1, 0, 0]  # fast path (over 2048 distinct hashes)


def test_grouping_a_million_hashes_is_fast():
    hashes = np.random.default_rng(8).integers(0, 2**64, size=1_000_000, dtype=np.uint64)
    hashes[500_000:510_000] = hashes[:10_000] ^ np.uint64(0b1001)
    start = time.perf_counter()
    labels = group_near_duplicates(hashes, 4)
    elapsed = time.perf_counter() - start
    assert (labels[500_000:510_000] == np.arange(10_000)).all()
    assert elapsed < 10.0


def _clustered_hashes(n: int, seed: int) -> np.ndarray:
    """Random hashes plus clusters that share whole blocks (long runs of equal pair keys in the
    tables) with members at distance 1..6 of a centre, chains of near copies and exact copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for c in range(8):
        centre = h[c]
        size = 150
        # the top 22 bits (blocks 0 and 1 at radius 4) stay, a few low bits flip
        flips = rng.integers(1, 7, size=size)
        members = np.full(size, centre, dtype=np.uint64)
        for k in range(size):
            for bit in rng.choice(42, size=int(flips[k]), replace=False):
                members[k] ^= np.uint64(1) << np.uint64(int(bit))
        start = 100 + c * size
        h[start : start + size] = members
    h[-30:] = h[200]  # exact copies
    return h


@pytest.mark.parametrize("radius", [3, 4, 5])
def test_grouping_equals_brute_force_with_clusters_and_small_buckets(monkeypatch, radius):
    import lora.data.dedup as dedup

    hashes = _clustered_hashes(4_000, seed=radius)
    expected = naive_group(hashes, radius)
    monkeypatch.setattr(dedup, "_BUCKET", 64)  # 4,000 hashes: tables re-sort 32 buckets each
    for threads in (1, 2):
        monkeypatch.setattr(dedup, "_THREADS", threads)
        np.testing.assert_array_equal(group_near_duplicates(hashes, radius), expected)
    assert (expected != np.arange(hashes.size)).sum() > 300

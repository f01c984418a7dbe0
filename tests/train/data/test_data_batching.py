"""The seeded batch order on its own: which images each optimizer step sees."""
from __future__ import annotations

from lora.train.data.batching import epoch_batches, epoch_steps, split_micro_batches, steps_per_epoch

BUCKETS = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)] * 1


def test_an_epochs_order_is_a_pure_function_of_seed_and_epoch():
    first = epoch_batches(BUCKETS, 2, seed=42, epoch=3)
    assert first == epoch_batches(BUCKETS, 2, seed=42, epoch=3)  # resumable: recomputed, not stored
    assert first != epoch_batches(BUCKETS, 2, seed=42, epoch=4)
    assert first != epoch_batches(BUCKETS, 2, seed=7, epoch=3)
    assert sorted(i for b in first for i in b) == list(range(len(BUCKETS)))  # every image once
    assert all(len({BUCKETS[i] for i in batch}) == 1 for batch in first)  # a batch never mixes buckets


def test_steps_accumulate_batches_and_their_count_is_known_in_advance():
    steps = epoch_steps(BUCKETS, 2, accumulation=2, seed=1, epoch=1)
    # 5 images -> 3 batches, 3 -> 2, 1 -> 1: 6 batches, 3 steps of 2
    assert [len(s) for s in steps] == [2, 2, 2]
    assert steps_per_epoch(BUCKETS, 2, 2) == len(steps) == 3
    assert steps_per_epoch(BUCKETS, 4, 1) == 2 + 1 + 1


def test_the_out_of_memory_split_cuts_every_micro_batch_and_keeps_the_images():
    step = [[0, 1, 2, 3], [4, 5, 6]]
    assert split_micro_batches(step, 1) == step
    assert split_micro_batches(step, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_micro_batches(step, 4) == [[0], [1], [2], [3], [4], [5], [6]]

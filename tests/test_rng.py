"""The one keying rule for random streams (sim.rng), numpy and torch alike."""

import numpy as np
import pytest
import torch

from sim.rng import stream_rng, stream_seed


def test_integer_streams_are_numpys_own_seed_lists():
    # the datasets, partitions and selections drew from default_rng([seed, stream]) before the
    # rule was shared: the same streams keep every committed number
    for parts in [(0, 0x401D), (3, 7, 1), (12345, 0xE7A1)]:
        assert np.array_equal(stream_rng(*parts).random(5), np.random.default_rng(list(parts)).random(5))


def test_numpy_and_torch_seeds_share_one_sequence():
    parts = (4, 2, "lora")
    seq = np.random.SeedSequence([4, 2, int.from_bytes(__import__("hashlib").sha256(b"lora").digest()[:4], "little")])
    assert stream_seed(*parts) == int(seq.generate_state(1, np.uint64)[0]) >> 1
    assert np.array_equal(stream_rng(*parts).random(3), np.random.default_rng(seq).random(3))
    assert 0 <= stream_seed(*parts) < 2**63
    torch.Generator().manual_seed(stream_seed(*parts))  # a valid torch seed


def test_every_part_and_its_order_name_a_different_stream():
    seeds = {stream_seed(*p) for p in [(0, 1, 2), (0, 2, 1), (1, 1, 2), (0, 1, 2, "a"), (0, 1, 2, "b"), (0, 1, "2")]}
    assert len(seeds) == 6
    assert stream_seed(5, "x") == stream_seed(5, "x")


@pytest.mark.parametrize("bad", [(), (1.5,), (0, None), (0, True)])
def test_bad_parts_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        stream_seed(*bad)

import warnings

import numpy as np
import pytest

from sampler import PKSampler


def test_batch_composition_property_over_random_configurations():
    rng = np.random.default_rng(0)
    for trial in range(100):
        num_labels = int(rng.integers(1, 7))
        counts = rng.integers(1, 30, size=num_labels)
        labels = np.repeat(np.arange(num_labels) * 7 + 3, counts)  # label values need not be 0..L-1
        rng.shuffle(labels)
        p, k = int(rng.integers(1, num_labels + 1)), int(rng.integers(1, 9))
        world_size = int(rng.integers(1, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = PKSampler(labels, p, k, seed=trial, rank=int(rng.integers(world_size)),
                                world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler) == int(np.ceil(len(labels) / (p * k * world_size)))
        for batch in batches:
            assert len(batch) == p * k
            batch_labels = labels[batch]
            values, per_label = np.unique(batch_labels, return_counts=True)
            assert len(values) == p and (per_label == k).all()
            for value in values:  # without replacement where the label has K images
                chosen = [i for i in batch if labels[i] == value]
                if (labels == value).sum() >= k:
                    assert len(set(chosen)) == k


def test_p_equal_to_number_of_labels_yields_batches():
    labels = [0] * 20 + [1] * 20 + [2] * 20
    batches = list(PKSampler(labels, p=3, k=4))
    assert len(batches) == 5 and all(sorted(set(np.array(labels)[b])) == [0, 1, 2] for b in batches)


def test_small_labels_sampled_with_replacement_and_warned_once():
    labels = [0] * 10 + [1] * 2
    with pytest.warns(UserWarning, match="with replacement: 1") as record:
        sampler = PKSampler(labels, p=2, k=4)
    assert len(record) == 1
    for batch in sampler:
        assert sum(labels[i] == 1 for i in batch) == 4


def test_too_many_labels_per_batch_is_an_error():
    with pytest.raises(ValueError, match="only 2 labels"):
        PKSampler([0, 0, 1, 1], p=3, k=2)


def test_deterministic_per_seed_and_epoch_and_different_per_rank():
    labels = np.repeat(np.arange(4), 25)
    def draw(seed=0, epoch=0, rank=0):
        sampler = PKSampler(labels, 2, 5, seed=seed, rank=rank, world_size=2)
        sampler.set_epoch(epoch)
        return list(sampler)
    assert draw() == draw()
    assert draw() != draw(seed=1)
    assert draw() != draw(epoch=1)
    assert draw(rank=0) != draw(rank=1)


def test_explicit_epoch_length():
    assert len(list(PKSampler(np.repeat(np.arange(3), 10), 3, 2, batches_per_epoch=7))) == 7

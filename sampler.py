"""PK batch sampler: every batch holds P distinct labels x K images of each.

    sampler = PKSampler(labels, p=3, k=16, seed=0)             # single process
    sampler = PKSampler(labels, p=3, k=16, rank=r, world_size=w)  # one per DDP rank
    loader = DataLoader(dataset, batch_sampler=sampler, ...)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ...

Epoch length: by default `ceil(num_images / (P * K * world_size))` batches per rank, i.e. about
one pass over the training images across all ranks; `batches_per_epoch` overrides it. Labels are
drawn uniformly (P distinct ones per batch), images within a label without replacement; a label
with fewer than K images is drawn with replacement (with one warning). Unlike the torchvision
reference sampler, P may equal the number of labels (COVIDx has 3 and the paper uses P = 3).
Batches are a pure function of (seed, epoch, rank): deterministic, and different on each rank.

Multi-label lists: labels may be a (N, F) 0/1 table of findings; a batch then holds P findings x
K films carrying each (a film with two findings may come twice, once for each).
"""
import math
import warnings

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler):
    def __init__(self, labels, p, k, batches_per_epoch=None, seed=0, rank=0, world_size=1,
                 label_names=None):
        """label_names[i]: the name of label id i, used in messages (default: the ids)."""
        labels = np.asarray(labels)
        if p < 1 or k < 1:
            raise ValueError(f"P (--labels-per-batch) and K (--samples-per-label) must be >= 1, got P={p}, K={k}")
        if labels.ndim == 2:  # findings: the films carrying each (findings no film carries are left out)
            self.label_values = np.flatnonzero(labels.any(0))
            pools = [np.flatnonzero(labels[:, f]) for f in self.label_values]
        else:
            self.label_values, inverse = np.unique(labels, return_inverse=True)
            pools = [np.flatnonzero(inverse == i) for i in range(len(self.label_values))]
        names = [str(label_names[v]) if label_names is not None else str(v) for v in self.label_values]
        if p > len(self.label_values):
            raise ValueError(
                f"P (--labels-per-batch) = {p} but the training set has only "
                f"{len(self.label_values)} labels ({', '.join(names)}); "
                f"use -p {len(self.label_values)} or fewer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.indices_per_label = pools
        small = [f"{names[i]} ({len(idx)})" for i, idx in enumerate(self.indices_per_label) if len(idx) < k]
        if small:
            warnings.warn(f"labels with fewer than K={k} images (count) are sampled with replacement: "
                          f"{', '.join(small)}", stacklevel=2)
        self.p, self.k = p, k
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.batches_per_epoch = batches_per_epoch or math.ceil(len(labels) / (p * k * world_size))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.batches_per_epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        for _ in range(self.batches_per_epoch):
            batch = []
            for label in rng.choice(len(self.indices_per_label), size=self.p, replace=False):
                pool = self.indices_per_label[label]
                batch.extend(rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist())
            yield batch

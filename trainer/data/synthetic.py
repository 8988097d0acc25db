"""Deterministic random images for tests and benchmarks: same (seed, rank, step) -> same batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .base import Batch, InputSpec


class SyntheticStream:
    """Endless batches of N(0, 1) images; batch ``i`` of rank ``r`` depends only on (seed, r, i)."""

    def __init__(self, spec: InputSpec, batch_size: int, *, rank: int = 0, seed: int = 0) -> None:
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.next_batch = 0

    def batch_at(self, index: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + index)
        size = self.spec.image_size
        images = torch.randn(self.batch_size, 3, size, size, generator=g)
        keys = [f"r{self.rank}-b{index}-{j}" for j in range(self.batch_size)]
        return Batch(images, ["synthetic"] * self.batch_size, keys)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batch_at(self.next_batch)
            self.next_batch += 1
            yield batch

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])

    def counters(self) -> dict[str, int]:
        return {"samples_skipped": 0}

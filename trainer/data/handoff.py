"""Batches from DataLoader workers to the training process through shared-memory slots that are reused.

A tensor returned by a DataLoader worker travels in a new shared-memory segment every batch: the
worker faults in and zeroes every page of it, then the consumer maps it. At 224 px that costs a
worker about 7 % of its time (``bench/data.py``). Here each worker owns a few preallocated batch
buffers: it fills the next slot once the consumer has copied the previous occupant out, and a
counting semaphore per worker orders the two. A worker that finds no free slot within ``WAIT_S``
hands over a private tensor as usual, so nothing ever waits for a consumer that stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

WORKER_START = "fork"
"""How DataLoader workers start. ``fork`` has a cost at full size: a worker forked from a rank that already
holds its model shares those pages copy-on-write, and every page the rank then rewrites (parameters, optimizer
states) stays behind in the worker as a private copy (ViT-g-14 FSDP2, 2 gloo ranks: 2.4 GiB RssAnon per worker,
1.0 GiB of it private after 3 steps). ``spawn`` measured 0.29 GiB per worker but starts a fresh interpreter for
every epoch's workers (a new DataLoader per epoch), which made short-epoch runs several times slower
(tests/dist/test_graceful_stop.py timed out); ``forkserver`` workers outlive a rank killed with SIGKILL. The fix
needs workers that persist across epochs; until then ``fork``."""
WAIT_S = 1.0
SHM_SHARE = 0.5  # at most this part of the free shared memory goes to the buffers
SHM_DIR = "/dev/shm"


class SlotRing:
    """``slots`` reusable [batch, H, W, 3] uint8 buffers per worker, in shared memory."""

    def __init__(self, workers: int, slots: int, batch_size: int, image_shape: tuple[int, int, int]) -> None:
        self.slots = slots
        self.pixels = torch.empty((workers, slots, batch_size, *image_shape), dtype=torch.uint8)
        self.pixels.share_memory_()
        self.free: list = []
        self._next = [0] * workers  # used in the worker processes, each on its own row
        self.new_epoch()

    @classmethod
    def create(cls, workers: int, slots: int, batch_size: int, image_shape: tuple[int, int, int]
               ) -> SlotRing | None:
        """The ring, or None (with a warning) where shared memory is too small to hold it safely."""
        need = workers * slots * batch_size * int(np.prod(image_shape))
        try:
            stat = os.statvfs(SHM_DIR)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = None
        if free is not None and need > SHM_SHARE * free:
            log.warning("data: %s has %.0f MiB free; batch buffers would take %.0f MiB, so batches are "
                        "handed over one segment each", SHM_DIR, free / 2**20, need / 2**20)
            return None
        return cls(workers, slots, batch_size, image_shape)

    def new_epoch(self) -> None:
        """Every slot free again (an abandoned epoch may have left some taken); new workers start at 0."""
        context = multiprocessing.get_context(WORKER_START)
        self.free = [context.Semaphore(self.slots) for _ in range(len(self._next))]
        self._next = [0] * len(self._next)

    def put(self, row: int, images: list[np.ndarray]) -> int:
        """In a worker: write the [H, W, 3] images into ``row``'s next slot; -1 if none frees up in time."""
        if not self.free[row].acquire(timeout=WAIT_S):
            return -1
        slot = self._next[row]
        self._next[row] = (slot + 1) % self.slots
        np.stack(images, out=self.pixels[row, slot, : len(images)].numpy())
        return slot

    def take(self, row: int, slot: int, count: int) -> torch.Tensor:
        """In the consumer: a private copy of a filled slot as [count, 3, H, W] (channels-last); frees it."""
        images = self.pixels[row, slot, :count].clone()
        self.free[row].release()
        return images.permute(0, 3, 1, 2)

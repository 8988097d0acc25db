"""Shared batch slots between DataLoader workers and the consumer: exact, bounded, reusable."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.unit.test_data_stream import shards, stream  # noqa: F401  (fixture and helper)
from trainer.data import handoff
from trainer.data.handoff import SlotRing

pytestmark = pytest.mark.unit


def images(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (4, 5, 3), dtype=np.uint8) for _ in range(n)]


def test_slots_round_trip_exactly_and_a_full_ring_gives_way(monkeypatch):
    monkeypatch.setattr(handoff, "WAIT_S", 0.05)
    ring = SlotRing(workers=2, slots=2, batch_size=3, image_shape=(4, 5, 3))
    sent = [images(i) for i in range(3)]
    assert ring.put(1, sent[0]) == 0 and ring.put(1, sent[1][:2]) == 1
    start = time.monotonic()
    assert ring.put(1, sent[2]) == -1  # both slots still held by the consumer: no wait beyond WAIT_S
    assert time.monotonic() - start < 1.0
    assert ring.put(0, sent[2]) == 0  # rows are independent
    got = ring.take(1, 0, 3)
    assert got.shape == (3, 3, 4, 5)
    assert torch.equal(got, torch.from_numpy(np.stack(sent[0])).permute(0, 3, 1, 2))
    assert ring.put(1, sent[2]) == 0  # the slot taken first is the one reused
    assert torch.equal(ring.take(1, 1, 2), torch.from_numpy(np.stack(sent[1][:2])).permute(0, 3, 1, 2))
    assert torch.equal(ring.take(1, 0, 3), torch.from_numpy(np.stack(sent[2])).permute(0, 3, 1, 2))


def test_ring_batches_equal_private_tensor_batches(shards, monkeypatch):  # noqa: F811
    pattern, keys = shards
    with_ring = stream(pattern, augment="light")
    got = list(with_ring.iter_epoch())
    assert with_ring._slot_ring is not None
    monkeypatch.setattr(SlotRing, "create", classmethod(lambda cls, *a: None))
    without = list(stream(pattern, augment="light").iter_epoch())
    assert [b.keys for b in got] == [b.keys for b in without]
    assert sorted(k for b in got for k in b.keys) == sorted(keys)
    for a, b in zip(got, without, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.model_input(), b.model_input())


def test_an_abandoned_epoch_leaves_every_slot_free_for_the_next(shards):  # noqa: F811
    pattern, keys = shards
    s = stream(pattern, prefetch_batches=1)
    it = s.iter_epoch()
    next(it)
    it.close()  # slots the workers filled are never taken
    ring = s._plan().ring  # what the next epoch's workers get
    assert all(sem.acquire(block=False) for sem in ring.free for _ in range(ring.slots))
    s.load_state_dict({**s.state_dict(), "items": 0, "workers": {}})  # start the epoch over
    again = [k for b in s.iter_epoch() for k in b.keys]
    assert sorted(again) == sorted(keys)


def test_too_little_shared_memory_falls_back_with_a_warning(shards, monkeypatch, caplog):  # noqa: F811
    pattern, keys = shards
    monkeypatch.setattr(handoff, "SHM_SHARE", 1e-12)
    s = stream(pattern)
    batches = list(s.iter_epoch())
    assert s._slot_ring is None and "batch buffers would take" in caplog.text
    assert sorted(k for b in batches for k in b.keys) == sorted(keys)

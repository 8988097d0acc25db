"""One rank's stream of batches from webdataset tar shards, split by rank and worker, resumable.

Order. Everything random is seeded by (seed, epoch, rank, logical worker[, restart point]):
- not resampled: every rank shuffles the full shard list with (seed, epoch), takes shards
  ``rank::world_size``, and worker ``w`` of ``num_workers`` takes ``w::num_workers`` of those. One
  epoch shows every sample of every shard exactly once over all ranks (the last batch of a worker
  may be short). Each worker's sample shuffle buffer is seeded by (seed, epoch, rank, worker).
- resampled: each worker draws shards with replacement from all shards (a source chosen by weight,
  then a shard uniformly), forever; the epoch is ``epoch_samples`` summed over ranks, i.e.
  ``ceil(epoch_samples / (world_size * workers * batch_size))`` full batches per worker.
- ``__iter__`` never ends: epoch after epoch, each with a new order.

Resume (``state_dict`` is taken from the batches the trainer has received, not the ones prefetched):
- not resampled, same world_size / num_workers / shards / seed / batch_size: EXACT. Each worker
  replays its shard order and shuffle buffer and drops, undecoded, the samples it had already
  delivered (reading, not decoding, that part of its shards again); the next batches are the ones
  the uninterrupted run would have produced, bit for bit (light augmentation is seeded per
  sample). Worker ids are rotated so the DataLoader's round robin continues where it stopped; once
  a worker has finished its share near the end of an epoch, the interleaving of the remaining
  workers' batches may differ (the samples do not).
- resampled: STATISTICALLY EQUIVALENT. Each worker restarts with a fresh seed that includes how
  many batches it had delivered, so nothing is replayed from the start, and the epoch still ends
  after the same number of batches.
- different layout (world size, workers, shard count, seed, batch size): the positions cannot be
  mapped, so the stream goes on at the next epoch (new order; the rest of the interrupted epoch is
  not seen) and says so in the log.
- ``counters()`` carry over; near the restart point a bad sample may be counted twice.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .base import Batch, InputSpec
from .config import DataConfig
from .decode import SampleDecoder, to_chw
from .handoff import WORKER_START, SlotRing
from .shards import check_rank_share, epoch_order, mix_seed, nth_share, resolve_sources
from .tar_reader import COUNTER_NAMES, Counters, tar_samples

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class EpochPlan:
    """Everything a worker process needs to produce its part of one epoch (picklable)."""

    sources: list[tuple[list[str], float]]
    spec: InputSpec
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    resampled: bool
    shuffle_buffer: int
    augment: str
    workers: int
    rotation: int
    batches_per_worker: int
    jpeg: str
    starts: dict[int, dict] = field(default_factory=dict)
    ring: SlotRing | None = None


def weighted_shards(sources: list[tuple[list[str], float]], rng: random.Random) -> Iterator[dict]:
    """Endless {url} draws: a source with probability proportional to its weight, then one of its shards.

    webdataset's ResampledShards has no weights and seeds itself from its own worker info; the
    resume guarantees need the seed to come from (seed, epoch, rank, worker, restart point).
    """
    weights = [w for _, w in sources]
    while True:
        urls = rng.choices(sources, weights)[0][0]
        yield {"url": urls[rng.randrange(len(urls))]}


def number_samples(samples: Iterator[dict], start: int, counters: Counters) -> Iterator[tuple[int, dict]]:
    """(position, sample) from 1, dropping the first ``start`` (delivered before a restart) undecoded."""
    counters.muted = start > 0
    for pos, sample in enumerate(samples, 1):
        if pos <= start:
            counters.muted = pos < start
            continue
        yield pos, sample
    counters.muted = False


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start: SIGINT / SIGTERM are the training process's to handle.

    A Ctrl-C reaches the whole process group, workers included; the training process finishes its step
    and saves (trainer/dist.py), which may need further batches, and shuts the workers down itself.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class WorkerShare(IterableDataset):
    """The part of an epoch one DataLoader worker produces: tuples (images, captions, keys, meta).

    With the plan's ``ring`` the images wait in a shared slot (``meta['slot']`` >= 0) and
    ``images`` is None. The last item of a worker has no keys and carries only its final counters.
    """

    def __init__(self, plan: EpochPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple]:
        p = self.plan
        info = get_worker_info()
        row = info.id if info is not None else 0
        logical = (row + p.rotation) % p.workers
        start = p.starts.get(logical, {})
        counters = Counters(start.get("counters"))
        state = {"raw": int(start.get("raw", 0)), "batches": int(start.get("batches", 0)), "done": False}
        ring = p.ring if info is not None else None
        if not start.get("done", False):
            yield from self._batches(logical, row, ring, counters, state)
        state["done"] = True
        yield None, [], [], self._meta(logical, state, counters)

    def _batches(self, logical: int, row: int, ring: SlotRing | None, counters: Counters, state: dict
                 ) -> Iterator[tuple]:
        p = self.plan
        # a resampled restart draws afresh, seeded by where it stopped; an exact one replays
        restart = state["batches"] if p.resampled else 0
        key = (p.seed, p.epoch, p.rank, logical, restart)
        if p.resampled:
            source: Callable = partial(weighted_shards, p.sources, random.Random(mix_seed(*key, "shards")))
            skip = 0
        else:
            urls = epoch_order([u for urls, _ in p.sources for u in urls], p.seed, p.epoch)
            mine = list(nth_share(list(nth_share(urls, p.rank, p.world_size)), logical, p.workers))
            source = partial(iter, [{"url": u} for u in mine])
            skip = state["raw"]
        decoder = SampleDecoder(p.spec, p.augment, p.jpeg)

        def decode(item: tuple[int, dict]) -> tuple:
            pos, sample = item
            # seeded per sample, so an exact resume that skips samples keeps the same crops and flips
            rng = random.Random(mix_seed(*key, "augment", pos)) if p.augment != "none" else None
            return (pos, *decoder(sample, rng))

        def collate(items: list[tuple]) -> tuple:
            state["raw"] = max(state["raw"], max(it[0] for it in items))
            state["batches"] += 1
            pixels = [it[1] for it in items]
            slot = ring.put(row, pixels) if ring is not None else -1
            images = None if slot >= 0 else to_chw(pixels)
            meta = {**self._meta(logical, state, counters), "row": row, "slot": slot}
            return images, [it[2] for it in items], [it[3] for it in items], meta

        stages: list = [source, partial(tar_samples, counters=counters)]
        if p.shuffle_buffer > 0:
            rng = random.Random(mix_seed(*key, "shuffle"))
            stages.append(wds.shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=rng))
        stages += [
            partial(number_samples, start=skip, counters=counters),
            wds.map(decode, handler=counters.skip_sample),
            wds.batched(p.batch_size, collation_fn=collate, partial=not p.resampled),
        ]
        batches = iter(wds.DataPipeline(*stages))
        if p.resampled:
            batches = itertools.islice(batches, max(p.batches_per_worker - state["batches"], 0))
        yield from batches

    @staticmethod
    def _meta(logical: int, state: dict, counters: Counters) -> dict:
        return {"worker": logical, **state, "counters": dict(counters.values), "slot": -1}


class WebDatasetStream:
    """BatchStream over webdataset shards for one rank; see the module docstring for order and resume."""

    def __init__(
        self,
        cfg: DataConfig,
        spec: InputSpec,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        jpeg: str = "simplejpeg",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg = cfg
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.jpeg = jpeg
        self.sources = resolve_sources(cfg)
        self.n_shards = sum(len(urls) for urls, _ in self.sources)
        self.workers = max(cfg.num_workers, 1)
        if not cfg.resampled:
            check_rank_share(self.n_shards, rank, world_size, cfg.num_workers)
        self.batches_per_worker = math.ceil(cfg.epoch_samples / (world_size * self.workers * batch_size))
        self.epoch = 0
        self._items = 0  # DataLoader items taken this epoch; sets the worker rotation on a restart
        self._workers: dict[int, dict] = {}
        self._past = dict.fromkeys(COUNTER_NAMES, 0)
        self._slot_ring: SlotRing | None = None

    def _layout(self) -> dict:
        return {
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "n_shards": self.n_shards,
            "resampled": self.cfg.resampled,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def _plan(self) -> EpochPlan:
        return EpochPlan(
            sources=self.sources,
            spec=self.spec,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            resampled=self.cfg.resampled,
            shuffle_buffer=self.cfg.shuffle_buffer,
            augment=self.cfg.augment,
            workers=self.workers,
            rotation=self._items % self.workers,
            batches_per_worker=self.batches_per_worker,
            jpeg=self.jpeg,
            starts={w: dict(s) for w, s in self._workers.items()},
            ring=self._ring(),
        )

    def _ring(self) -> SlotRing | None:
        """Shared batch buffers for the workers, made once and reused every epoch (see handoff.py)."""
        if self.cfg.num_workers == 0:
            return None
        if self._slot_ring is None:
            size = self.spec.image_size
            self._slot_ring = SlotRing.create(self.cfg.num_workers, self.cfg.prefetch_batches + 2,
                                              self.batch_size, (size, size, 3))
        else:
            self._slot_ring.new_epoch()
        return self._slot_ring

    def iter_epoch(self) -> Iterator[Batch]:
        """The rest of the current epoch; when it is exhausted the stream moves to the next epoch."""
        n = self.cfg.num_workers
        loader = DataLoader(
            WorkerShare(self._plan()),
            batch_size=None,
            num_workers=n,
            prefetch_factor=self.cfg.prefetch_batches if n > 0 else None,
            worker_init_fn=ignore_stop_signals if n > 0 else None,
            multiprocessing_context=WORKER_START if n > 0 else None,
        )
        for images, captions, keys, meta in loader:
            self._items += 1
            self._workers[meta["worker"]] = {k: meta[k] for k in ("raw", "batches", "done", "counters")}
            if meta["slot"] >= 0:
                images = self._slot_ring.take(meta["row"], meta["slot"], len(keys))
            if images is not None:
                yield Batch(images, list(captions), list(keys), spec=self.spec)
        self._past = self.counters()
        self.epoch += 1
        self._items = 0
        self._workers = {}

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self.iter_epoch()

    def counters(self) -> dict[str, int]:
        totals = dict(self._past)
        for state in self._workers.values():
            for name, value in state["counters"].items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "epoch": self.epoch,
            "items": self._items,
            "workers": {str(w): dict(s, counters=dict(s["counters"])) for w, s in self._workers.items()},
            "past_counters": dict(self._past),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        self._past = {**dict.fromkeys(COUNTER_NAMES, 0), **state["past_counters"]}
        workers = {int(w): dict(s) for w, s in state["workers"].items()}
        if state["layout"] == self._layout():
            self.epoch, self._items, self._workers = int(state["epoch"]), int(state["items"]), workers
            return
        log.warning(
            "data: layout changed since the checkpoint (%s -> %s): positions cannot be mapped, "
            "going on at epoch %d",
            state["layout"],
            self._layout(),
            int(state["epoch"]) + 1,
        )
        for s in workers.values():
            for name, value in s["counters"].items():
                self._past[name] = self._past.get(name, 0) + value
        self.epoch, self._items, self._workers = int(state["epoch"]) + 1, 0, {}

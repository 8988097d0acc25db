"""Shard URL expansion and start-up checks, so a bad shard spec fails at once instead of hanging a rank."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Sequence

from webdataset.shardlists import expand_urls

from .config import DataConfig

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hdfs://")


def expand_shards(spec: str) -> list[str]:
    """Expand one source: brace pattern(s) joined by ``::``, or a ``.txt`` file with one URL/pattern a line."""
    if spec.endswith(".txt") and not spec.startswith(REMOTE_PREFIXES):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data shard list file does not exist: {spec}")
        urls: list[str] = []
        with open(spec, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    urls.extend(expand_urls(line))
        if not urls:
            raise ValueError(f"data shard list file names no shard: {spec}")
        return urls
    return expand_urls(spec)


def local_path(url: str) -> str | None:
    """The file system path of ``url``, or None for URLs we cannot check (pipe:, http, object stores)."""
    if url.startswith("file:"):
        return url[len("file:") :]
    if url.startswith(REMOTE_PREFIXES) or "://" in url:
        return None
    return url


def check_exist(urls: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the first local shard that does not exist (remote ones pass through)."""
    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data shard does not exist: {missing[0]}{more}")


def resolve_sources(cfg: DataConfig) -> list[tuple[list[str], float]]:
    """Every source of ``cfg`` as (expanded and checked URLs, weight)."""
    resolved = []
    for source in cfg.source_list():
        urls = expand_shards(source.shards)
        check_exist(urls)
        resolved.append((urls, source.weight))
    return resolved


def epoch_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """All shards in an order that depends only on (seed, epoch): identical on every rank before splitting."""
    order = list(urls)
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(order)
    return order


def check_rank_share(n_shards: int, rank: int, world_size: int, num_workers: int, label: str = "data") -> int:
    """Shards rank ``rank`` gets when ``n_shards`` are dealt round robin; ValueError if a rank or worker gets none.

    ``label`` starts the message: the config key and shard spec when known (trainer/cli.py).
    """
    share = len(range(rank, n_shards, world_size))
    if share == 0:
        raise ValueError(
            f"{label}: {n_shards} shard(s) for world_size {world_size}: rank {rank} gets no shard; "
            "use more shards, fewer ranks, or data.resampled: true"
        )
    if share < max(num_workers, 1):
        raise ValueError(
            f"{label}: rank {rank} gets {share} shard(s) but data.num_workers is {num_workers}: "
            "every worker needs a shard; use fewer workers, more shards, or data.resampled: true"
        )
    return share


def nth_share(src: Sequence, index: int, count: int) -> Iterator:
    """Items ``index, index + count, ...`` of ``src``: the split by rank or by worker, with explicit ids.

    webdataset's split_by_node/split_by_worker read the ids from the environment or torch.distributed;
    here the caller passes them, so two ranks can be built in one process and workers can be renumbered.
    """
    for i in range(index, len(src), count):
        yield src[i]


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any ints/strings, the same in every process (unlike ``hash`` of a string)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

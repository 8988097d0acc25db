"""Tar shards -> samples, counting shards that fail to open or end early instead of losing them silently.

webdataset's own tar expander, under a continue-on-error handler, ends a truncated tar without any
error (tarfile treats a missing header as end of archive). Here every shard is read through a reader
that remembers the last bytes: a complete uncompressed tar ends with two zero blocks, so a shard that
does not, or that raised while being read, is counted in ``shards_truncated``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .tar_members import BLOCK, is_metadata, iter_members

log = logging.getLogger(__name__)

END_OF_ARCHIVE = bytes(2 * BLOCK)
GZIP_MAGIC = b"\x1f\x8b"
COMPRESSED_MAGICS = (GZIP_MAGIC, b"BZh", b"\xfd7zXZ")

COUNTER_NAMES = ("samples_skipped", "shards_read", "shards_truncated", "shards_failed")


class Counters:
    """Per-worker monotonic counts; ``muted`` while replaying samples already counted before a restart."""

    def __init__(self, start: dict[str, int] | None = None) -> None:
        self.values = dict.fromkeys(COUNTER_NAMES, 0)
        self.values.update(start or {})
        self.muted = False

    def add(self, name: str, n: int = 1) -> None:
        if not self.muted:
            self.values[name] += n

    def skip_sample(self, exn: Exception) -> bool:
        """webdataset handler: count the bad sample and go on with the stream."""
        self.add("samples_skipped")
        if not self.muted:
            log.warning("data: skipped a sample: %r", exn)
        return True


class _TailReader:
    """File-like wrapper that counts bytes and keeps the last two blocks read."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.size = 0
        self.head = b""
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not self.head:
            self.head = data[:2]
        self.size += len(data)
        self.tail = (self.tail + data[-len(END_OF_ARCHIVE) :])[-len(END_OF_ARCHIVE) :]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def complete(self) -> bool:
        if self.head == GZIP_MAGIC:
            return True  # gzip reports its own truncation as an exception
        return self.size % BLOCK == 0 and self.tail == END_OF_ARCHIVE


def _shard_files(shards: Iterable[dict], counters: Counters) -> Iterator[dict]:
    """Every regular file of every shard as {fname, data, __url__}, then {} to close each shard's last sample."""
    for shard in shards:
        url = shard["url"]
        try:
            raw = gopen(url)
        except Exception as exn:  # missing object, failed pipe: skip the shard, keep training
            counters.add("shards_failed")
            log.warning("data: cannot open shard %s: %r", url, exn)
            continue
        reader = _TailReader(raw)
        member_errors: list[Exception] = []

        def stop_shard(exn: Exception, errors: list[Exception] = member_errors) -> bool:
            errors.append(exn)
            return False

        try:
            for item in _members(reader, stop_shard):
                item["__url__"] = url
                yield item
            reader.drain()
            ok = not member_errors and reader.complete()
        except Exception as exn:
            ok = False
            member_errors.append(exn)
        finally:
            try:
                raw.close()  # a pipe: reports its command's exit status here
            except Exception as exn:
                member_errors.append(exn)
                ok = False
        if reader.size == 0 or (member_errors and reader.size <= BLOCK):
            counters.add("shards_failed")
            log.warning("data: shard %s could not be read: %r", url, member_errors[:1])
        elif ok:
            counters.add("shards_read")
        else:
            counters.add("shards_truncated")
            log.warning(
                "data: shard %s is truncated or corrupt; its tail was lost: %r", url, member_errors[:1]
            )
        yield {}


class _Replay:
    """A stream whose first bytes were already read: hands them out again, then reads on."""

    def __init__(self, prefix: bytes, raw) -> None:
        self.prefix = prefix
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        if not self.prefix:
            return self.raw.read(n)
        if n < 0:
            data, self.prefix = self.prefix + self.raw.read(), b""
            return data
        data, self.prefix = self.prefix[:n], self.prefix[n:]
        return data + self.raw.read(n - len(data)) if len(data) < n else data


def _members(reader: _TailReader, stop_shard) -> Iterator[dict]:
    """{fname, data} of a shard's regular files: the lean reader for plain tars, tarfile otherwise."""
    first = reader.read(BLOCK)
    if first.startswith(COMPRESSED_MAGICS):
        yield from tar_file_iterator(_Replay(first, reader), handler=stop_shard)
        return
    for name, data in iter_members(reader, first):
        if not is_metadata(name):
            yield {"fname": name, "data": data}


def tar_samples(shards: Iterable[dict], counters: Counters) -> Iterator[dict]:
    """Samples {__key__, __url__, jpg/png/webp, txt, json, ...} from a stream of {url} dicts."""
    return group_by_keys(_shard_files(shards, counters), handler=counters.skip_sample)

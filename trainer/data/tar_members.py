"""Regular files of an uncompressed tar stream, read with one header parse per member.

Python's ``tarfile`` in stream mode (what webdataset's expander uses) spends about 70 us per
member on its general machinery; webdataset shards only hold regular files, so a reader that
knows ustar, pax and GNU long-name headers and nothing else does the same job in a few us
(``bench/data.py``). Compressed shards still go through webdataset's ``tarfile`` path.
Headers are checksummed like ``tarfile`` does; a bad header or a short read raises
``TarFormatError`` so the caller can count the shard as corrupt or truncated.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
ENCODING = sys.getfilesystemencoding()
SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's rule: such names are shard metadata


class TarFormatError(ValueError):
    """A header that is not a tar header, or a member cut short."""


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"tar header has a bad {what} field {field!r}") from None


def _checked(header: bytes) -> None:
    stored = _octal(header[148:156], "checksum")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != unsigned and stored != _signed_sum(header):  # some old tars sum signed chars
        raise TarFormatError(f"tar header checksum mismatch ({stored} != {unsigned})")


def _signed_sum(header: bytes) -> int:
    def signed(part: bytes) -> int:
        return sum(b - 256 if b > 127 else b for b in part)

    return signed(header[:148]) + 8 * 32 + signed(header[156:])


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"tar stream ended inside {what} ({len(data)} of {n} bytes)")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """'<len> key=value\\n' records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_members(stream: BinaryIO, first_header: bytes | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file until the end-of-archive block, in stream order.

    ``first_header`` is the first block if the caller has already read it (to sniff compression).
    Directories, links and other member types are skipped like webdataset skips them.
    """
    header = first_header
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if header is None:
            header = stream.read(BLOCK)
        if len(header) != BLOCK:
            raise TarFormatError(f"tar stream ended inside a header ({len(header)} of {BLOCK} bytes)")
        if header == ZERO_BLOCK:
            return
        _checked(header)
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax and kind in REGULAR else _octal(header[124:136], "size")
        padding = -size % BLOCK
        if kind in REGULAR:
            name = pax.get("path") or long_name or _ustar_name(header)
            data = _read_exact(stream, size, f"member {name!r}")
            _read_exact(stream, padding, f"the padding of {name!r}")
            long_name, pax = None, {}
            yield name, data
        elif kind == b"x":
            pax = _pax_records(_read_exact(stream, size + padding, "a pax header")[:size])
        elif kind == b"L":
            raw = _read_exact(stream, size + padding, "a GNU long name")[:size]
            long_name = raw.rstrip(b"\0").decode(ENCODING, "surrogateescape")
        else:  # directories, links, global pax headers, devices: nothing to hand on
            _read_exact(stream, size + padding, "a skipped member")
            long_name, pax = None, {}
        header = None


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode(ENCODING, "surrogateescape")


def is_metadata(name: str) -> bool:
    """Names webdataset treats as shard metadata rather than sample files."""
    return SKIP_META.match(name) is not None

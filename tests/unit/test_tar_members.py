"""The lean tar reader against Python's tarfile on archives tarfile writes: names, data, damage."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from trainer.data.tar_members import TarFormatError, is_metadata, iter_members
from trainer.data.tar_reader import Counters, tar_samples

pytestmark = pytest.mark.unit


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:  # a directory entry, to be skipped
            directory = tarfile.TarInfo("adir")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            link = tarfile.TarInfo("a.link")
            link.type, link.linkname = tarfile.SYMTYPE, "x.jpg"
            tar.addfile(link)
    return buf.getvalue()


def reference(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


MEMBERS = [
    ("000001.jpg", bytes(range(256)) * 3),
    ("000001.txt", b"a caption"),
    ("empty.json", b""),
    ("sub/dir/" + "long_" * 40 + ".jpg", b"x" * 513),  # > 100 chars: pax path / GNU long name
    ("caf\u00e9-\u00fcber.txt", b"unicode name"),
    ("exact.bin", b"y" * 1024),  # a multiple of the block size: no padding
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_tarfile_in_every_format(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) <= 100 and m[0].isascii()]
    blob = make_tar(members, fmt)
    ours = list(iter_members(io.BytesIO(blob)))
    assert ours == reference(blob) == members


def test_first_header_read_by_the_caller_is_used():
    blob = make_tar(MEMBERS)
    stream = io.BytesIO(blob)
    first = stream.read(512)
    assert list(iter_members(stream, first)) == MEMBERS


def test_truncated_member_and_truncated_header_raise():
    blob = make_tar(MEMBERS)
    with pytest.raises(TarFormatError, match="ended inside member"):
        list(iter_members(io.BytesIO(blob[:512 + 700])))
    two = make_tar(MEMBERS[:2], extra=False)
    with tarfile.open(fileobj=io.BytesIO(two)) as tar:
        second = tar.getmembers()[1].offset
    with pytest.raises(TarFormatError, match="inside a header"):
        list(iter_members(io.BytesIO(two[:second + 200])))


def test_corrupt_header_fails_its_checksum():
    blob = bytearray(make_tar(MEMBERS, extra=False))
    blob[10] ^= 0xFF  # inside the first member's name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(blob))))


def test_metadata_names_follow_webdataset():
    assert is_metadata("__key__") and is_metadata("__meta__/x.json")
    assert not is_metadata("a__b__.jpg") and not is_metadata("x/__key__")


def test_gzip_shards_and_plain_shards_give_the_same_samples(tmp_path):
    blob = make_tar([("k1.jpg", b"one"), ("k1.txt", b"c1"), ("__meta__", b"m"), ("k2.jpg", b"two")], extra=False)
    (tmp_path / "a.tar").write_bytes(blob)
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(blob))
    counters = Counters()
    plain = list(tar_samples([{"url": str(tmp_path / "a.tar")}], counters))
    packed = list(tar_samples([{"url": str(tmp_path / "b.tar.gz")}], counters))
    strip = [{k: v for k, v in s.items() if k != "__url__"} for s in plain + packed]
    assert strip[:2] == strip[2:] == [
        {"__key__": "k1", "jpg": b"one", "txt": b"c1"}, {"__key__": "k2", "jpg": b"two"},
    ]
    assert counters.values["shards_read"] == 2 and counters.values["shards_truncated"] == 0

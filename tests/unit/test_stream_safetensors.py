"""The streaming safetensors writer/reader against the reference safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pruning.safetensors_stream import SafetensorsReader, SafetensorsWriter

pytestmark = pytest.mark.unit


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(5, 3, generator=g),
        "w16": torch.randn(7, generator=g).half(),
        "wbf": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_written_file_reads_back_exactly_with_reference_reader(tmp_path):
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got, v)


def test_reader_matches_reference_writer_and_keeps_file_order(tmp_path):
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path)
    with SafetensorsReader(path) as reader:
        assert set(reader.keys()) == set(tensors)
        for k, v in tensors.items():
            assert reader.meta(k) == (tuple(v.shape), v.dtype)
            assert torch.equal(reader.get(k), v)


def test_writer_refuses_wrong_order_shape_and_missing_tensors(tmp_path):
    specs = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as writer:
            writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected tensor 'a' \(2,\)"):
        with SafetensorsWriter(tmp_path / "y.safetensors", specs) as writer:
            writer.write("a", torch.zeros(4))
    writer = SafetensorsWriter(tmp_path / "z.safetensors", specs)
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="next: 'b'"):
        writer.close()


def test_truncated_and_foreign_files_are_rejected_on_open(tmp_path):
    path = tmp_path / "full.safetensors"
    save_file({"a": torch.randn(100, 10), "b": torch.randn(10)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsReader(cut)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a checkpoint at all, just some words")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsReader(text)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        SafetensorsReader(tmp_path / "missing.safetensors")

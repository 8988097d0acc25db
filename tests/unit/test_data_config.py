"""DataConfig validation and the build_stream factory."""

from __future__ import annotations

import pytest
import torch

from trainer.data import DataConfig, InputSpec, SourceConfig, SyntheticStream, build_stream

pytestmark = pytest.mark.unit


def test_defaults_are_synthetic_and_build_a_synthetic_stream():
    spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    s = build_stream(DataConfig(), spec, batch_size=2, rank=1, world_size=2, seed=0)
    assert isinstance(s, SyntheticStream)
    batch = next(iter(s))
    assert batch.images.shape == (2, 3, 8, 8) and batch.images.dtype == torch.float32 and batch.spec is None
    assert s.counters()["samples_skipped"] == 0


def test_image_size_replaces_the_teachers_size():
    spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    s = build_stream(DataConfig(image_size=4), spec, batch_size=2, rank=0, world_size=1, seed=0)
    assert next(iter(s)).images.shape == (2, 3, 4, 4)


def test_sources_from_yaml_style_dicts_become_typed_and_frozen():
    cfg = DataConfig(
        kind="webdataset",
        sources=[{"shards": "a/{0..3}.tar", "weight": 2.0}, {"shards": "pipe:cat b.tar"}],
        resampled=True,
        epoch_samples=100,
    )
    assert cfg.sources == (SourceConfig("a/{0..3}.tar", 2.0), SourceConfig("pipe:cat b.tar", 1.0))
    assert cfg.source_list() == cfg.sources
    assert DataConfig(kind="webdataset", shards="x.tar").source_list() == (SourceConfig("x.tar"),)
    hash(cfg)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "tfrecord"}, "data.kind"),
        ({"augment": "heavy"}, "data.augment"),
        ({"kind": "webdataset"}, "data.shards"),
        ({"kind": "webdataset", "shards": "a.tar", "sources": [{"shards": "b.tar"}]}, "data.shards"),
        ({"kind": "webdataset", "shards": "a.tar", "resampled": True}, "data.epoch_samples"),
        ({"kind": "webdataset", "shards": "a.tar", "epoch_samples": 10}, "data.resampled"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"shuffle_buffer": 1.5}, "data.shuffle_buffer"),
        ({"prefetch_batches": 0}, "data.prefetch_batches"),
        ({"image_size": -1}, "data.image_size"),
        ({"kind": "webdataset", "sources": [{"shards": "a.tar", "weight": 0}]}, "weight"),
        ({"kind": "webdataset", "sources": [{"shards": "a.tar", "weight": 2.0}]}, "data.resampled"),
        ({"kind": "webdataset", "sources": [{"shards": "a.tar", "wieght": 2.0}]}, "wieght"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)

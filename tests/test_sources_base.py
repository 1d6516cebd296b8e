"""ArraySource and its on-disk cache: gathering, rotations, cache errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.errors import DataError
from bench.sources.base import ArraySource, load_cache, save_cache


def tiny(rot=None):
    images = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 5
    return ArraySource("tiny", images, np.array([0, 2]), np.array([2, 2]), ["a", "b"],
                       {"train": np.array([0]), "test": np.array([1])}, class_rot=rot, meta={"v": 1})


def test_gather_order_scale_and_shape():
    src = tiny()
    x = src.gather([1, 0], [[1], [0, 1]])
    assert x.shape == (3, 1, 3, 3) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(src.images[3]).float() / 255)
    assert torch.equal(x[2, 0], torch.from_numpy(src.images[1]).float() / 255)


def test_rotated_classes():
    src = tiny(rot=np.array([0, 1], dtype=np.int8))
    x = src.gather([1], [[0]])
    assert torch.equal(x[0, 0], torch.from_numpy(np.rot90(src.images[2]).copy()).float() / 255)


def test_gather_out_of_range():
    with pytest.raises(IndexError, match="class 0 has 2 examples"):
        tiny().gather([0], [[2]])


def test_bad_split_ids():
    with pytest.raises(DataError, match="outside"):
        ArraySource("t", np.zeros((2, 2, 2), np.uint8), np.array([0]), np.array([2]), ["a"], {"train": np.array([3])})


def test_cache_roundtrip_and_errors(tmp_path):
    save_cache(tmp_path / "c", tiny(rot=np.array([0, 3], dtype=np.int8)))
    src = load_cache(tmp_path / "c", expect_meta={"v": 1})
    assert isinstance(src.images, np.memmap)
    assert src.class_rot.tolist() == [0, 3] and src.splits["test"].tolist() == [1]
    with pytest.raises(DataError, match="v=1.*expected 2"):
        load_cache(tmp_path / "c", expect_meta={"v": 2})
    with pytest.raises(DataError, match="no cache index"):
        load_cache(tmp_path / "missing")
    index = tmp_path / "c" / "index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(data | {"format": 99}))
    with pytest.raises(DataError, match="cache format 99"):
        load_cache(tmp_path / "c")
    index.write_text(json.dumps(data))
    (tmp_path / "c" / "images.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="images.npy"):
        load_cache(tmp_path / "c")
    index.write_text("{not json")
    with pytest.raises(DataError, match="unreadable cache index"):
        load_cache(tmp_path / "c")

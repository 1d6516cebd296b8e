"""Episode sampling: determinism, order independence, spec hashes, way/shot errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.errors import MetabenchError
from bench.sampling import EpisodeSet, EpisodeSpec, FixedEpisodes, describe_fixed
from bench.sources.synthetic import make_synthetic


def test_episode_is_pure_function_of_index(synthetic_set):
    a = synthetic_set.episode("test", 17)
    b = synthetic_set.episode("test", 17)
    assert a.spec_hash == b.spec_hash
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert torch.equal(a.support_y, b.support_y) and a.classes == b.classes


def test_order_independence(synthetic_set):
    forward = [synthetic_set.describe("test", i).hash for i in range(10)]
    backward = [synthetic_set.describe("test", i).hash for i in reversed(range(10))][::-1]
    assert forward == backward
    # interleaving other splits changes nothing either
    mixed = []
    for i in range(10):
        synthetic_set.describe("train", 1000 + i)
        mixed.append(synthetic_set.describe("test", i).hash)
    assert mixed == forward


def test_episode_shapes_and_labels(synthetic_set):
    b = synthetic_set.bench.protocol
    ep = synthetic_set.episode("val", 3)
    assert ep.support_x.shape == (b.way * b.shot, 1, 28, 28)
    assert ep.query_x.shape == (b.way * b.query, 1, 28, 28)
    assert ep.support_y.tolist() == sorted(list(range(b.way)) * b.shot)
    assert ep.query_y.bincount().tolist() == [b.query] * b.way
    assert ep.support_x.dtype == torch.float32 and 0 <= ep.support_x.min() and ep.support_x.max() <= 1


def test_classes_come_from_split_and_examples_are_disjoint(synthetic_set):
    src = synthetic_set.source
    for split in ("train", "val", "test"):
        allowed = set(src.split_classes(split).tolist())
        for i in range(20):
            spec = synthetic_set.describe(split, i)
            assert set(spec.classes) <= allowed and len(set(spec.classes)) == len(spec.classes)
            for s, q in zip(spec.support, spec.query):
                assert not set(s) & set(q)


def test_episodes_differ_across_indices_and_splits(synthetic_set):
    hashes = {synthetic_set.describe(s, i).hash for s in ("train", "val", "test") for i in range(30)}
    assert len(hashes) == 90


def test_spec_hash_covers_every_field(synthetic_set):
    spec = synthetic_set.describe("test", 0)
    for change in (dict(index=1), dict(version=2), dict(split="val"), dict(benchmark="x"),
                   dict(classes=spec.classes[::-1])):
        assert dataclasses.replace(spec, **change).hash != spec.hash
    assert EpisodeSpec(**dataclasses.asdict(spec)).hash == spec.hash


def test_seed_changes_episodes(synthetic_set):
    other = dataclasses.replace(synthetic_set.bench, seed=synthetic_set.bench.seed + 1)
    a = describe_fixed(synthetic_set.bench, synthetic_set.source, "test", 0)
    b = describe_fixed(other, synthetic_set.source, "test", 0)
    assert a.classes != b.classes or a.support != b.support


def test_impossible_way_or_shot_is_a_clear_error(synthetic_set):
    src = make_synthetic(n_classes=20, n_examples=6)
    with pytest.raises(MetabenchError, match="cannot sample 12-way"):
        EpisodeSet(dataclasses.replace(synthetic_set.bench, protocol=FixedEpisodes(12, 1, 5)), src)
    with pytest.raises(MetabenchError, match="shot \\+ query"):
        EpisodeSet(dataclasses.replace(synthetic_set.bench, protocol=FixedEpisodes(5, 5, 5)), src)

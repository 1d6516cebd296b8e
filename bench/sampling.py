"""The fixed way/shot/query protocol (Omniglot, miniImageNet, glyphs, your own benchmarks).

Every episode has `way` distinct classes of the split, each with `shot` support and `query`
query examples (`train_query` for training episodes when set), all distinct. Support and query
are ordered by class; labels are 0..way-1 in the order the classes were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from bench.api import Episode, TaskInfo
from bench.errors import MetabenchError
from bench.protocols import SPLITS, BenchmarkInfo, EpisodeSet, EpisodeSpec, Protocol, episode_rng
from bench.sources.base import ArraySource

__all__ = ["EpisodeSet", "EpisodeSpec", "FixedEpisodes", "describe_fixed", "episode_rng", "materialize"]


@dataclass(frozen=True)
class FixedEpisodes(Protocol):
    """way classes, shot support and query query examples per class in every episode.

    train_query: query examples per class of training episodes (None: `query`; MAML's own code
    trains with as many query as support examples, for instance).
    """

    way: int
    shot: int
    query: int
    train_query: int | None = None

    def __post_init__(self) -> None:
        for name in ("way", "shot", "query", "train_query"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise MetabenchError(f"fixed episodes: {name} must be a positive whole number (got {value!r})")
        if self.way < 2:
            raise MetabenchError(f"fixed episodes: way must be at least 2 (got {self.way})")

    @property
    def max_way(self) -> int:
        return self.way

    def query_of(self, split: str) -> int:
        """Query examples per class in episodes of `split`."""
        return self.train_query if split == "train" and self.train_query is not None else self.query

    def sampler(self, bench: BenchmarkInfo, sources: Mapping[str, ArraySource]) -> "FixedSampler":
        return FixedSampler(bench, self, sources[bench.source])

    def shape(self) -> str:
        train = f" ({self.train_query} in training)" if self.train_query is not None else ""
        return f"{self.way}-way {self.shot}-shot {self.query} query{train}"

    def row_problem(self, way: int, n_support: int, n_query: int) -> str | None:
        for what, got, expected in (("way", way, self.way), ("n_support", n_support, self.way * self.shot),
                                    ("n_query", n_query, self.way * self.query)):
            if got != expected:
                return f"{what} {got}, but the protocol ({self.shape()}) has {expected}"
        return None


def check_way_shot(source: ArraySource, split: str, way: int, per_class: int, name: str) -> None:
    """Raise a clear error when `split` cannot supply `way` classes with `per_class` examples each."""
    classes = source.split_classes(split)
    eligible = int((source.counts(classes) >= per_class).sum())
    if eligible < way:
        raise MetabenchError(f"{name}: split {split!r} of source {source.name!r} has {eligible} classes with at "
                             f"least {per_class} examples (shot + query); cannot sample {way}-way episodes")


def describe_fixed(bench: BenchmarkInfo, source: ArraySource, split: str, index: int) -> EpisodeSpec:
    """Fixed way/shot/query: `way` distinct classes, then shot + query distinct examples of each."""
    p: FixedEpisodes = bench.protocol  # type: ignore[attr-defined]
    rng = episode_rng(bench.seed, split, index)
    classes = source.split_classes(split)
    per_class = p.shot + p.query_of(split)
    eligible = classes[source.counts(classes) >= per_class]
    chosen = eligible[rng.permutation(len(eligible))[: p.way]]
    support, query = [], []
    for c in chosen:
        idx = rng.permutation(int(source.class_count[c]))[:per_class]
        support.append(tuple(int(i) for i in idx[: p.shot]))
        query.append(tuple(int(i) for i in idx[p.shot:]))
    return EpisodeSpec(bench.name, bench.version, split, index, tuple(int(c) for c in chosen),
                       tuple(support), tuple(query))


def materialize(spec: EpisodeSpec, source: ArraySource, class_offset: int = 0) -> Episode:
    """Gather the pixels of a spec. Support and query are ordered by class, labels 0..way-1.

    class_offset: added to the class ids of Episode.classes (sources of a multi-source benchmark
    get disjoint id ranges).
    """
    way = len(spec.classes)
    sx = source.gather(spec.classes, spec.support)
    qx = source.gather(spec.classes, spec.query)
    sy = np.repeat(np.arange(way), [len(s) for s in spec.support])
    qy = np.repeat(np.arange(way), [len(q) for q in spec.query])
    return Episode(sx, torch.from_numpy(sy).long(), qx, torch.from_numpy(qy).long(),
                   tuple(class_offset + c for c in spec.classes), spec.split, spec.index, spec.hash)


class FixedSampler:
    """Fixed episodes of one benchmark on its loaded source (checks every split can supply them)."""

    def __init__(self, bench: BenchmarkInfo, protocol: FixedEpisodes, source: ArraySource) -> None:
        self.bench, self.protocol, self.source = bench, protocol, source
        for split in SPLITS:
            check_way_shot(source, split, protocol.way, protocol.shot + protocol.query_of(split), bench.name)

    def describe(self, split: str, index: int) -> EpisodeSpec:
        return describe_fixed(self.bench, self.source, split, index)

    def materialize(self, spec: EpisodeSpec) -> Episode:
        return materialize(spec, self.source)

    def task_info(self) -> TaskInfo:
        return TaskInfo(image_shape=self.source.image_shape, max_way=self.protocol.way,
                        n_classes=self.source.n_classes, variable_way=False)

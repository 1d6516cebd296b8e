"""Episode sampling: describe an episode by indices, hash the description, then gather pixels.

Episode i of a split is a pure function of (benchmark, split, i): its generator is seeded by
(benchmark seed, split, i), so episode 417 never depends on which episodes were drawn before.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from bench.api import Episode
from bench.errors import MetabenchError
from bench.sources.base import ArraySource

if TYPE_CHECKING:
    from bench.benchmarks import Benchmark


@dataclass(frozen=True)
class EpisodeSpec:
    """An episode by indices only: cheap, hashable, serialisable.

    classes: absolute class ids (position = relative label); support[j] / query[j]: example
    indices within class classes[j]. source: the source the episode is drawn from, for
    benchmarks with several (Meta-Dataset); None (and then left out of the JSON and the hash,
    so the hashes of single-source benchmarks are unchanged) otherwise.
    """

    benchmark: str
    version: int
    split: str
    index: int
    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]
    source: str | None = None

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces); `source` only when set."""
        d = asdict(self)
        if d["source"] is None:
            del d["source"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of episode `index` of `split`: seeded by (seed, crc32(split), index) only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])))


def check_way_shot(source: ArraySource, split: str, way: int, per_class: int, name: str) -> None:
    """Raise a clear error when `split` cannot supply `way` classes with `per_class` examples each."""
    classes = source.split_classes(split)
    if way < 2:
        raise MetabenchError(f"{name}: way must be at least 2 (got {way})")
    eligible = int((source.counts(classes) >= per_class).sum())
    if eligible < way:
        raise MetabenchError(f"{name}: split {split!r} of source {source.name!r} has {eligible} classes with at "
                             f"least {per_class} examples (shot + query); cannot sample {way}-way episodes")


def describe_fixed(bench: "Benchmark", source: ArraySource, split: str, index: int) -> EpisodeSpec:
    """Fixed way/shot/query: `way` distinct classes, then shot + query distinct examples of each."""
    rng = episode_rng(bench.seed, split, index)
    classes = source.split_classes(split)
    per_class = bench.shot + bench.query
    eligible = classes[source.counts(classes) >= per_class]
    chosen = eligible[rng.permutation(len(eligible))[: bench.way]]
    support, query = [], []
    for c in chosen:
        idx = rng.permutation(int(source.class_count[c]))[:per_class]
        support.append(tuple(int(i) for i in idx[: bench.shot]))
        query.append(tuple(int(i) for i in idx[bench.shot:]))
    return EpisodeSpec(bench.name, bench.version, split, index, tuple(int(c) for c in chosen),
                       tuple(support), tuple(query))


def materialize(spec: EpisodeSpec, source: ArraySource) -> Episode:
    """Gather the pixels of a spec. Support and query are ordered by class, labels 0..way-1."""
    way = len(spec.classes)
    sx = source.gather(spec.classes, spec.support)
    qx = source.gather(spec.classes, spec.query)
    sy = np.repeat(np.arange(way), [len(s) for s in spec.support])
    qy = np.repeat(np.arange(way), [len(q) for q in spec.query])
    import torch

    return Episode(sx, torch.from_numpy(sy).long(), qx, torch.from_numpy(qy).long(),
                   spec.classes, spec.split, spec.index, spec.hash)


class EpisodeSet:
    """The episodes of one benchmark on one loaded source.

    Other samplers (Meta-Dataset's) subclass it and override `describe` and `materialize`.
    """

    def __init__(self, bench: "Benchmark", source: ArraySource) -> None:
        self.bench = bench
        self.source = source
        for split in ("train", "val", "test"):
            check_way_shot(source, split, bench.way, bench.shot + bench.query, bench.name)

    def describe(self, split: str, index: int) -> EpisodeSpec:
        """The spec of episode `index` of `split`."""
        return describe_fixed(self.bench, self.source, split, index)

    def materialize(self, spec: EpisodeSpec) -> Episode:
        """The pixels of a spec of this benchmark."""
        return materialize(spec, self.source)

    def episode(self, split: str, index: int) -> Episode:
        """Episode `index` of `split`, with pixels."""
        return self.materialize(self.describe(split, index))

    def stream(self, split: str, start: int = 0) -> Iterator[Episode]:
        """Episodes start, start+1, ... of `split` (endless)."""
        i = start
        while True:
            yield self.episode(split, i)
            i += 1

    def episodes(self, split: str, n: int) -> list[Episode]:
        """The first `n` episodes of `split`."""
        return [self.episode(split, i) for i in range(n)]

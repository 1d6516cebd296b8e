"""Episode protocols: the interface every way of drawing episodes implements, and the episode set over it.

A benchmark is plain data that holds a protocol (bench/benchmarks.py). The protocol owns
everything that depends on how episodes are drawn:

- `source_names(bench)`: which sources its episodes come from;
- `sampler(bench, sources)`: a `Sampler` over loaded sources, with `describe(split, i)` (an
  `EpisodeSpec`: indices only, hashable), `materialize(spec)` (pixels) and `task_info()`;
- `shape()`: a one-line description for `metabench ls`;
- `row_problem(way, n_support, n_query)`: why a result row cannot come from this protocol.

Two protocols exist: fixed way/shot/query (`bench.sampling.FixedEpisodes`) and Meta-Dataset's
variable episodes (`bench.md_sampling.MDEpisodes`). A new one subclasses `Protocol`; nothing
else branches on which protocol a benchmark has.

Episode i of a split is a pure function of (benchmark, split, i): its generator is seeded by
(benchmark seed, split, i) (`episode_rng`), so episode 417 never depends on which were drawn before.
"""

from __future__ import annotations

import abc
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping
from typing import Protocol as Structural

import numpy as np

from bench.api import Episode, TaskInfo
from bench.errors import MetabenchError
from bench.sources.base import ArraySource

SPLITS = ("train", "val", "test")


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


def check_split(split: str) -> None:
    """Raise a clear error for a split name other than train, val or test."""
    if split not in SPLITS:
        raise MetabenchError(f"unknown split {split!r} (train, val or test)")


class BenchmarkInfo(Structural):
    """What a protocol reads of its benchmark (bench.benchmarks.Benchmark has these fields)."""

    name: str
    source: str
    image_size: int
    version: int
    seed: int


class Sampler(Structural):
    """A protocol bound to loaded sources: describes and materializes episodes."""

    def describe(self, split: str, index: int) -> EpisodeSpec: ...

    def materialize(self, spec: EpisodeSpec) -> Episode: ...

    def task_info(self) -> TaskInfo: ...


class Protocol(abc.ABC):
    """How a benchmark draws its episodes (frozen dataclasses of the protocol's constants)."""

    @property
    @abc.abstractmethod
    def max_way(self) -> int:
        """The largest way of any episode."""

    @property
    def variable_way(self) -> bool:
        """Whether the way changes from episode to episode."""
        return False

    def source_names(self, bench: BenchmarkInfo) -> tuple[str, ...]:
        """Registry names of the sources the episodes come from (default: the benchmark's source)."""
        return (bench.source,)

    @abc.abstractmethod
    def sampler(self, bench: BenchmarkInfo, sources: Mapping[str, ArraySource]) -> Sampler:
        """The sampler over loaded `sources` (name -> source); raises a clear error when a split
        cannot supply this protocol's episodes."""

    @abc.abstractmethod
    def shape(self) -> str:
        """One line for `metabench ls`, e.g. "5-way 1-shot 15 query"."""

    @abc.abstractmethod
    def row_problem(self, way: int, n_support: int, n_query: int) -> str | None:
        """Why a test episode of (way, n_support, n_query) cannot come from this protocol (None: it can)."""


class EpisodeSet:
    """The episodes of one benchmark on its loaded sources.

    sources: the loaded sources by registry name (a single ArraySource stands for
    {bench.source: it}). All per-protocol work happens in `bench.protocol.sampler(...)`.
    """

    def __init__(self, bench: BenchmarkInfo, sources: ArraySource | Mapping[str, ArraySource]) -> None:
        self.bench = bench
        self.sources = {bench.source: sources} if isinstance(sources, ArraySource) else dict(sources)
        self.sampler = bench.protocol.sampler(bench, self.sources)  # type: ignore[attr-defined]

    @property
    def source(self) -> ArraySource:
        """The test source."""
        return self.sources[self.bench.source]

    def task_info(self) -> TaskInfo:
        """What a method may know before training (shapes, largest way, class count)."""
        return self.sampler.task_info()

    def describe(self, split: str, index: int) -> EpisodeSpec:
        """The spec of episode `index` of `split`."""
        check_split(split)
        return self.sampler.describe(split, index)

    def materialize(self, spec: EpisodeSpec) -> Episode:
        """The pixels of a spec of this benchmark."""
        return self.sampler.materialize(spec)

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

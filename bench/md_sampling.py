"""Meta-Dataset episodes: the official variable-way, variable-shot sampler, on prepared sources.

A re-implementation of `EpisodeDescriptionSampler` (google-research/meta-dataset,
meta_dataset/data/sampling.py, commit 1676095) with its default constants (`MDConfig`), drawing
every random number from the per-episode generator of the foundation
(`bench.sampling.episode_rng(seed, split, index)`), so episode i of a split is a pure function of
(benchmark, split, i). For one episode of one (source, split):

1. Classes. Omniglot (bi-level spec): one alphabet of the split uniformly, then N ~ U{5 ..
   min(50, characters of the alphabet)} characters of it without replacement. ILSVRC
   (hierarchical spec): one internal node of the split's WordNet DAG uniformly among those
   spanning 5 to 392 leaves; its leaves are the classes, subsampled to 50 when more. Other
   sources: N ~ U{5 .. min(50, classes of the split)} classes uniformly.
2. Query per class q = min(10, min over the chosen classes of floor(|Im(c)| / 2)).
3. beta ~ U[0, 1); support size |S| = min(500, sum_c floor(beta * min(100, |Im(c)| - q) + 1)).
4. alpha_c ~ U(log 0.5, log 2) per class; shots k_c = min(floor(R_c (|S| - N)) + 1, |Im(c)| - q)
   with R_c proportional to |Im(c)| exp(alpha_c).
5. Images: k_c + q distinct examples of each class drawn uniformly (support first), so no
   image appears twice in an episode; labels 0..N-1 in the order the classes were drawn.

Multi-source training streams (the "all datasets" regime) first pick the episode's source
uniformly among the benchmark's training sources, with the same generator. The fixed-shape
option (`MDConfig` with num_ways / num_support / num_query set) draws way classes uniformly among the split's classes
with at least shot + query images, ignoring the ontology, and shot + query examples of each
(the official num_ways / num_support / num_query with ignore_*_ontology).

The random streams differ from TensorFlow's (numpy PCG64 here), so episodes follow the
official distribution, not the official sequence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from bench.api import Episode, TaskInfo
from bench.errors import MetabenchError
from bench.protocols import BenchmarkInfo, EpisodeSpec, Protocol, check_split, episode_rng
from bench.sampling import materialize
from bench.sources.base import ArraySource
from bench.sources.meta_dataset import MAX_SPANNING_LEAVES_ELIGIBLE, MDSpec, spec_of


@dataclass(frozen=True)
class MDConfig:
    """The episode configuration (meta_dataset/data/config.py EpisodeDescriptionConfig defaults).

    num_ways / num_support / num_query: set all three for the fixed-shape option (the ontology is
    then ignored); None for variable episodes.
    """

    num_ways: int | None = None
    num_support: int | None = None
    num_query: int | None = None
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2)
    use_hierarchy: bool = True

    @property
    def fixed(self) -> bool:
        return self.num_ways is not None

    @property
    def max_way(self) -> int:
        return int(self.num_ways) if self.fixed else self.max_ways_upper_bound


@dataclass
class SplitSampler:
    """What the sampler needs about one split of one source: class ids, counts, and the groups
    its ontology draws from (alphabets, or the eligible DAG nodes' leaves). Built from a spec,
    so the reference specs suffice for statistical tests (no images needed)."""

    source: str
    split: str
    kind: str
    classes: np.ndarray
    counts: np.ndarray  # images per class, indexed by absolute class id
    cfg: MDConfig
    groups: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: MDSpec, split: str, cfg: MDConfig = MDConfig(), source: str | None = None
                  ) -> "SplitSampler":
        """Raises MetabenchError when the split cannot supply episodes under `cfg`."""
        name = source or spec.name
        classes = spec.splits[split]
        counts = spec.images_per_class
        kind = spec.kind if cfg.use_hierarchy and not cfg.fixed else "plain"
        groups: list[np.ndarray] = []
        if cfg.fixed:
            need = int(cfg.num_support) + int(cfg.num_query)  # type: ignore[arg-type]
            classes = classes[counts[classes] >= need]
            if len(classes) < int(cfg.num_ways):  # type: ignore[arg-type]
                raise MetabenchError(f"{name} {split}: {len(classes)} classes have at least {need} images; "
                                     f"cannot sample {cfg.num_ways}-way episodes")
        elif len(classes) < cfg.min_ways:
            raise MetabenchError(f"{name} has {len(classes)} classes in split {split!r}, fewer than "
                                 f"min_ways={cfg.min_ways}: it has no {split} episodes")
        if kind == "bilevel":
            groups = spec.class_groups(split)
            small = [spec.superclass_names[k] for k, g in zip(spec.superclass_splits[split], groups)
                     if len(g) < cfg.min_ways]
            if small:
                raise MetabenchError(f"{name} {split}: superclasses {small} have fewer than {cfg.min_ways} classes")
        elif kind == "hierarchical":
            groups = [g for g in spec.class_groups(split)
                      if cfg.min_ways <= len(g) <= MAX_SPANNING_LEAVES_ELIGIBLE]
            if not groups:
                raise MetabenchError(f"{name} {split}: no DAG node spans {cfg.min_ways} to "
                                     f"{MAX_SPANNING_LEAVES_ELIGIBLE} leaves")
        if not cfg.fixed and counts[classes].min() < 2:
            raise MetabenchError(f"{name} {split}: some classes have fewer than 2 images")
        return cls(name, split, kind, classes, counts, cfg, groups)

    def sample_classes(self, rng: np.random.Generator) -> np.ndarray:
        """Absolute class ids of one episode, in draw order."""
        cfg = self.cfg
        if cfg.fixed:
            return rng.choice(self.classes, int(cfg.num_ways), replace=False)  # type: ignore[arg-type]
        if self.kind == "hierarchical":
            node = self.groups[int(rng.integers(len(self.groups)))]
            if len(node) > cfg.max_ways_upper_bound:
                node = rng.choice(node, cfg.max_ways_upper_bound, replace=False)
            return node
        pool = self.groups[int(rng.integers(len(self.groups)))] if self.kind == "bilevel" else self.classes
        ways = int(rng.integers(cfg.min_ways, min(cfg.max_ways_upper_bound, len(pool)) + 1))
        return rng.choice(pool, ways, replace=False)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(classes, support shots per class, query per class) of one episode."""
        cfg = self.cfg
        classes = self.sample_classes(rng)
        ipc = self.counts[classes].astype(np.int64)
        ways = len(classes)
        if cfg.fixed:
            return classes, np.full(ways, int(cfg.num_support), dtype=np.int64), int(cfg.num_query)  # type: ignore[arg-type]
        query = int(min(cfg.max_num_query, (ipc // 2).min()))
        remaining = ipc - query
        if cfg.max_support_set_size < ways:
            raise MetabenchError("max_support_set_size is too small to have one support example per class")
        beta = rng.uniform()
        contrib = np.minimum(cfg.max_support_size_contrib_per_class, remaining)
        size = int(min(np.floor(beta * contrib + 1).sum(), cfg.max_support_set_size))
        weights = ipc * np.exp(rng.uniform(cfg.min_log_weight, cfg.max_log_weight, size=ways))
        shots = np.floor(weights / weights.sum() * (size - ways)).astype(np.int64) + 1
        return classes, np.minimum(shots, remaining), query


@dataclass(frozen=True)
class MDEpisodes(Protocol):
    """Meta-Dataset's episodes: `config` (variable by default, or fixed-shape), test episodes
    from the benchmark's source, training episodes from `train_sources` (default: the source;
    several: one chosen uniformly per episode, the "all datasets" regime) and validation
    episodes from `val_source` (default: the source)."""

    config: MDConfig = MDConfig()
    train_sources: tuple[str, ...] = ()
    val_source: str = ""

    @property
    def max_way(self) -> int:
        return self.config.max_way

    @property
    def variable_way(self) -> bool:
        return not self.config.fixed

    def split_sources(self, bench: BenchmarkInfo, split: str) -> tuple[str, ...]:
        """Source names (registry names) that episodes of `split` come from."""
        check_split(split)
        if split == "train":
            return tuple(self.train_sources) or (bench.source,)
        if split == "val":
            return (self.val_source or bench.source,)
        return (bench.source,)

    def source_names(self, bench: BenchmarkInfo) -> tuple[str, ...]:
        """Training sources, then the validation source, then the test source (each once)."""
        names: list[str] = []
        for split in ("train", "val", "test"):
            names += [n for n in self.split_sources(bench, split) if n not in names]
        return tuple(names)

    def sampler(self, bench: BenchmarkInfo, sources: Mapping[str, ArraySource]) -> "MDSampler":
        return MDSampler(bench, self, sources)

    def shape(self) -> str:
        c = self.config
        if c.fixed:
            return f"{c.num_ways}-way {c.num_support}-shot {c.num_query} query"
        return (f"variable: ways {c.min_ways}-{c.max_ways_upper_bound}, query <={c.max_num_query}, "
                f"support <={c.max_support_set_size}")

    def row_problem(self, way: int, n_support: int, n_query: int) -> str | None:
        c = self.config
        if c.fixed:
            for what, got, expected in (("way", way, c.num_ways), ("n_support", n_support, way * int(c.num_support)),
                                        ("n_query", n_query, way * int(c.num_query))):
                if got != expected:
                    return f"{what} {got}, but the protocol ({self.shape()}) has {expected}"
            return None
        if not c.min_ways <= way <= c.max_ways_upper_bound:
            return f"way {way} is outside {c.min_ways}..{c.max_ways_upper_bound}"
        # |S| <= min(max_support_set_size, sum over classes of floor(beta * contrib + 1)); shots sum to at most |S|
        most = min(c.max_support_set_size, way * (c.max_support_size_contrib_per_class + 1))
        if not way <= n_support <= most:
            return f"n_support {n_support} is outside {way}..{most} for way {way}"
        if n_query % way or not 1 <= n_query // way <= c.max_num_query:
            return f"n_query {n_query} is not way x q with 1 <= q <= {c.max_num_query} (way {way})"
        return None


class MDSampler:
    """The episodes of a Meta-Dataset benchmark on its loaded sources: per-source split samplers, pixels.

    Episode.classes are global ids: the source's class id plus the source's offset in
    `names` (training sources, then validation, then test source), so ids of different
    sources never collide (TaskInfo.n_classes covers all of them). Images are [3, size, size]
    float32 in [0, 1] (bench.sources.meta_dataset.PIXEL_RANGE); greyscale sources are expanded.
    """

    def __init__(self, bench: BenchmarkInfo, protocol: MDEpisodes, sources: Mapping[str, ArraySource]) -> None:
        self.bench, self.protocol, self.cfg = bench, protocol, protocol.config
        self.names = protocol.source_names(bench)
        self.sources = {n: sources[n] for n in self.names}
        self.specs = {n: spec_of(s) for n, s in self.sources.items()}
        self.offsets, total = {}, 0
        for n in self.names:
            self.offsets[n] = total
            total += self.sources[n].n_classes
        self.n_classes = total
        self._samplers: dict[tuple[str, str], SplitSampler] = {}
        for split in ("train", "val", "test"):
            for n in protocol.split_sources(bench, split):
                self.sampler_for(n, split)  # fail now, with a clear message, not mid-run

    def sampler_for(self, source: str, split: str) -> SplitSampler:
        """The split sampler of (source, split), built once."""
        key = (source, split)
        if key not in self._samplers:
            self._samplers[key] = SplitSampler.from_spec(self.specs[source], split, self.cfg, source)
        return self._samplers[key]

    def task_info(self) -> TaskInfo:
        size = self.bench.image_size
        return TaskInfo(image_shape=(3, size, size), max_way=self.cfg.max_way, n_classes=self.n_classes,
                        variable_way=not self.cfg.fixed)

    def describe(self, split: str, index: int) -> EpisodeSpec:
        """The spec of episode `index` of `split`: source (multi-source streams), classes, examples."""
        return describe_md(self.bench, self.protocol, self.sampler_for, split, index)

    def materialize(self, spec: EpisodeSpec) -> Episode:
        """Gather the pixels of a spec (support then query, ordered by class; labels 0..way-1)."""
        name = spec.source or self.bench.source
        ep = materialize(spec, self.sources[name], self.offsets[name])
        return dataclasses.replace(ep, support_x=_rgb(ep.support_x), query_x=_rgb(ep.query_x))


def describe_md(bench: BenchmarkInfo, protocol: MDEpisodes, sampler_for: Callable[[str, str], SplitSampler],
                split: str, index: int) -> EpisodeSpec:
    """The spec of episode `index` of `split`: source (multi-source streams), classes, examples."""
    rng = episode_rng(bench.seed, split, index)
    names = protocol.split_sources(bench, split)
    source = names[int(rng.integers(len(names)))] if len(names) > 1 else names[0]
    sampler = sampler_for(source, split)
    classes, shots, query = sampler.sample(rng)
    support, queries = [], []
    for c, k in zip(classes, shots):
        idx = rng.choice(int(sampler.counts[c]), int(k) + query, replace=False)
        support.append(tuple(int(i) for i in idx[:k]))
        queries.append(tuple(int(i) for i in idx[k:]))
    return EpisodeSpec(bench.name, bench.version, split, index, tuple(int(c) for c in classes),
                       tuple(support), tuple(queries), source=source)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x

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
uniformly among the benchmark's training sources, with the same generator.

Fixed and partially fixed shapes (the official EpisodeDescriptionConfig fields, `MDConfig`):
- num_ways: N fixed, classes uniformly among the split's classes (the ontology is then ignored);
- num_support: an int (k_c = k for every class) or a (lo, hi) range (k_c ~ U{lo..hi} per class,
  independently); None: steps 3-4;
- num_query: q fixed; None: step 2 when the support is variable, else
  q = min(max_num_query, min_c(|Im(c)| - largest support)) (the official compute_num_query).
- ignore_hierarchy_probability: with probability p an ILSVRC episode ignores the DAG and draws
  its classes as a plain source (the official flag, DAG only; some official configs train with 0.5).
  One extra uniform draw per ILSVRC episode, made only when p > 0.
- min_examples_in_class: classes with fewer images are never drawn (official default 0).

Classes too small for the shape (deliberate, documented difference): the official sampler keeps
every class with at least min_examples_in_class images (0 by default) and raises an error when an
episode draws one with fewer than its shape needs (e.g. 5-way 10-shot 10-query on Fungi, where
221/42/42 of the 994/200/200 train/valid/test classes have fewer than 20 images). Here such
classes are excluded up front, for every split: a fixed or partially fixed shape draws only among
classes with at least (largest support + query) images (query unknown: + 1), which is the official
sampler with min_examples_in_class raised to that number. So every drawn episode exists, and a
split with fewer eligible classes than num_ways is one clear error when the benchmark loads, not
a crash mid-run. Fully variable episodes need 2 images per class, as officially (an error otherwise).

Image choice inside a class (documented difference): the official reader streams each class as a
shuffled, repeating stream of its images (an image returns only after the whole class has been
seen), so consecutive episodes that draw the same class use different images until the stream
wraps. Here every episode draws its images independently (step 5), which is what makes episode
i a pure function of (benchmark, split, i). The distribution of any one episode is the same
(k_c + q distinct images uniformly from the class); what differs is the joint distribution
across episodes: over a training run the official stream spreads a class's images evenly, ours
by chance (for a class drawn t times with m images per episode among M, the number of images
never seen has mean M(1 - m/M)^t instead of about max(0, M - tm)). Test and validation
accuracies, being means over independent episodes, are unaffected in expectation.

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

    num_ways / num_support / num_query: None (variable, the default) or fixed; num_support may also
    be a (lo, hi) range; any may be set alone (see the module docstring). Setting num_ways ignores
    the ontology. use_hierarchy=False ignores it too (plain sampling of the ways).
    """

    num_ways: int | None = None
    num_support: int | tuple[int, int] | None = None
    num_query: int | None = None
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2)
    use_hierarchy: bool = True
    ignore_hierarchy_probability: float = 0.0
    min_examples_in_class: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_support, list):  # from TOML
            object.__setattr__(self, "num_support", tuple(self.num_support))
        for name in ("num_ways", "num_query", "min_examples_in_class"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and name != "min_examples_in_class")):
                raise MetabenchError(f"MDConfig.{name} must be a positive whole number or unset (got {v!r})")
        sup = self.num_support
        ok = sup is None or (isinstance(sup, int) and not isinstance(sup, bool) and sup >= 1) or (
            isinstance(sup, tuple) and len(sup) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in sup)
            and 1 <= sup[0] <= sup[1])
        if not ok:
            raise MetabenchError(f"MDConfig.num_support must be a positive whole number, a (lo, hi) range with "
                                 f"1 <= lo <= hi, or unset (got {sup!r})")
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise MetabenchError(f"MDConfig.ignore_hierarchy_probability must be in [0, 1] "
                                 f"(got {self.ignore_hierarchy_probability!r})")

    @property
    def fixed(self) -> bool:
        """True when way, support and query are all fixed (every episode has the same shape)."""
        return self.num_ways is not None and isinstance(self.num_support, int) and self.num_query is not None

    @property
    def max_way(self) -> int:
        return int(self.num_ways) if self.num_ways is not None else self.max_ways_upper_bound

    @property
    def max_support(self) -> int | None:
        """The largest support per class of a fixed or ranged num_support (None: variable)."""
        sup = self.num_support
        return None if sup is None else sup if isinstance(sup, int) else sup[1]

    @property
    def shaped(self) -> bool:
        """True when any of way, support and query is fixed (the official num_* fields)."""
        return self.num_ways is not None or self.num_support is not None or self.num_query is not None

    def min_images(self) -> int:
        """Images a class needs to be drawn: min_examples_in_class, raised for fixed or partial shapes to
        largest support + query (each counted as 1 when variable); 2 for variable episodes."""
        if not self.shaped:
            return max(2, self.min_examples_in_class)
        return max(self.min_examples_in_class, (self.max_support or 1) + (self.num_query or 1))


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
        kind = spec.kind if cfg.use_hierarchy and cfg.num_ways is None else "plain"
        groups: list[np.ndarray] = []
        need = cfg.min_images()
        if cfg.shaped or cfg.min_examples_in_class:
            classes = classes[counts[classes] >= need]  # classes too small for the shape: never drawn
        least = cfg.min_ways if cfg.num_ways is None else int(cfg.num_ways)
        if len(classes) < least:
            if cfg.shaped or cfg.min_examples_in_class:
                raise MetabenchError(f"{name} {split}: {len(classes)} classes have at least {need} images; "
                                     f"cannot sample {least}-way episodes of shape {MDEpisodes(cfg).shape()}")
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
        if kind != "plain" and len(classes) < len(spec.splits[split]):  # ontology groups keep eligible classes
            groups = [g for g in (g[np.isin(g, classes)] for g in groups) if len(g) >= cfg.min_ways]
            if not groups:
                raise MetabenchError(f"{name} {split}: no DAG node spans {cfg.min_ways} to "
                                     f"{MAX_SPANNING_LEAVES_ELIGIBLE} leaves")
        if counts[classes].min() < 2:
            raise MetabenchError(f"{name} {split}: some classes have fewer than 2 images")
        return cls(name, split, kind, classes, counts, cfg, groups)

    def sample_classes(self, rng: np.random.Generator) -> np.ndarray:
        """Absolute class ids of one episode, in draw order."""
        cfg = self.cfg
        if cfg.num_ways is not None:
            return rng.choice(self.classes, int(cfg.num_ways), replace=False)
        if self.kind == "hierarchical" and cfg.ignore_hierarchy_probability > 0 and \
                rng.uniform() < cfg.ignore_hierarchy_probability:
            ways = int(rng.integers(cfg.min_ways, min(cfg.max_ways_upper_bound, len(self.classes)) + 1))
            return rng.choice(self.classes, ways, replace=False)
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
        if cfg.num_query is not None:
            query = int(cfg.num_query)
        elif cfg.num_support is None:
            query = int(min(cfg.max_num_query, (ipc // 2).min()))
        else:  # compute_num_query with a fixed or ranged support
            query = int(min(cfg.max_num_query, (ipc - int(cfg.max_support)).min()))  # type: ignore[arg-type]
        if isinstance(cfg.num_support, int):
            return classes, np.full(ways, cfg.num_support, dtype=np.int64), query
        if cfg.num_support is not None:
            lo, hi = cfg.num_support
            return classes, rng.integers(lo, hi + 1, size=ways).astype(np.int64), query
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
        return self.config.num_ways is None

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
        ways = f"{c.num_ways}-way" if c.num_ways is not None else f"ways {c.min_ways}-{c.max_ways_upper_bound}"
        sup = c.num_support
        support = (f"support <={c.max_support_set_size}" if sup is None else f"{sup}-shot" if isinstance(sup, int)
                   else f"{sup[0]}-{sup[1]} shots")
        query = f"{c.num_query} query" if c.num_query is not None else f"query <={c.max_num_query}"
        return f"{'variable' if not c.shaped else 'partly fixed'}: {ways}, {query}, {support}"

    def row_problem(self, way: int, n_support: int, n_query: int) -> str | None:
        c = self.config
        if c.num_ways is not None:
            if way != c.num_ways:
                return f"way {way}, but the protocol ({self.shape()}) has {c.num_ways}"
        elif not c.min_ways <= way <= c.max_ways_upper_bound:
            return f"way {way} is outside {c.min_ways}..{c.max_ways_upper_bound}"
        sup = c.num_support
        if sup is None:
            # |S| <= min(max_support_set_size, sum over classes of floor(beta * contrib + 1)); shots sum to at most |S|
            least, most = way, min(c.max_support_set_size, way * (c.max_support_size_contrib_per_class + 1))
        else:
            least, most = (way * sup, way * sup) if isinstance(sup, int) else (way * sup[0], way * sup[1])
        if not least <= n_support <= most:
            if c.fixed:
                return f"n_support {n_support}, but the protocol ({self.shape()}) has {least}"
            return f"n_support {n_support} is outside {least}..{most} for way {way}"
        if c.num_query is not None:
            if n_query != way * c.num_query:
                return f"n_query {n_query}, but the protocol ({self.shape()}) has {way * c.num_query}"
        elif n_query % way or not 1 <= n_query // way <= c.max_num_query:
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
                        variable_way=self.cfg.num_ways is None)

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

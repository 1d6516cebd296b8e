"""Benchmarks: frozen, versioned episode protocols, and their registry.

A benchmark fixes the source, way/shot/query, image size, seed and the number of validation
and test episodes. Changing anything that changes an episode (a split, the sampler) must bump
`version`; the golden spec-hash file in tests/ catches silent drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.api import TaskInfo
from bench.errors import unknown
from bench.sampling import EpisodeSet
from bench.sources import get_source


@dataclass(frozen=True)
class Benchmark:
    """A frozen episode protocol.

    way/shot: classes per episode and support examples per class; query: query examples per
    class (the same for training, validation and test episodes); family: which published
    hyperparameters apply to it ("omniglot", "miniimagenet", ...).

    sampler: "fixed" (the fields above, bench.sampling), or Meta-Dataset's "md" (variable way
    and shot; way/shot/query are then the upper bounds max_ways_upper_bound = 50,
    max_support_size_contrib_per_class = 100 and max_num_query = 10) or "md-fixed" (way/shot/query
    fixed, ontology ignored); see bench/md_sampling.py. source is the test source;
    train_sources (default: source) the training stream, one source per episode chosen
    uniformly; val_source (default: source) the validation episodes.
    """

    name: str
    source: str
    way: int
    shot: int
    query: int
    image_size: int
    family: str
    version: int = 1
    seed: int = 0
    test_episodes: int = 600
    val_episodes: int = 200
    sampler: str = "fixed"
    train_sources: tuple[str, ...] = ()
    val_source: str = ""

    def task_info(self, set_: EpisodeSet) -> TaskInfo:
        """What a method may know before training."""
        if self.sampler != "fixed":
            return set_.task_info()  # type: ignore[attr-defined]  (bench.md_sampling.MDEpisodeSet)
        return TaskInfo(image_shape=set_.source.image_shape, max_way=self.way,
                        n_classes=set_.source.n_classes, variable_way=False)


def _fixed(source: str, family: str, image_size: int, seed: int, version: int = 1) -> dict[str, Benchmark]:
    out = {}
    for way, shot in ((5, 1), (5, 5), (20, 1), (20, 5)):
        name = f"{source}-{way}w{shot}s"
        out[name] = Benchmark(name, source, way, shot, 15, image_size, family, version, seed)
    return out


BENCHMARKS: dict[str, Benchmark] = {
    **_fixed("glyphs", "omniglot", 28, seed=20260001),
}
# Omniglot and miniImageNet (fixed way/shot, 600 test episodes). Query: 15 per class in
# training, validation and test episodes. MAML's own code draws K query per class during
# meta-training (as many as the support); 15 is what most later papers and public
# reimplementations (ProtoNets, torchmeta, learn2learn) evaluate with, and with Omniglot's 20
# drawers per character, 5 support + 15 query uses every image of a class. Each benchmark has
# its own fixed seed.
for _b in (
    Benchmark("omniglot-5w1s", "omniglot", 5, 1, 15, 28, "omniglot", 1, 20260101),
    Benchmark("omniglot-5w5s", "omniglot", 5, 5, 15, 28, "omniglot", 1, 20260102),
    Benchmark("omniglot-20w1s", "omniglot", 20, 1, 15, 28, "omniglot", 1, 20260103),
    Benchmark("omniglot-20w5s", "omniglot", 20, 5, 15, 28, "omniglot", 1, 20260104),
    # the real small subsets (tests, quick checks): test split = 3 alphabets only in small2
    Benchmark("omniglot-small-5w1s", "omniglot-small", 5, 1, 15, 28, "omniglot", 1, 20260111),
    Benchmark("omniglot-small-5w5s", "omniglot-small", 5, 5, 15, 28, "omniglot", 1, 20260112),
    Benchmark("miniimagenet-5w1s", "miniimagenet", 5, 1, 15, 84, "miniimagenet", 1, 20260121),
    Benchmark("miniimagenet-5w5s", "miniimagenet", 5, 5, 15, 84, "miniimagenet", 1, 20260122),
):
    BENCHMARKS[_b.name] = _b
del _b

# Meta-Dataset (bench/md_sampling.py, facts in data/meta_dataset/PROTOCOL.md): variable way and
# shot (way/shot/query = the caps 50 ways, 100 support contribution per class, 10 query), 84 px,
# 600 validation episodes on ILSVRC valid (model selection, as the official protocol) and 600
# test episodes on the named source. Two training regimes: md-<source> trains on ILSVRC only,
# md-all-<source> on the eight training sources (one chosen uniformly per episode).
def _md() -> list[Benchmark]:
    from bench.sources.meta_dataset import OFFICIAL, TRAIN_ALL, source_key

    out, seed = [], 20260300
    for name in OFFICIAL:
        seed += 1
        for regime, train in (("md-", ("md-ilsvrc-2012",)), ("md-all-", tuple(source_key(s) for s in TRAIN_ALL))):
            out.append(Benchmark(regime + source_key(name)[3:], source_key(name), 50, 100, 10, 84, "meta-dataset",
                                 1, seed + (100 if regime == "md-all-" else 0), 600, 600, "md", train,
                                 "md-ilsvrc-2012"))
    # the genuine small Omniglot records (shared test data): its own train/valid/test alphabets
    out.append(Benchmark("md-omniglot-small", "md-omniglot-small", 50, 100, 10, 84, "meta-dataset", 1, 20260351,
                         600, 600, "md"))
    out.append(Benchmark("md-omniglot-small-5w5s", "md-omniglot-small", 5, 5, 10, 84, "meta-dataset", 1, 20260352,
                         600, 600, "md-fixed"))
    return out


for _b in _md():
    BENCHMARKS[_b.name] = _b
del _b

SYNTHETIC = Benchmark("synthetic-5w1s", "synthetic", 5, 1, 5, 28, "omniglot", 1, 7,
                      test_episodes=50, val_episodes=20)
BENCHMARKS[SYNTHETIC.name] = SYNTHETIC


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (an error suggests the closest name)."""
    if name not in BENCHMARKS:
        raise unknown("benchmark", name, list(BENCHMARKS))
    return BENCHMARKS[name]


def load(bench: Benchmark | str, root: Path) -> EpisodeSet:
    """The benchmark's episodes on its source loaded from `root`."""
    if isinstance(bench, str):
        bench = get_benchmark(bench)
    if bench.sampler != "fixed":
        from bench.md_sampling import MDEpisodeSet

        return MDEpisodeSet(bench, Path(root))  # type: ignore[return-value]
    return EpisodeSet(bench, get_source(bench.source, Path(root), bench.image_size))

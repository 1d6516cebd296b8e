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

    def task_info(self, set_: EpisodeSet) -> TaskInfo:
        """What a method may know before training."""
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
    return EpisodeSet(bench, get_source(bench.source, Path(root), bench.image_size))

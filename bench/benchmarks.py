"""Benchmarks: frozen, versioned episode protocols, their registry, and benchmarks of one's own.

A benchmark is plain data: a name, the test source, a protocol (how episodes are drawn:
bench/protocols.py), the image size, the key of the method presets that apply to it, a seed and
the numbers of validation and test episodes. Changing anything that changes an episode (a
split, the sampler) must bump `version`; the golden spec-hash file in tests/ catches silent
drift.

Where benchmarks come from (`get_benchmark`):
- the built-in ones below (`metabench ls`);
- installed packages, through the entry-point group "metabench.benchmarks" (name = "pkg.module:NAME");
- any importable "pkg.module:NAME" bound to a `Benchmark`;
- a TOML file on an existing source (`load_toml`, format in its docstring).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.errors import DataError, MetabenchError
from bench.md_sampling import MDConfig, MDEpisodes
from bench.protocols import EpisodeSet, Protocol
from bench.registry import Registry
from bench.sampling import FixedEpisodes
from bench.sources import SOURCES, get_source
from bench.sources.base import ArraySource


@dataclass(frozen=True)
class Benchmark:
    """A frozen episode protocol on a source.

    source: the test source (registry name); protocol: how episodes are drawn (fixed
    way/shot/query, Meta-Dataset's variable episodes, ...); preset: the key of the method
    presets that apply ("omniglot-5w", "miniimagenet", "meta-dataset", ...; "" for none:
    runs then need --steps); seed: the benchmark's own episode seed.

    members: a suite's test benchmarks (empty for a plain benchmark). A suite trains once on its
    protocol's training episodes, selects the checkpoint on its validation episodes, then tests on
    the test episodes of every member (the member's own episodes: same specs and hashes as running
    the member alone) and writes one result CSV per member. Its own test split is unused.
    """

    name: str
    source: str
    protocol: Protocol
    image_size: int
    preset: str = ""
    version: int = 1
    seed: int = 0
    test_episodes: int = 600
    val_episodes: int = 200
    members: tuple[str, ...] = ()

    @property
    def max_way(self) -> int:
        """The largest way of any episode (of a suite: of any member's too)."""
        return max([self.protocol.max_way, *(m.max_way for m in self.member_benchmarks())])

    @property
    def is_suite(self) -> bool:
        """True for a suite (train once, test on every member)."""
        return bool(self.members)

    def member_benchmarks(self) -> list["Benchmark"]:
        """A suite's test benchmarks, in order ([] for a plain benchmark)."""
        return [get_benchmark(m) for m in self.members]

    def source_names(self) -> tuple[str, ...]:
        """Every source the benchmark needs: its protocol's, then each member's (each once)."""
        names = list(self.protocol.source_names(self))
        for m in self.member_benchmarks():
            names += [n for n in m.protocol.source_names(m) if n not in names]
        return tuple(names)

    def member_sets(self, es: EpisodeSet) -> list[EpisodeSet]:
        """The members' episodes on the sources already loaded in a suite's EpisodeSet `es`."""
        return [EpisodeSet(m, es.sources) for m in self.member_benchmarks()]

    def with_episodes(self, loader: Callable[[str, Path, int], ArraySource] | None, root: Path) -> EpisodeSet:
        """This benchmark's episodes on its sources, each loaded with `loader(name, root, image_size)`.

        Every source is loaded first (a suite's members' too), so a missing one fails before any
        training, and one DataError names every missing source with what prepares it.
        """
        load = loader or get_source
        if loader is None:
            check_root(root)
        sources, missing = {}, []
        for n in self.source_names():
            try:
                sources[n] = load(n, Path(root), self.image_size)
            except DataError as e:
                missing.append((n, e))
            except OSError as e:  # a read-only or full data folder while a cache is built
                missing.append((n, DataError(f"{root}: cannot build the {n} cache there ({e.strerror or e}); "
                                             "give a writable --root")))
        if len(missing) == 1:
            raise missing[0][1]
        if missing:
            raise DataError(f"{self.name} needs {len(missing)} sources that are not usable in {root}:\n"
                            + "\n".join(f"  {n}: {e}" for n, e in missing))
        return EpisodeSet(self, sources)


def check_root(root: Path) -> None:
    """Create the data folder, or raise one clear DataError (before anything is rendered or decoded)."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: not usable as the data folder ({e.strerror or e}); give a writable --root") from e


def _check_benchmark(obj: Any, name: str) -> None:
    if not isinstance(obj, Benchmark):
        raise MetabenchError(f"benchmark {name!r} is a {type(obj).__name__}, not a bench.benchmarks.Benchmark")


BENCHMARKS: Registry[Benchmark] = Registry("benchmark", group="metabench.benchmarks", check=_check_benchmark,
                                           targets=True)


def omniglot_preset(way: int) -> str:
    """The preset key of an Omniglot-like benchmark: papers tune 5-way and 20-way separately."""
    return "omniglot-20w" if way >= 20 else "omniglot-5w"


def _fixed(name: str, source: str, way: int, shot: int, image_size: int, preset: str, seed: int) -> Benchmark:
    return Benchmark(name, source, FixedEpisodes(way, shot, 15), image_size, preset, 1, seed)


# glyphs, the embedded default (Omniglot's presets apply: characters by script like Omniglot's alphabets)
for _way, _shot in ((5, 1), (5, 5), (20, 1), (20, 5)):
    BENCHMARKS.add(f"glyphs-{_way}w{_shot}s",
                   _fixed(f"glyphs-{_way}w{_shot}s", "glyphs", _way, _shot, 28, omniglot_preset(_way), 20260001))
# Omniglot and miniImageNet (fixed way/shot, 600 test episodes). Query: 15 per class in
# training, validation and test episodes. MAML's own code draws K query per class during
# meta-training (as many as the support); 15 is what most later papers and public
# reimplementations (ProtoNets, torchmeta, learn2learn) evaluate with, and with Omniglot's 20
# drawers per character, 5 support + 15 query uses every image of a class. Each benchmark has
# its own fixed seed. omniglot-small-*: the real small subsets (tests, quick checks): test
# split = 3 alphabets only in small2.
for _name, _source, _way, _shot, _size, _seed in (
    ("omniglot-5w1s", "omniglot", 5, 1, 28, 20260101),
    ("omniglot-5w5s", "omniglot", 5, 5, 28, 20260102),
    ("omniglot-20w1s", "omniglot", 20, 1, 28, 20260103),
    ("omniglot-20w5s", "omniglot", 20, 5, 28, 20260104),
    ("omniglot-small-5w1s", "omniglot-small", 5, 1, 28, 20260111),
    ("omniglot-small-5w5s", "omniglot-small", 5, 5, 28, 20260112),
    ("miniimagenet-5w1s", "miniimagenet", 5, 1, 84, 20260121),
    ("miniimagenet-5w5s", "miniimagenet", 5, 5, 84, 20260122),
):
    _preset = "miniimagenet" if _source == "miniimagenet" else omniglot_preset(_way)
    BENCHMARKS.add(_name, _fixed(_name, _source, _way, _shot, _size, _preset, _seed))


# Meta-Dataset (bench/md_sampling.py, facts in data/meta_dataset/PROTOCOL.md): variable way and
# shot (at most 50 ways, 100 support contribution per class, 10 query), 84 px, 600 validation
# episodes on ILSVRC valid (model selection, as the official protocol) and 600 test episodes on
# the named source. Two training regimes: md-<source> trains on ILSVRC only, md-all-<source> on
# the eight training sources (one chosen uniformly per episode).
def _md() -> list[Benchmark]:
    from bench.sources.meta_dataset import OFFICIAL, TRAIN_ALL, source_key

    out, seed = [], 20260300
    for name in OFFICIAL:
        seed += 1
        for regime, train in (("md-", ("md-ilsvrc-2012",)), ("md-all-", tuple(source_key(s) for s in TRAIN_ALL))):
            out.append(Benchmark(regime + source_key(name)[3:], source_key(name),
                                 MDEpisodes(MDConfig(), train, "md-ilsvrc-2012"), 84, "meta-dataset", 1,
                                 seed + (100 if regime == "md-all-" else 0), 600, 600))
    # The two regimes as the paper reports them: suites that train once (ILSVRC-only or the eight
    # training sources), select on ILSVRC validation episodes, and test on the 10 sources' test
    # episodes of the matching single-source benchmarks above (one CSV per source).
    for suite, regime, train, seed in (("md-imagenet", "md-", ("md-ilsvrc-2012",), 20260361),
                                       ("md-all", "md-all-", tuple(source_key(s) for s in TRAIN_ALL), 20260362)):
        out.append(Benchmark(suite, "md-ilsvrc-2012", MDEpisodes(MDConfig(), train, "md-ilsvrc-2012"), 84,
                             "meta-dataset", 1, seed, 600, 600,
                             members=tuple(regime + source_key(n)[3:] for n in OFFICIAL)))
    # the genuine small Omniglot records (shared test data): its own train/valid/test alphabets
    out.append(Benchmark("md-omniglot-small", "md-omniglot-small", MDEpisodes(), 84, "meta-dataset", 1, 20260351,
                         600, 600))
    fixed = MDConfig(num_ways=5, num_support=5, num_query=10, use_hierarchy=False)
    out.append(Benchmark("md-omniglot-small-5w5s", "md-omniglot-small", MDEpisodes(fixed), 84, "meta-dataset", 1,
                         20260352, 600, 600))
    return out


for _b in _md():
    BENCHMARKS.add(_b.name, _b)

SYNTHETIC = Benchmark("synthetic-5w1s", "synthetic", FixedEpisodes(5, 1, 5), 28, "omniglot-5w", 1, 7,
                      test_episodes=50, val_episodes=20)
BENCHMARKS.add(SYNTHETIC.name, SYNTHETIC)
del _b, _way, _shot, _name, _source, _size, _seed, _preset

PROTOCOLS: Registry[type[Protocol]] = Registry("protocol kind")
PROTOCOLS.add("fixed", FixedEpisodes, "fixed way, shot and query (optional train_query)")
PROTOCOLS.add("meta-dataset", MDEpisodes, "Meta-Dataset episodes (MDConfig fields, train_sources, val_source)")


def load_toml(path: Path) -> Benchmark:
    """A benchmark defined in a TOML file, on a registered source. Every error names the file.

    ```toml
    name = "omniglot-small-20w1s"      # a new name (not a built-in one)
    source = "omniglot-small"          # a registered source
    image_size = 28
    preset = "omniglot-20w"            # optional: whose method presets apply ("" or absent: none)
    seed = 1234                        # optional (0); version = 1, test_episodes = 600, val_episodes = 200
    [protocol]
    kind = "fixed"                     # or "meta-dataset"
    way = 20
    shot = 1
    query = 15
    train_query = 5                    # optional: query per class of training episodes
    ```

    A "meta-dataset" protocol takes the fields of bench.md_sampling.MDConfig (num_ways, max_num_query, ...)
    and train_sources (a list) and val_source.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise MetabenchError(f"{path}: cannot read the benchmark file ({e})") from e
    fields = {f.name: f for f in dataclasses.fields(Benchmark)}
    unknown_keys = sorted(set(data) - set(fields))
    if unknown_keys:
        raise MetabenchError(f"{path}: unknown key(s) {unknown_keys}; a benchmark has {sorted(fields)}")
    for key in ("name", "source", "image_size", "protocol"):
        if key not in data:
            raise MetabenchError(f"{path}: missing {key!r}")
    spec = data.pop("protocol")
    if not isinstance(spec, dict) or "kind" not in spec:
        raise MetabenchError(f"{path}: [protocol] must be a table with a 'kind' ({', '.join(PROTOCOLS)})")
    kind = str(spec.pop("kind"))
    if kind not in PROTOCOLS:
        raise MetabenchError(f"{path}: unknown protocol kind {kind!r} ({', '.join(PROTOCOLS)})")
    protocol = _protocol_from(PROTOCOLS.get(kind), spec, path)
    for key, typ in (("name", str), ("source", str), ("preset", str), ("image_size", int), ("version", int),
                     ("seed", int), ("test_episodes", int), ("val_episodes", int)):
        if key in data and (not isinstance(data[key], typ) or isinstance(data[key], bool)):
            raise MetabenchError(f"{path}: {key} must be a {typ.__name__} (got {data[key]!r})")
    for key in ("image_size", "test_episodes", "val_episodes", "version"):
        if key in data and data[key] < 1:
            raise MetabenchError(f"{path}: {key} must be at least 1 (got {data[key]})")
    if data["name"] in BENCHMARKS:
        raise MetabenchError(f"{path}: name {data['name']!r} is a registered benchmark; choose another name")
    for src in (data["source"], *protocol.source_names(Benchmark(data["name"], data["source"], protocol, 1))):
        SOURCES.entry(src)  # an unknown source is an UnknownNameError with a suggestion
    return Benchmark(protocol=protocol, **data)


def _protocol_from(cls: type[Protocol], spec: dict[str, Any], path: Path) -> Protocol:
    """A protocol of class `cls` from a TOML table (MDEpisodes: MDConfig fields at the same level)."""
    try:
        if cls is MDEpisodes:
            outer = {k: spec.pop(k) for k in ("train_sources", "val_source") if k in spec}
            if "train_sources" in outer:
                outer["train_sources"] = tuple(outer["train_sources"])
            return MDEpisodes(MDConfig(**spec), **outer)
        return cls(**spec)
    except TypeError as e:
        raise MetabenchError(f"{path}: bad [protocol] fields for kind {cls.__name__}: {e}") from e
    except MetabenchError as e:
        raise MetabenchError(f"{path}: {e}") from e


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """A benchmark by registered name, "pkg.module:NAME", TOML file path, or the object itself."""
    if isinstance(name, Benchmark):
        return name
    if not isinstance(name, str):
        raise MetabenchError(f"a benchmark is a name, a 'pkg.module:NAME' target or a .toml file (got {name!r})")
    if name.endswith(".toml"):
        return load_toml(Path(name))
    return BENCHMARKS.get(name)


def load(bench: Benchmark | str, root: Path, loader: Callable[[str, Path, int], ArraySource] | None = None
         ) -> EpisodeSet:
    """The benchmark's episodes on its sources loaded from `root` (with `loader`, default get_source)."""
    return get_benchmark(bench).with_episodes(loader, root)
